"""samplers/scoped_lora/lowrank.py: the unmerged LoRA products equal their merged weights, on small tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multiconcept.samplers.scoped_lora.lowrank import (
    LayerFactors,
    LowRankFactors,
    blend_outputs,
    conv_delta,
    grid_sizes,
    linear_delta,
    normalise_weights,
    per_concept_linear,
    resize_area,
    token_grid,
)

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def linear_factors(out_f=6, in_f=5, rank=2, scale=0.7):
    return LowRankFactors(down=rand(rank, in_f), up=rand(out_f, rank), scale=scale)


def test_linear_delta_equals_the_merged_weights_of_all_concepts():
    a, b = linear_factors(rank=2, scale=0.7), linear_factors(rank=3, scale=-1.3)
    layer = LayerFactors(owners=(0, 1), factors=(a, b))
    x = rand(2, 7, 5)
    merged = a.dense_delta((6, 5)) + b.dense_delta((6, 5))
    assert torch.allclose(linear_delta(x, layer, None), x @ merged.t(), atol=1e-12)
    assert layer.total_rank == 5


def test_linear_delta_weights_each_concept_per_token():
    a, b = linear_factors(scale=1.0), linear_factors(scale=2.0)
    layer = LayerFactors(owners=(0, 1), factors=(a, b))
    x = rand(2, 4, 5)
    w = torch.zeros(2, 4, 2, dtype=torch.float64)
    w[0, :2, 0] = 1.0  # concept a on the first two tokens of row 0
    w[1, :, 1] = 0.25  # concept b at a quarter on all of row 1
    got = linear_delta(x, layer, w)
    da, db = a.dense_delta((6, 5)), b.dense_delta((6, 5))
    want = torch.zeros(2, 4, 6, dtype=torch.float64)
    want[0, :2] = x[0, :2] @ da.t()
    want[1] = 0.25 * (x[1] @ db.t())
    assert torch.allclose(got, want, atol=1e-12)
    # 2-D inputs (e.g. time embeddings): one weight per row
    x2 = rand(3, 5)
    w2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    want2 = torch.stack([x2[0] @ da.t(), x2[1] @ db.t(), 0.5 * (x2[2] @ da.t() + x2[2] @ db.t())])
    assert torch.allclose(linear_delta(x2, layer, w2), want2, atol=1e-12)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (1, 0)])
def test_conv_delta_equals_the_merged_kernel(stride, padding):
    a = LowRankFactors(down=rand(2, 3, 3, 3), up=rand(4, 2, 1, 1), scale=0.5)
    b = LowRankFactors(down=rand(3, 3, 3, 3), up=rand(4, 3, 1, 1), scale=1.5)
    layer = LayerFactors(owners=(0, 1), factors=(a, b), conv=(stride, padding, 1))
    x = rand(2, 3, 9, 7)
    merged = a.dense_delta((4, 3, 3, 3)) + b.dense_delta((4, 3, 3, 3))
    want = F.conv2d(x, merged, stride=stride, padding=padding)
    got = conv_delta(x, layer, None, want.shape[-2:])
    assert torch.allclose(got, want, atol=1e-12)
    w = torch.zeros(2, 2, *want.shape[-2:], dtype=torch.float64)
    w[:, 0, :, :2] = 1.0  # concept a only in the first two output columns
    got = conv_delta(x, layer, w, want.shape[-2:])
    only_a = F.conv2d(x, a.dense_delta((4, 3, 3, 3)), stride=stride, padding=padding)
    assert torch.allclose(got[..., :2], only_a[..., :2], atol=1e-12) and got[..., 2:].abs().max() == 0


def test_locon_mid_factors_equal_the_merged_kernel():
    mid = LowRankFactors(down=rand(2, 3, 1, 1), up=rand(4, 2, 1, 1), scale=0.8, mid=rand(2, 2, 3, 3))
    plain = LowRankFactors(down=rand(2, 3, 3, 3), up=rand(4, 2, 1, 1), scale=1.1)
    layer = LayerFactors(owners=(0, 1), factors=(mid, plain), conv=(2, 1, 1))
    x = rand(1, 3, 8, 8)
    merged = mid.dense_delta((4, 3, 3, 3)) + plain.dense_delta((4, 3, 3, 3))
    want = F.conv2d(x, merged, stride=2, padding=1)
    assert torch.allclose(conv_delta(x, layer, None, want.shape[-2:]), want, atol=1e-12)
    w = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    w[:, 1] = 1.0
    only_plain = F.conv2d(x, plain.dense_delta((4, 3, 3, 3)), stride=2, padding=1)
    assert torch.allclose(conv_delta(x, layer, w, (4, 4)), only_plain, atol=1e-12)


def test_per_concept_deltas_sum_to_the_batched_delta():
    a, b = linear_factors(rank=1), linear_factors(rank=4)
    layer = LayerFactors(owners=(3, 5), factors=(a, b))
    x = rand(2, 77, 5)
    da, db = per_concept_linear(x, layer)
    assert torch.allclose(da, x @ a.dense_delta((6, 5)).t(), atol=1e-12)
    assert torch.allclose(da + db, linear_delta(x, layer, None), atol=1e-12)


def test_factors_are_cast_once_per_device_and_dtype():
    layer = LayerFactors(owners=(0,), factors=(linear_factors(),))
    first = layer.stacked(torch.device("cpu"), torch.float16)
    assert first[0].dtype == torch.float16 and layer.stacked(torch.device("cpu"), torch.float16) is first


def test_normalise_weights_shares_only_where_concepts_overlap():
    w = torch.zeros(2, 1, 1, 4)
    w[0, ..., :3] = 1.0
    w[1, ..., 1:] = 1.0
    w[1, ..., 3] = 0.5
    n = normalise_weights(w)
    assert n[0, 0, 0].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert n[1, 0, 0].tolist() == [0.0, 0.5, 0.5, 0.5]
    assert torch.equal(normalise_weights(w[:1]), w[:1])


def test_resize_area_averages_exactly():
    m = torch.zeros(1, 4, 6)
    m[0, :2, :3] = 1.0
    assert resize_area(m, (2, 3)).tolist() == [[[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]]
    assert resize_area(m, (4, 6)) is m
    odd = resize_area(torch.ones(2, 13, 9), (7, 5))
    assert odd.shape == (2, 7, 5) and torch.allclose(odd, torch.ones(2, 7, 5))


def test_token_grid_follows_the_unet_rounding():
    assert grid_sizes(13, 9)[:4] == [(13, 9), (7, 5), (4, 3), (2, 2)]
    assert token_grid(13 * 9, 13, 9) == (13, 9) and token_grid(35, 13, 9) == (7, 5)
    assert token_grid(12, 13, 9) == (4, 3) and token_grid(77, 13, 9) is None
    assert token_grid(64 * 80, 64, 80) == (64, 80) and token_grid(16 * 20, 64, 80) == (16, 20)


def test_blend_outputs():
    base = torch.zeros(1, 3, 2)
    one = torch.ones(1, 3, 2)
    two = 2 * torch.ones(1, 3, 2)
    out = blend_outputs(base, [(one, torch.tensor([[1.0, 0.5, 0.0]])), (two, torch.tensor([[0.0, 0.5, 0.0]]))])
    assert out[0, :, 0].tolist() == [1.0, 1.5, 0.0]
    assert blend_outputs(base, []) is base


def test_leak_is_outside_over_inside_past_the_margin():
    from multiconcept.samplers.scoped_lora.locality import leak

    mask = torch.zeros(8, 10)
    mask[2:5, 2:6] = 1.0
    change = torch.zeros(2, 8, 10)
    change[:, 2:5, 2:6] = 2.0  # inside
    change[:, 5, 2:6] = 7.0  # right below the box: within a margin of 1, ignored
    change[:, 7, 9] = 4.0  # far away
    outside = ~(torch.nn.functional.max_pool2d(mask[None, None], 3, 1, 1)[0, 0] > 0)
    assert leak(change, mask, 1) == pytest.approx((4.0 / int(outside.sum())) / 2.0)
    assert leak(change, mask, 0) > leak(change, mask, 1)
    with pytest.raises(ValueError):
        leak(change, torch.zeros(8, 10), 1)
