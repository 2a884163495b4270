"""Locality (DESIGN.md §6): how much of a concept's effect lands outside its region. Pure torch.

``leak = mean |change| outside the region, past a margin / mean |change| inside the region``, where the
change is the model output (or the image) with the concept's adapter minus without it. Merged LoRAs act
everywhere (leak near 1); a scoped adapter should be far below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def leak(change: torch.Tensor, mask: torch.Tensor, margin: int) -> float:
    """``change`` ``[..., H, W]`` (batch/channel dims are averaged), ``mask`` ``[H, W]`` (> 0.5 = inside)."""
    m = (mask > 0.5).float()[None, None]
    grown = F.max_pool2d(m, 2 * margin + 1, stride=1, padding=margin)[0, 0] > 0
    inside = m[0, 0] > 0
    if not inside.any() or grown.all():
        raise ValueError("the region is empty, or covers the whole picture once grown by the margin")
    d = change.detach().abs().float()
    d = d.mean(dim=tuple(range(d.ndim - 2))) if d.ndim > 2 else d
    return float(d[~grown].mean() / d[inside].mean().clamp(min=1e-12))
