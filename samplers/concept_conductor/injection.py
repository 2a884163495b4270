"""Concept injection (Concept Conductor): the base branch's attention output replaced by a concept branch's
inside that concept's mask. Pure torch.

Applied to every attention output (after the output projection, before the residual add) of the UNet's
up path. Concepts are applied in stack order, so where two masks overlap the later concept's output is kept,
as in the official code. With 0/1 masks the result is exactly the concept's output inside and exactly the
base's outside (``torch.where``, no blending arithmetic).
"""

from __future__ import annotations

import torch


def inject(base: torch.Tensor, concepts: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """``base`` ``[B, T, C]`` with concept ``i``'s ``[B, T, C]`` output wherever ``masks[:, i]`` is on.

    ``masks``: ``[B, N, T]`` or ``[N, T]`` (broadcast over the rows), boolean or 0/1, one per concept.
    """
    if masks.ndim == 2:
        masks = masks.unsqueeze(0).expand(base.shape[0], -1, -1)
    if masks.shape[1] != len(concepts) or masks.shape[-1] != base.shape[1]:
        raise ValueError(
            f"inject: {len(concepts)} concept outputs of {base.shape[1]} tokens, masks {tuple(masks.shape)}"
        )
    out = base
    for i, concept in enumerate(concepts):
        on = masks[:, i].to(device=base.device).bool().unsqueeze(-1)  # [B, T, 1]
        out = torch.where(on, concept.to(base.dtype), out)
    return out
