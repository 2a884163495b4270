"""Mix-of-Show regional cross-attention on small tensors: the fast path equals the formula written out."""

from __future__ import annotations

import pytest
import torch

from multiconcept.samplers.mixofshow.regional_attention import (
    layer_regions,
    region_shares,
    regional_attention,
    regional_attention_reference,
    sdpa_attention,
)
from multiconcept.samplers.regions.layout import box_mask

HEADS, DIM = 2, 8


def _qkv(gen, b, n, t):
    c = HEADS * DIM
    return (
        torch.randn(b, n, c, generator=gen),
        torch.randn(b, t, c, generator=gen),
        torch.randn(b, t, c, generator=gen),
    )


def _masks(height, width, boxes):
    return torch.stack([box_mask(b, height, width) for b in boxes])


# image 64x48 px; regions overlap in the middle; one is a soft (SAM-like) mask
BOXES = [(0, 0, 40, 48), (24, 8, 64, 40)]


@pytest.mark.parametrize("size", [(6, 8), (3, 4)])  # two attention resolutions of one layout
@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 3.0])])
def test_fast_path_equals_the_formula(size, weights):
    gen = torch.Generator().manual_seed(0)
    masks = _masks(48, 64, BOXES)
    masks[1] *= torch.linspace(0.2, 1.0, 64)[None, :]  # soft edges like a feathered SAM mask
    b, n = 4, size[0] * size[1]
    q, kg, vg = _qkv(gen, b, n, 77)
    # region contexts of different token lengths (77 and 154: a long region prompt)
    k1, v1 = torch.randn(b, 77, HEADS * DIM, generator=gen), torch.randn(b, 77, HEADS * DIM, generator=gen)
    k2, v2 = torch.randn(b, 154, HEADS * DIM, generator=gen), torch.randn(b, 154, HEADS * DIM, generator=gen)
    glob = sdpa_attention(q, kg, vg, HEADS)
    fast = regional_attention(q, glob, [k1, k2], [v1, v2], layer_regions(masks, size, weights), HEADS)
    ref = regional_attention_reference(q, kg, vg, [k1, k2], [v1, v2], masks, size, HEADS, weights)
    assert torch.allclose(fast, ref, atol=1e-5), (fast - ref).abs().max()
    assert (fast - glob).abs().amax() > 0.1  # the regions change the result


def test_replacement_inside_average_on_overlap_global_outside():
    gen = torch.Generator().manual_seed(1)
    size = (4, 8)  # feature map of a 64x32 image
    masks = _masks(32, 64, [(0, 0, 40, 32), (24, 0, 64, 32)])  # overlap in columns 3..4 at this size
    q, kg, vg = _qkv(gen, 2, 32, 77)
    k1, v1 = torch.randn(2, 77, 16, generator=gen), torch.randn(2, 77, 16, generator=gen)
    k2, v2 = torch.randn(2, 77, 16, generator=gen), torch.randn(2, 77, 16, generator=gen)
    glob = sdpa_attention(q, kg, vg, HEADS)
    only1 = sdpa_attention(q, k1, v1, HEADS)
    only2 = sdpa_attention(q, k2, v2, HEADS)
    out = regional_attention(q, glob, [k1, k2], [v1, v2], layer_regions(masks, size), HEADS).reshape(2, 4, 8, 16)
    g, o1, o2 = (t.reshape(2, 4, 8, 16) for t in (glob, only1, only2))
    assert torch.allclose(out[:, :, :3], o1[:, :, :3], atol=1e-6)  # region 1 alone: its own result
    assert torch.allclose(out[:, :, 5:], o2[:, :, 5:], atol=1e-6)  # region 2 alone
    assert torch.allclose(out[:, :, 3:5], (o1[:, :, 3:5] + o2[:, :, 3:5]) / 2, atol=1e-6)  # overlap: mean
    # nothing outside: a layout with one small box keeps the global result elsewhere
    masks = _masks(32, 64, [(0, 0, 16, 16)])
    out = regional_attention(q, glob, [k1], [v1], layer_regions(masks, size), HEADS).reshape(2, 4, 8, 16)
    assert torch.equal(out[:, 2:], g[:, 2:]) and torch.equal(out[:, :, 2:], g[:, :, 2:])
    assert torch.allclose(out[:, :2, :2], o1[:, :2, :2], atol=1e-6)


def test_rows_use_their_own_region_context():
    """Cond rows read the region prompt, uncond rows the region negative: keys differ per row."""
    gen = torch.Generator().manual_seed(2)
    masks = _masks(16, 16, [(0, 0, 16, 8)])
    q, kg, vg = _qkv(gen, 2, 4, 77)
    k_pos, v_pos = torch.randn(1, 77, 16, generator=gen), torch.randn(1, 77, 16, generator=gen)
    k_neg, v_neg = torch.randn(1, 77, 16, generator=gen), torch.randn(1, 77, 16, generator=gen)
    glob = sdpa_attention(q, kg, vg, HEADS)
    out = regional_attention(
        q, glob, [torch.cat([k_pos, k_neg])], [torch.cat([v_pos, v_neg])], layer_regions(masks, (2, 2)), HEADS
    )
    top = [0, 1]  # positions inside the box (top half of a 2x2 map)
    assert torch.allclose(out[0, top], sdpa_attention(q[:1], k_pos, v_pos, HEADS)[0, top], atol=1e-6)
    assert torch.allclose(out[1, top], sdpa_attention(q[1:], k_neg, v_neg, HEADS)[0, top], atol=1e-6)
    assert torch.equal(out[:, 2:], glob[:, 2:])


def test_masks_are_area_averaged_to_each_resolution():
    masks = _masks(16, 16, [(0, 0, 6, 16)])  # 6 of 16 px: cuts a cell at 4x4 (4 px cells) and at 2x2
    s4, o4 = region_shares(masks, (4, 4))
    s2, o2 = region_shares(masks, (2, 2))
    assert torch.allclose(s4[0].reshape(4, 4)[0], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert torch.allclose(s2[0].reshape(2, 2)[0], torch.tensor([0.75, 0.0]))
    assert torch.allclose(s4.sum(0) + o4, torch.ones(16)) and torch.allclose(s2.sum(0) + o2, torch.ones(4))


def test_no_region_positions_returns_the_global_result_itself():
    gen = torch.Generator().manual_seed(3)
    q, kg, vg = _qkv(gen, 1, 4, 77)
    glob = sdpa_attention(q, kg, vg, HEADS)
    assert regional_attention(q, glob, [kg], [vg], layer_regions(torch.zeros(1, 8, 8), (2, 2)), HEADS) is glob
