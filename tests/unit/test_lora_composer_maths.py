"""LoRA-Composer's maths on small tensors: each loss equals its formula written out by hand, a map inside its
box gives (near) zero enhancement loss, isolation zeroes exactly the cross-box weights and equals a dense
masked softmax, the re-initialisation moves the strongest window into the box and keeps the statistics."""

from __future__ import annotations

import math

import pytest
import torch

from multiconcept.samplers.lora_composer.isolation import (
    allowed_keys,
    isolated_attention,
    isolated_probabilities,
    masked_attention_reference,
    membership_codes,
)
from multiconcept.samplers.lora_composer.losses import (
    box_gaussian,
    composer_loss,
    enhancement_loss,
    fill_loss,
    region_loss,
    smooth,
    smoothing_kernel,
    step_sizes,
    top_k_count,
)
from multiconcept.samplers.lora_composer.reinit import best_window, reinitialise
from multiconcept.samplers.mixofshow.regional_attention import sdpa_attention

H, W = 8, 10


def _box(y0, y1, x0, x1):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_smoothing_kernel_is_attend_and_excite_formula():
    k = smoothing_kernel(3, 0.5)
    one = torch.tensor([math.exp(-1.0), 1.0, math.exp(-1.0)])  # exp(-((x - mu) / (2 sigma))^2), x - mu = +-1
    one = one / one.sum()
    torch.testing.assert_close(k, one[:, None] * one[None, :])
    assert abs(float(k.sum()) - 1) < 1e-6
    # reflect padding keeps a constant map constant
    torch.testing.assert_close(smooth(torch.full((2, H, W), 0.3)), torch.full((2, H, W), 0.3))


def test_box_gaussian_is_one_at_the_centre_and_zero_outside():
    m = _box(1, 6, 2, 9)  # 5 x 7, odd sides: a centre cell exists
    g = box_gaussian(m)
    assert float(g[3, 5]) == pytest.approx(1.0)
    assert float(g[1, 2]) == pytest.approx(math.exp(-1.0))  # corner: x = y = -1
    assert float(g[1, 5]) == pytest.approx(math.exp(-0.5))  # edge midpoint
    assert float(g[~m].abs().max()) == 0


def test_enhancement_loss_equals_its_formula():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, H, W, generator=gen)
    m = _box(2, 7, 1, 6)
    k = math.floor(0.2 * 25)
    expected = 0.0
    g = box_gaussian(m)
    for t in range(2):
        values = sorted((maps[t] * g * m).flatten().tolist(), reverse=True)[:k]
        expected += 8.0 * max(0.0, 1 - sum(values) / k)
    assert float(enhancement_loss(maps, m, 0.2, 8.0)) == pytest.approx(expected, rel=1e-6)


def test_a_map_inside_its_box_gives_near_zero_enhancement_loss():
    m = _box(1, 8, 2, 9)  # 7 x 7
    inside = m.float()  # all of the map's mass inside the box, at the largest value a probability takes
    outside = torch.zeros(H, W)
    outside[0, 0] = 1.0
    near = float(enhancement_loss(inside[None], m))
    far = float(enhancement_loss(outside[None], m))
    assert far == pytest.approx(8.0)
    # the least it can be: the top-k cells of G around the centre fall a little under 1
    g = sorted(box_gaussian(m).flatten().tolist(), reverse=True)[: top_k_count(49, 0.2)]
    assert near == pytest.approx(8.0 * (1 - sum(g) / len(g)), rel=1e-5)
    assert near < 0.1 * far


def test_fill_loss_equals_its_formula():
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(1, H, W, generator=gen)
    m = _box(2, 5, 3, 8)
    a = (maps[0] * m).tolist()
    cols = [1.0 if 3 <= x < 8 else 0.0 for x in range(W)]
    rows = [1.0 if 2 <= y < 5 else 0.0 for y in range(H)]
    dx = sum(abs(max(a[y][x] for y in range(H)) - cols[x]) for x in range(W)) / W
    dy = sum(abs(max(a[y]) - rows[y]) for y in range(H)) / H
    assert float(fill_loss(maps, m, 2.0)) == pytest.approx(2.0 * (dx + dy), rel=1e-6)
    # a map that is 1 over the whole box fills it: no fill loss
    assert float(fill_loss(m.float()[None], m)) == 0


def test_region_loss_equals_its_formula():
    gen = torch.Generator().manual_seed(2)
    n = H * W
    s = torch.softmax(torch.randn(n, n, generator=gen), dim=-1)
    m = _box(0, 3, 0, 4).flatten()
    k = top_k_count(int(m.sum()), 0.2)
    values = sorted(s[m][:, ~m].flatten().tolist(), reverse=True)[:k]
    assert float(region_loss(s, m, 0.2, 10.0)) == pytest.approx(10 * sum(values) / k, rel=1e-6)
    # already restricted rows give the same
    assert float(region_loss(s[m], m)) == pytest.approx(float(region_loss(s, m)))


def test_total_is_the_plain_sum_and_tiny_boxes_do_not_give_nan():
    gen = torch.Generator().manual_seed(3)
    maps = [torch.rand(2, H, W, generator=gen), torch.rand(1, H, W, generator=gen)]
    masks = torch.stack([_box(0, 4, 0, 4), _box(5, 6, 8, 9)])  # the second box is one cell
    s = torch.softmax(torch.randn(H * W, H * W, generator=gen), dim=-1)
    total, parts = composer_loss(maps, masks, s)
    by_hand = sum(
        float(enhancement_loss(smooth(maps[c]), masks[c]))
        + float(fill_loss(smooth(maps[c]), masks[c]))
        + float(region_loss(s, masks[c]))
        for c in range(2)
    )
    assert float(total) == pytest.approx(by_hand, rel=1e-5)
    assert sum(sum(p.values()) for p in parts) == pytest.approx(by_hand, rel=1e-5)
    assert math.isfinite(float(total))
    off, _ = composer_loss(maps, masks, s, enhancement=0, fill=0, region=0)
    assert float(off) == 0


def test_step_sizes_follow_the_official_schedule():
    s = step_sizes(50)
    assert float(s[0]) == pytest.approx(20.0)
    assert float(s[-1]) == pytest.approx(20 * math.sqrt(0.5))
    assert float(s[25]) == pytest.approx(20 * math.sqrt(1 - 0.5 * 25 / 49))


# ------------------------------------------------------------------------------------------ isolation


def _members():
    a, b = _box(0, 4, 0, 4), _box(3, 8, 3, 8)  # overlap at rows 3, cols 3
    return torch.stack([a.flatten(), b.flatten()]), a.flatten(), b.flatten()


def test_allowed_keys_follow_the_rule():
    members, a, b = _members()
    codes = membership_codes(members)
    allowed = allowed_keys(codes)
    only_a = a & ~b
    background = ~(a | b)
    qa = int(torch.nonzero(only_a)[0])
    assert bool(allowed[qa][only_a].all()) and bool(allowed[qa][background].all())
    assert not bool(allowed[qa][b].any())  # not box B, nor the overlap (which is in B)
    qbg = int(torch.nonzero(background)[0])
    assert bool(allowed[qbg].all())  # background queries are free
    both = int(torch.nonzero(a & b)[0])
    assert bool(allowed[both].all())  # a query in both boxes may look at both (and the background)


def test_isolation_weights_are_exactly_zero_across_boxes_and_match_a_dense_mask():
    members, a, b = _members()
    codes = membership_codes(members)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, H * W, 16, generator=gen) for _ in range(3))
    out = isolated_attention(q, k, v, 4, codes, sdpa_attention)
    ref = masked_attention_reference(q, k, v, 4, allowed_keys(codes))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    probs = isolated_probabilities(q, k, 4, codes)
    only_a = a & ~b
    assert float(probs[:, only_a][:, :, b].abs().max()) == 0.0
    background = ~(a | b)
    assert float(probs[:, only_a][:, :, background].min()) > 0
    # behaviour: values inside box B do not reach queries of box A; background values do
    v2 = v.clone()
    v2[:, b] += 5.0
    out2 = isolated_attention(q, k, v2, 4, codes, sdpa_attention)
    assert torch.equal(out2[:, only_a], out[:, only_a])
    v3 = v.clone()
    v3[:, background] += 5.0
    assert float((isolated_attention(q, k, v3, 4, codes, sdpa_attention)[:, only_a] - out[:, only_a]).abs().min()) > 0


def test_without_boxes_isolation_is_plain_attention():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 12, 8, generator=gen) for _ in range(3))
    codes = torch.zeros(12, dtype=torch.int64)
    assert torch.equal(isolated_attention(q, k, v, 2, codes, sdpa_attention), sdpa_attention(q, k, v, 2))


def test_isolated_attention_carries_gradients():
    members, _, _ = _members()
    codes = membership_codes(members)
    q = torch.randn(1, H * W, 8, requires_grad=True)
    out = isolated_attention(q, q.detach(), q.detach(), 2, codes, sdpa_attention)
    out.sum().backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------- re-init


def test_best_window_finds_the_strongest_patch():
    score = torch.zeros(H, W)
    score[5:7, 6:9] = 1.0
    assert best_window(score, (2, 3)) == (5, 6)


def test_reinitialise_moves_the_window_into_the_box_and_keeps_the_statistics():
    gen = torch.Generator().manual_seed(6)
    noise = torch.randn(1, 4, H * 4, W * 4, generator=gen)
    score = torch.zeros(H, W)
    score[5:7, 6:9] = 1.0
    out = reinitialise(noise, [score], [(0, 2, 0, 3)])
    assert float(out.mean()) == pytest.approx(float(noise.mean()), abs=1e-5)
    assert float(out.std()) == pytest.approx(float(noise.std()), rel=1e-5)
    # the box now holds the window's noise (up to the affine renormalisation)
    moved = out[..., 0:8, 0:12].flatten()
    source = noise[..., 20:28, 24:36].flatten()
    corr = torch.corrcoef(torch.stack([moved, source]))[0, 1]
    assert float(corr) > 0.999
    rest = out[..., 8:, 12:].flatten()
    assert float(torch.corrcoef(torch.stack([rest, noise[..., 8:, 12:].flatten()]))[0, 1]) > 0.999
