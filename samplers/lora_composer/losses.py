"""LoRA-Composer's attention losses, pure torch (DESIGN.md §4 "LoRA-Composer").

Maps are at one attention resolution ``(h, w)`` (the official code: latent/4), already averaged over heads
and layers. For concept ``c`` with box mask ``M`` (cells inside its box) and each of its tokens' maps ``A``:

* smoothing      ``Â = gauss(A)``: 3x3, sigma 0.5, reflect padding (the weights ``exp(-((x - mu) / 2 sigma)^2)``
                 of Attend-and-Excite, normalised).
* enhancement    ``w_e * max(0, 1 - mean(top_k(Â * M * G)))``, ``k = floor(ratio * |M|)`` (at least 1), ``G``
                 a Gaussian over the box's bounding rectangle (``exp(-(x^2 + y^2) / 2)`` on ``[-1, 1]^2``,
                 1 at the centre), zero outside the mask.
* fill           ``w_f * (mean_x |max_y(Â * M) - [x in box]| + mean_y |max_x(Â * M) - [y in box]|)``: every
                 column and row the box spans should hold a strong response (means over the whole width and
                 height, as the official code).
* region         ``w_r * mean(top_k(S[q in M, key not in M]))``: with ``S`` the self-attention (rows queries,
                 columns keys), what a concept's positions still take from outside its box.

The total is the plain sum over concepts and tokens, as in the official code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def smoothing_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The 2-D ``[size, size]`` kernel (Attend-and-Excite's formula, which puts the 2 inside the square)."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """``maps [..., h, w]`` smoothed (reflect padding keeps the border's mass); sigma 0 leaves them as they are."""
    if sigma <= 0 or size <= 1:
        return maps
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    pad = size // 2
    mode = "reflect" if min(shape[-2:]) > pad else "replicate"
    flat = F.pad(flat, (pad, pad, pad, pad), mode=mode)
    out = F.conv2d(flat, smoothing_kernel(size, sigma).to(flat)[None, None])
    return out.reshape(shape)


def bounding_rect(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` (end exclusive) of a ``[h, w]`` boolean mask, or None when it is empty."""
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    if ys.numel() == 0:
        return None
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def box_gaussian(mask: torch.Tensor) -> torch.Tensor:
    """``G [h, w]``: 1 at the centre of the mask's bounding rectangle, ``exp(-(x^2 + y^2) / 2)`` with ``x, y``
    running -1..1 across it, 0 outside the mask."""
    g = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rect = bounding_rect(mask)
    if rect is None:
        return g
    y0, y1, x0, x1 = rect
    y = torch.linspace(-1, 1, y1 - y0, device=mask.device)
    x = torch.linspace(-1, 1, x1 - x0, device=mask.device)
    inner = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / 2)
    g[y0:y1, x0:x1] = inner / inner.max()
    return g * mask


def top_k_count(cells: int, ratio: float) -> int:
    """``floor(ratio * cells)``, at least 1 (the official code takes the mean of nothing, NaN, on tiny boxes)."""
    return max(1, int(math.floor(ratio * cells)))


def enhancement_loss(maps: torch.Tensor, mask: torch.Tensor, ratio: float = 0.2, weight: float = 8.0) -> torch.Tensor:
    """Sum over tokens of ``weight * max(0, 1 - mean(top_k(maps * M * G)))``; ``maps [T, h, w]`` (smoothed)."""
    mask = mask.bool()
    k = top_k_count(int(mask.sum()), ratio)
    weighted = (maps * (box_gaussian(mask).to(maps) * mask)).flatten(1)
    fg = weighted.topk(min(k, weighted.shape[1]), dim=1).values.mean(dim=1)
    return (weight * (1 - fg).clamp(min=0)).sum()


def fill_loss(maps: torch.Tensor, mask: torch.Tensor, weight: float = 2.0) -> torch.Tensor:
    """Sum over tokens of ``weight * (mean_x |max_y(A M) - cols| + mean_y |max_x(A M) - rows|)``."""
    mask = mask.bool()
    inside = maps * mask.to(maps)
    cols = mask.any(dim=0).to(maps)
    rows = mask.any(dim=1).to(maps)
    dist_x = (inside.amax(dim=1) - cols).abs().mean(dim=-1)  # over the width
    dist_y = (inside.amax(dim=2) - rows).abs().mean(dim=-1)  # over the height
    return (weight * (dist_x + dist_y)).sum()


def region_loss(self_attention: torch.Tensor, mask: torch.Tensor, ratio: float = 0.2, weight: float = 10.0):
    """``weight * mean(top_k(S[q in M, key not in M]))``; ``self_attention [N, N]`` (queries x keys) or
    ``[Nq, N]`` already restricted to the mask's queries, ``mask`` ``[h, w]`` or ``[N]``."""
    inside = mask.bool().flatten()
    rows = self_attention if self_attention.shape[0] != inside.numel() else self_attention[inside]
    outside = rows[:, ~inside].flatten()
    if outside.numel() == 0:
        return self_attention.sum() * 0
    k = top_k_count(int(inside.sum()), ratio)
    return weight * outside.topk(min(k, outside.numel())).values.mean()


def composer_loss(token_maps, masks, self_attention=None, *, ratio=0.2, enhancement=8.0, fill=2.0, region=10.0,
                  smooth_sigma=0.5):  # fmt: skip
    """The total loss of one step: ``token_maps`` a list per concept of ``[T_c, h, w]`` (unsmoothed),
    ``masks [C, h, w]`` boolean, ``self_attention`` ``[N, N]`` (or None: no region term). Returns
    ``(total, parts)`` with ``parts`` the per-concept terms (floats, for the log and the preview)."""
    total = None
    parts = []
    for c, maps in enumerate(token_maps):
        smoothed = smooth(maps, sigma=smooth_sigma)
        terms = {}
        if enhancement:
            terms["enhancement"] = enhancement_loss(smoothed, masks[c], ratio, enhancement)
        if fill:
            terms["fill"] = fill_loss(smoothed, masks[c], fill)
        if region and self_attention is not None:
            terms["region"] = region_loss(self_attention, masks[c], ratio, region)
        for t in terms.values():
            total = t if total is None else total + t
        parts.append({k: float(v.detach()) for k, v in terms.items()})
    if total is None:
        total = torch.zeros(())
    return total, parts


def step_sizes(steps: int, base: float = 20.0) -> torch.Tensor:
    """The official step size per denoising step: ``base * sqrt(linspace(1, 0.5, steps))``."""
    return base * torch.linspace(1.0, 0.5, steps, dtype=torch.float64).sqrt()
