"""samplers/fusion/response.py: response scores and weights equal their formulas, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from multiconcept.samplers.fusion.response import MODES, response_scores, response_weights

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def test_scores_are_the_max_over_tokens_of_the_cosine():
    e, p = rand(3, 5), rand(7, 5)
    expected = torch.tensor(
        [max(float(e[i] @ p[t]) / (float(e[i].norm()) * float(p[t].norm())) for t in range(7)) for i in range(3)],
        dtype=torch.float64,
    )
    assert torch.allclose(response_scores(e, p), expected, atol=1e-12, rtol=0)


def test_scores_are_cosines_not_dot_products():
    """Scaling a token or a concept changes a dot product but not the score; the winner is the direction."""
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # token 0 points exactly along concept 0 but is short; token 1 is long and only partly along concept 1
    p = torch.tensor([[0.1, 0.0], [6.0, 8.0]], dtype=torch.float64)
    scores = response_scores(e, p)
    assert torch.allclose(scores, torch.tensor([1.0, 0.8], dtype=torch.float64))
    dots = (e @ p.T).amax(dim=1)
    assert dots[1] > dots[0]  # a dot product would rank concept 1 first
    assert scores[0] > scores[1]
    assert torch.allclose(response_scores(e * 7.0, p * 0.01), scores)


def test_a_zero_vector_has_score_zero_and_shapes_are_checked():
    e = torch.zeros(1, 4)
    assert float(response_scores(e, rand(3, 4).float())[0]) == 0.0
    with pytest.raises(ValueError, match="different text encoders"):
        response_scores(rand(2, 4), rand(3, 5))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        response_scores(rand(4), rand(3, 4))
    with pytest.raises(ValueError, match="at least one"):
        response_scores(rand(2, 4), rand(0, 4))


def test_sum_to_one_weights_equal_the_formula():
    scores = torch.tensor([0.5, -0.2, 0.3, 0.0], dtype=torch.float64)
    w = response_weights(scores, "sum to one")
    assert torch.allclose(w, torch.tensor([0.5 / 0.8, 0.0, 0.3 / 0.8, 0.0], dtype=torch.float64), atol=1e-15)
    assert MODES[0] == "sum to one"
    assert torch.equal(response_weights(scores), w)  # the default mode


def test_sum_to_one_falls_back_to_uniform_when_no_score_is_positive():
    for scores in (torch.tensor([-0.5, -0.1, -0.9]), torch.zeros(3), torch.tensor([-0.2, 0.0, -0.3])):
        assert torch.allclose(response_weights(scores, "sum to one"), torch.full((3,), 1 / 3))


def test_softmax_weights_equal_the_formula():
    scores = torch.tensor([0.4, 0.1, -0.3], dtype=torch.float64)
    for temperature in (0.05, 0.5, 2.0):
        e = [math.exp(float(s) / temperature) for s in scores]
        expected = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
        assert torch.allclose(response_weights(scores, "softmax", temperature), expected, atol=1e-12, rtol=0)
    # low temperature: nearly all weight on the best concept; high: nearly uniform
    assert float(response_weights(scores, "softmax", 0.01)[0]) > 0.999
    assert torch.allclose(response_weights(scores, "softmax", 1000.0), torch.full((3,), 1 / 3, dtype=torch.float64),
                          atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_weights_are_a_distribution(mode):
    w = response_weights(rand(6), mode, 0.3)
    assert (w >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-12


def test_bad_modes_temperatures_and_scores_are_refused():
    s = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="unknown mode"):
        response_weights(s, "average")
    for t in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            response_weights(s, "softmax", t)
    with pytest.raises(ValueError, match="finite"):
        response_weights(torch.tensor([0.1, math.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        response_weights(torch.zeros(0))


@pytest.mark.parametrize("mode", MODES)
def test_a_concept_absent_from_the_prompt_gets_the_lowest_weight(mode):
    """Prompt tokens = filler plus a noisy copy of concepts 0 and 2's mean embeddings; concept 1 is absent."""
    d = 64
    means = rand(3, d)
    filler = rand(5, d)
    tokens = torch.cat([filler, means[0:1] + 0.1 * rand(1, d), means[2:3] * 3.0 + 0.1 * rand(1, d)])
    scores = response_scores(means, tokens)
    w = response_weights(scores, mode, 0.05)
    assert int(torch.argmin(w)) == 1 and float(w[1]) < 0.5 * float(w[[0, 2]].min())
    assert scores[0] > 0.9 and scores[2] > 0.9 and scores[1] < 0.6
