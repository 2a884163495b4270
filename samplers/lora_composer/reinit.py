"""LoRA-Composer's latent re-initialisation, pure torch (DESIGN.md §4 "LoRA-Composer").

Before sampling, one model pass on the starting noise shows where each concept's tokens already attend most.
For each concept, the box-sized window of its (token-summed) map with the largest total is found, and the
noise under that window is copied into the concept's box, so the concept starts where the noise already
favours it. Afterwards the whole noise is brought back to the original mean and standard deviation (scalar
statistics, as the official code). Windows are read from the original noise; a later concept overwrites an
earlier one where boxes overlap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def best_window(score: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the ``size`` window of ``score [h, w]`` with the largest sum."""
    bh, bw = size
    sums = F.conv2d(score[None, None].float(), torch.ones(1, 1, bh, bw, dtype=torch.float32, device=score.device))
    flat = int(sums.flatten().argmax())
    return flat // sums.shape[-1], flat % sums.shape[-1]


def reinitialise(noise: torch.Tensor, scores: list[torch.Tensor], boxes: list[tuple[int, int, int, int]]):
    """``noise [B, C, H, W]``; per concept ``scores [h, w]`` (its maps at one attention resolution) and its
    box ``(y0, y1, x0, x1)`` in that resolution's cells. Returns the new noise (same statistics)."""
    h, w = scores[0].shape if scores else noise.shape[-2:]
    sy, sx = noise.shape[-2] // h, noise.shape[-1] // w
    out = noise.clone()
    for score, (y0, y1, x0, x1) in zip(scores, boxes, strict=True):
        ry, rx = best_window(score, (y1 - y0, x1 - x0))
        patch = noise[..., ry * sy : (ry + y1 - y0) * sy, rx * sx : (rx + x1 - x0) * sx]
        out[..., y0 * sy : y1 * sy, x0 * sx : x1 * sx] = patch
    return (out - out.mean()) / out.std() * noise.std() + noise.mean()
