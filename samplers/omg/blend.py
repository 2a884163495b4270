"""OMG noise blending and its mask helpers, pure torch (no ComfyUI).

From the blend's start step on, every step predicts the global noise ``G`` (base model, class-words prompt,
stage-1 layout replayed) and each concept's noise ``C_i`` (its adapter, its prompt), and combines them::

    out = (1 - sum_i w_i) * G + sum_i w_i * C_i

with per-position weights ``w_i`` from the concept masks ``m_i`` (0..1, at latent size) and an overlap policy:

* ``front_to_back``: concept 0 is in front. It takes what its mask covers, and each later concept gets only
  what the earlier ones left: ``w_i = m_i * prod_{j<i} (1 - m_j)``. The sum ``1 - prod_j (1 - m_j)`` never
  exceeds 1. Use it when one concept occludes another (a person holding a pet).
* ``normalised``: where the masks' sum exceeds 1, each concept gets its share ``m_i / sum_j m_j``; elsewhere
  ``w_i = m_i``. Two full masks get half each.

Outside every mask all ``w_i`` are exactly 0 and the result *is* ``G``, bit for bit. The official code
instead adds the overlapping concepts' noises (weight 2 where two masks meet) and binarises the masks.

The blend is linear with the same weights for every row, so blending the conditional and unconditional
predictions and then applying CFG gives the same result as blending the CFG outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Policy = Literal["front_to_back", "normalised"]
POLICIES: tuple[str, ...] = ("front_to_back", "normalised")


def _check_masks(masks: torch.Tensor) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor) or masks.ndim not in (3, 4):
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"OMG masks must be a tensor [N, H, W] or [N, B, H, W]; got {shape}")
    m = masks.float() if not masks.is_floating_point() else masks
    if m.numel() and not bool(((m >= 0) & (m <= 1)).all()):
        raise ValueError("OMG masks must hold values in 0..1 (no NaN); got values outside that range")
    return m


def concept_weights(masks: torch.Tensor, policy: Policy = "front_to_back") -> torch.Tensor:
    """The blend weights ``w_i`` (same shape as ``masks``) for masks ``[N, H, W]`` or ``[N, B, H, W]``.

    See the module docstring for the two policies. At every position ``0 <= sum_i w_i <= 1``, and the
    weights are exactly 0 wherever every mask is 0.
    """
    m = _check_masks(masks)
    if policy == "front_to_back":
        weights = torch.empty_like(m)
        left = torch.ones_like(m[0]) if m.shape[0] else None  # what the concepts in front left uncovered
        for i in range(m.shape[0]):
            weights[i] = m[i] * left
            left = left * (1 - m[i])
        return weights
    if policy == "normalised":
        total = m.sum(dim=0, keepdim=True)
        scale = torch.where(total > 1, 1 / total.clamp(min=1), torch.ones_like(total))
        return m * scale
    raise ValueError(f"unknown OMG overlap policy {policy!r}; choose one of {', '.join(POLICIES)}")


def blend_predictions(
    global_pred: torch.Tensor,
    concept_preds: Sequence[torch.Tensor],
    masks: torch.Tensor,
    policy: Policy = "front_to_back",
) -> torch.Tensor:
    """``(1 - sum w) * global + sum w_i * concept_i``. Predictions are ``[B, C, H, W]``, and masks are
    ``[N, H, W]`` (shared by the batch) or ``[N, B, H, W]``, in 0..1 at the predictions' size.

    Where no mask reaches, the global prediction is returned unchanged (bitwise). The maths runs in the
    predictions' dtype.
    """
    if global_pred.ndim != 4:
        raise ValueError(f"OMG global prediction must be [B, C, H, W]; got {tuple(global_pred.shape)}")
    m = _check_masks(masks)
    if len(concept_preds) != m.shape[0]:
        raise ValueError(f"OMG blend got {len(concept_preds)} concept predictions but {m.shape[0]} masks")
    b, _, h, w = global_pred.shape
    for i, pred in enumerate(concept_preds):
        if tuple(pred.shape) != tuple(global_pred.shape):
            raise ValueError(
                f"OMG concept prediction {i} has shape {tuple(pred.shape)}, "
                f"the global prediction {tuple(global_pred.shape)}"
            )
    if tuple(m.shape[-2:]) != (h, w):
        raise ValueError(
            f"OMG masks are {m.shape[-2]}x{m.shape[-1]} but the predictions are {h}x{w}; "
            "resize them to latent size first (resize_masks)"
        )
    if m.ndim == 4 and m.shape[1] not in (1, b):
        raise ValueError(f"OMG masks are given for {m.shape[1]} batch rows but the predictions have {b}")
    if not concept_preds:
        return global_pred

    weights = concept_weights(m, policy).to(device=global_pred.device, dtype=global_pred.dtype)
    # [N, H, W] -> [N, 1, 1, H, W]; [N, B, H, W] -> [N, B, 1, H, W]: broadcast over channels (and batch)
    weights = weights.unsqueeze(1 if weights.ndim == 3 else 2)
    if weights.ndim == 4:
        weights = weights.unsqueeze(1)
    total = weights.sum(dim=0)
    out = global_pred * (1 - total)
    for wi, pred in zip(weights, concept_preds, strict=True):
        out = out + wi * pred
    outside = (weights == 0).all(dim=0)  # no concept reaches: keep the global prediction itself
    return torch.where(outside, global_pred, out)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks ``[..., H, W]`` -> ``[..., h, w]`` (float) by area averaging (``adaptive_avg_pool2d``).

    When downscaling (image-size SAM masks to latent size), each latent cell gets the fraction of its area
    that the mask covers, so soft edges survive. Upscaling (rare) repeats cells the same way. A ValueError
    is raised if the two aspect ratios differ by more than one target cell: that is a mask made for another
    picture, not a rounding difference.
    """
    if not isinstance(masks, torch.Tensor) or masks.ndim < 2:
        raise ValueError("resize_masks needs a tensor [..., H, W]")
    big_h, big_w = int(masks.shape[-2]), int(masks.shape[-1])
    h, w = int(size[0]), int(size[1])
    if min(big_h, big_w, h, w) < 1:
        raise ValueError(f"resize_masks: empty size, masks {big_h}x{big_w} -> {h}x{w}")
    if abs(big_w * h / big_h - w) > 1 or abs(big_h * w / big_w - h) > 1:
        raise ValueError(
            f"masks of {big_h}x{big_w} (HxW) do not fit a {h}x{w} latent: the aspect ratios differ by more "
            "than one latent cell (were the masks made for another image size?)"
        )
    m = masks.float() if not masks.is_floating_point() else masks
    if (big_h, big_w) == (h, w):
        return m
    lead = m.shape[:-2]
    out = F.adaptive_avg_pool2d(m.reshape(-1, 1, big_h, big_w), (h, w))
    return out.reshape(*lead, h, w)


def _peak_component(region: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
    """The 8-connected component of ``region`` [T, h, w] (bool) that contains each map's peak."""
    t, h, w = region.shape
    comp = torch.zeros_like(region)
    comp.view(t, -1)[torch.arange(t), peaks] = True
    while True:
        grown = (F.max_pool2d(comp[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0) & region
        if torch.equal(grown, comp):
            return comp
        comp = grown


def boxes_from_attention(
    maps: torch.Tensor, threshold: float = 0.5, margin: float = 0.0
) -> list[tuple[float, float, float, float]]:
    """One box ``(x0, y0, x1, y1)``, in fractions of the image, per attention map ``[T, h, w]`` (one map per
    word, e.g. a class word's cross-attention averaged over heads, layers and steps).

    Each map is min-max normalised to 0..1. Cells at or above ``threshold`` are kept, and the box is the
    bounding box of the **connected component (8-neighbour) that contains the map's peak**. Strong responses
    elsewhere (the other person of a same-class pair) do not widen it. The box always covers the peak cell.
    ``margin`` (a fraction of the image) is added on each side, clipped to the image.
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
        raise ValueError("boxes_from_attention needs maps [T, h, w] (one map per word)")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"boxes_from_attention: threshold must be in 0..1, got {threshold}")
    if margin < 0:
        raise ValueError(f"boxes_from_attention: margin must be >= 0, got {margin}")
    t, h, w = maps.shape
    if t == 0:
        return []
    flat = maps.detach().float().reshape(t, -1)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("boxes_from_attention: the attention maps hold NaN or inf")
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    flat_maps = (high - low).squeeze(1) <= 0
    if bool(flat_maps.any()):
        raise ValueError(f"boxes_from_attention: map(s) {flat_maps.nonzero().flatten().tolist()} are constant")
    norm = (flat - low) / (high - low)
    region = (norm >= threshold).reshape(t, h, w)
    comp = _peak_component(region, norm.argmax(dim=1))
    boxes = []
    for c in comp:
        rows = c.any(dim=1).nonzero().flatten()
        cols = c.any(dim=0).nonzero().flatten()
        y0, y1 = rows[0].item() / h, (rows[-1].item() + 1) / h
        x0, x1 = cols[0].item() / w, (cols[-1].item() + 1) / w
        boxes.append((max(0.0, x0 - margin), max(0.0, y0 - margin), min(1.0, x1 + margin), min(1.0, y1 + margin)))
    return boxes


def _snap(lo: int, hi: int, length: int, multiple: int) -> tuple[int, int]:
    """Widen ``[lo, hi)`` to a multiple of ``multiple`` (or the whole axis), kept inside ``[0, length)``."""
    size = -(-(hi - lo) // multiple) * multiple
    if size >= length:
        return 0, length
    start = lo - (size - (hi - lo)) // 2  # grow evenly on both sides, then slide back inside the latent
    start = min(max(start, 0, hi - size), lo, length - size)
    return start, start + size


def crop_box(mask: torch.Tensor, margin_cells: int = 2, multiple: int = 8) -> tuple[int, int, int, int] | None:
    """The latent crop ``(y0, y1, x0, x1)`` (end-exclusive) for a concept prediction on its mask only.

    It is the bounding box of the mask's non-zero cells, plus ``margin_cells`` on every side, widened to a
    multiple of ``multiple`` cells so the UNet's down-sampling stages divide it evenly (8 for SD1.5/SDXL
    latents), and kept inside the latent. On an axis where that would reach the full latent size, the crop is
    the whole axis (a multiple only if the latent is). The crop always covers the mask. Returns None for an
    empty mask.
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ValueError("crop_box needs one mask [H, W]")
    if margin_cells < 0 or multiple < 1:
        raise ValueError(f"crop_box: margin_cells must be >= 0 and multiple >= 1; got {margin_cells}, {multiple}")
    on = mask > 0
    if not bool(on.any()):
        return None
    big_h, big_w = on.shape
    rows = on.any(dim=1).nonzero().flatten()
    cols = on.any(dim=0).nonzero().flatten()
    y0, y1 = max(0, rows[0].item() - margin_cells), min(big_h, rows[-1].item() + 1 + margin_cells)
    x0, x1 = max(0, cols[0].item() - margin_cells), min(big_w, cols[-1].item() + 1 + margin_cells)
    y0, y1 = _snap(y0, y1, big_h, multiple)
    x0, x1 = _snap(x0, x1, big_w, multiple)
    return y0, y1, x0, x1
