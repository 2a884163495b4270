"""OMG noise blending on small tensors: the blend equals the formula, masks' outside is the global prediction
bit for bit, the overlap policies behave as documented; attention boxes and latent crops."""

from __future__ import annotations

import pytest
import torch

from multiconcept.samplers.omg.blend import (
    POLICIES,
    blend_predictions,
    boxes_from_attention,
    concept_weights,
    crop_box,
    resize_masks,
)

B, C, H, W = 2, 4, 12, 16


def _preds(gen, n):
    return torch.randn(B, C, H, W, generator=gen), [torch.randn(B, C, H, W, generator=gen) for _ in range(n)]


def _soft_masks(gen, n, batch=False):
    """Soft masks that overlap, with a band of zeros (columns 12..15) that no mask reaches."""
    shape = (n, B, H, W) if batch else (n, H, W)
    m = torch.rand(*shape, generator=gen)
    m[..., :, 12:] = 0
    m[0, ..., :, :3] = 1.0  # full cells as well as fractional ones
    return m


def _formula(glob, concepts, masks, policy):
    """The blend written out from the documented weight formulas (products and sums over the concepts)."""
    n = masks.shape[0]
    if policy == "front_to_back":
        w = [masks[i] * torch.prod(1 - masks[:i], dim=0) if i else masks[0] for i in range(n)]
    else:
        total = masks.sum(dim=0)
        w = [torch.where(total > 1, masks[i] / total, masks[i]) for i in range(n)]
    w = torch.stack(w)
    expand = (lambda t: t[:, None, None]) if masks.ndim == 3 else (lambda t: t[:, :, None])
    w = expand(w)
    return glob * (1 - w.sum(0)) + sum(w[i] * concepts[i] for i in range(n))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("batch_masks", [False, True])
def test_blend_equals_the_formula(policy, n, batch_masks):
    gen = torch.Generator().manual_seed(n)
    glob, concepts = _preds(gen, n)
    masks = _soft_masks(gen, n, batch_masks)
    out = blend_predictions(glob, concepts, masks, policy)
    ref = _formula(glob, concepts, masks, policy)
    assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    assert (out - glob).abs().amax() > 0.1  # the concepts do change the result inside their masks


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_outside_all_masks_is_the_global_prediction_bitwise(policy, dtype):
    gen = torch.Generator().manual_seed(3)
    glob, concepts = _preds(gen, 3)
    glob, concepts = glob.to(dtype), [c.to(dtype) for c in concepts]
    glob[0, 0, 0, 15] = -0.0  # a signed zero would not survive "+ 0 * concept"
    masks = _soft_masks(gen, 3)
    out = blend_predictions(glob, concepts, masks, policy)
    outside = (masks == 0).all(dim=0)
    assert out.dtype == dtype
    assert torch.equal(out[..., outside], glob[..., outside])
    assert torch.signbit(out[0, 0, 0, 15])
    # and with no concept at all, the global prediction itself
    assert blend_predictions(glob, [], torch.zeros(0, H, W), policy) is glob


def test_front_to_back_front_concept_wins_where_its_mask_is_one():
    gen = torch.Generator().manual_seed(4)
    glob, (c0, c1) = _preds(gen, 2)
    masks = torch.zeros(2, H, W)
    masks[0, :, :8] = 1.0  # front concept: left half
    masks[1, :, 4:12] = 1.0  # behind it, overlapping columns 4..7
    masks[1, :, 12:] = 0.25  # a soft edge of the back concept alone
    out = blend_predictions(glob, [c0, c1], masks, "front_to_back")
    assert torch.equal(out[..., :8], c0[..., :8])  # front concept fully, also in the overlap
    assert torch.allclose(out[..., 8:12], c1[..., 8:12])  # the back concept where it is alone
    assert torch.allclose(out[..., 12:], 0.75 * glob[..., 12:] + 0.25 * c1[..., 12:])
    # order matters: listing concept 1 first puts it in front in the overlap
    swapped = blend_predictions(glob, [c1, c0], masks.flip(0), "front_to_back")
    assert torch.equal(swapped[..., 4:12], c1[..., 4:12]) and torch.equal(swapped[..., :4], c0[..., :4])
    # a soft front mask passes the rest on: w1 = m1 * (1 - m0)
    masks[0, :, :8] = 0.6
    w = concept_weights(masks, "front_to_back")
    assert torch.allclose(w[0, :, 4:8], torch.full((H, 4), 0.6))
    assert torch.allclose(w[1, :, 4:8], torch.full((H, 4), 0.4))


def test_normalised_halves_two_full_masks_and_keeps_single_masks():
    gen = torch.Generator().manual_seed(5)
    glob, (c0, c1) = _preds(gen, 2)
    masks = torch.zeros(2, H, W)
    masks[0, :, :8] = 1.0
    masks[1, :, 4:12] = 1.0
    masks[1, :, 12:] = 0.3
    out = blend_predictions(glob, [c0, c1], masks, "normalised")
    assert torch.allclose(out[..., 4:8], (c0[..., 4:8] + c1[..., 4:8]) / 2, atol=1e-6)  # overlap: halves
    assert torch.allclose(out[..., :4], c0[..., :4])
    assert torch.allclose(out[..., 12:], 0.7 * glob[..., 12:] + 0.3 * c1[..., 12:])
    # masks summing to at most 1 are left as they are
    soft = torch.stack([torch.full((H, W), 0.3), torch.full((H, W), 0.5)])
    assert torch.allclose(concept_weights(soft, "normalised"), soft)


@pytest.mark.parametrize("policy", POLICIES)
def test_weights_never_sum_above_one(policy):
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(5, 3, H, W, generator=gen)
    masks[:, :, :4] = 1.0  # five full masks on top of each other
    w = concept_weights(masks, policy)
    assert w.shape == masks.shape
    assert bool((w >= 0).all()) and bool((w.sum(0) <= 1 + 1e-6).all())
    assert torch.allclose(w.sum(0)[:, :4], torch.ones(3, 4, W))


def test_blend_rejects_bad_input():
    gen = torch.Generator().manual_seed(7)
    glob, concepts = _preds(gen, 2)
    masks = _soft_masks(gen, 2)
    with pytest.raises(ValueError, match="2 concept predictions but 3 masks"):
        blend_predictions(glob, concepts, torch.zeros(3, H, W))
    with pytest.raises(ValueError, match="resize_masks"):
        blend_predictions(glob, concepts, torch.zeros(2, H * 8, W * 8))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        blend_predictions(glob, concepts, torch.zeros(H, W))
    with pytest.raises(ValueError, match="batch rows"):
        blend_predictions(glob, concepts, torch.zeros(2, 3, H, W))
    with pytest.raises(ValueError, match="concept prediction 1"):
        blend_predictions(glob, [concepts[0], concepts[1][:, :2]], masks)
    with pytest.raises(ValueError, match="0..1"):
        blend_predictions(glob, concepts, masks * 2)
    with pytest.raises(ValueError, match="policy"):
        blend_predictions(glob, concepts, masks, "sum")


def test_resize_masks_area_average_and_aspect_check():
    m = torch.zeros(2, 64, 48, dtype=torch.bool)
    m[0, :32, :24] = True  # a quarter of the image
    m[1, :, :1] = True  # one pixel column: a fraction of a latent cell survives
    small = resize_masks(m, (8, 6))
    assert small.shape == (2, 8, 6) and small.dtype == torch.float32
    assert torch.equal(small[0, :4, :3], torch.ones(4, 3)) and small[0].sum() == 12
    assert torch.allclose(small[1, :, 0], torch.full((8,), 1 / 8))
    # a rounded latent size (1000x744 image -> 125x93 latent) is fine
    assert resize_masks(torch.ones(1, 1000, 744), (125, 93)).shape == (1, 125, 93)
    with pytest.raises(ValueError, match="64x48.*8x8"):
        resize_masks(m, (8, 8))


def _blob(h, w, cy, cx, sigma=1.5):
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def test_boxes_cover_the_peak_and_two_peaks_give_two_boxes():
    gen = torch.Generator().manual_seed(8)
    h, w = 16, 24
    # two "woman" tokens: each map is strong on its own person, weaker (but above threshold) on the other
    a = _blob(h, w, 5, 5) + 0.8 * _blob(h, w, 10, 18) + 0.05 * torch.rand(h, w, generator=gen)
    b = 0.8 * _blob(h, w, 5, 5) + _blob(h, w, 10, 18) + 0.05 * torch.rand(h, w, generator=gen)
    maps = torch.stack([a, b])
    boxes = boxes_from_attention(maps, threshold=0.5)
    assert len(boxes) == 2 and boxes[0] != boxes[1]
    for m, (x0, y0, x1, y1) in zip(maps, boxes, strict=True):
        py, px = divmod(int(m.argmax()), w)
        assert x0 <= px / w and (px + 1) / w <= x1 and y0 <= py / h and (py + 1) / h <= y1
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    # the component around the peak only: neither box reaches the other person
    assert boxes[0][2] < 18 / w and boxes[1][0] > 5 / w
    # a margin widens the box, clipped to the image
    wide = boxes_from_attention(maps, threshold=0.5, margin=0.1)
    assert wide[0][0] == max(0.0, boxes[0][0] - 0.1) and wide[0][2] == pytest.approx(boxes[0][2] + 0.1)
    # a single hot cell at the border still gives a box around it
    edge = torch.zeros(1, h, w)
    edge[0, 0, w - 1] = 1.0
    assert boxes_from_attention(edge) == [((w - 1) / w, 0.0, 1.0, 1 / h)]


def test_boxes_reject_bad_maps():
    with pytest.raises(ValueError, match=r"\[T, h, w\]"):
        boxes_from_attention(torch.rand(8, 8))
    with pytest.raises(ValueError, match="constant"):
        boxes_from_attention(torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="threshold"):
        boxes_from_attention(torch.rand(1, 8, 8), threshold=1.5)


def test_crop_box_covers_the_mask_and_is_a_multiple():
    gen = torch.Generator().manual_seed(9)
    for _ in range(50):
        hh, ww = 8 * int(torch.randint(2, 9, (1,), generator=gen)), 8 * int(torch.randint(2, 9, (1,), generator=gen))
        mask = torch.zeros(hh, ww)
        y, x = int(torch.randint(0, hh, (1,), generator=gen)), int(torch.randint(0, ww, (1,), generator=gen))
        dy, dx = (
            int(torch.randint(1, hh - y + 1, (1,), generator=gen)),
            int(torch.randint(1, ww - x + 1, (1,), generator=gen)),
        )
        mask[y : y + dy, x : x + dx] = 0.5
        y0, y1, x0, x1 = crop_box(mask, margin_cells=2, multiple=8)
        assert 0 <= y0 <= max(0, y - 2) and min(hh, y + dy + 2) <= y1 <= hh
        assert 0 <= x0 <= max(0, x - 2) and min(ww, x + dx + 2) <= x1 <= ww
        assert (y1 - y0) % 8 == 0 and (x1 - x0) % 8 == 0
    # a small mask gets a small crop; an empty one none
    mask = torch.zeros(64, 64)
    mask[30:33, 40:42] = 1
    assert crop_box(mask, margin_cells=2, multiple=8) == (28, 36, 37, 45)
    assert crop_box(torch.zeros(64, 64)) is None
    # a latent that is not a multiple: a crop reaching the full axis is the whole axis
    assert crop_box(torch.ones(20, 12), margin_cells=0, multiple=8) == (0, 20, 0, 12)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        crop_box(torch.ones(1, 8, 8))
