"""Layout alignment (Concept Conductor): every branch's self-attention keys at one up-path layer pulled
toward the reference's by a gradient step on the shared latent. Pure torch.

The official loss, per alignment layer: for each branch ``b`` (the base branch, then each concept's)
``L_b = sum over images of mean over tokens and channels of (K_b - K_ref)^2`` (optionally only on the
reference's foreground tokens), ``L = L_base + factor * mean_i L_concept_i``; layers are averaged. The latent
then moves by ``weight * dL/dz`` on the variance-preserving latent ``z`` (see ``latent_step``).
"""

from __future__ import annotations

import torch


def branch_loss(keys: torch.Tensor, reference: torch.Tensor, foreground: torch.Tensor | None = None) -> torch.Tensor:
    """``keys`` ``[B, T, C]`` against ``reference`` ``[B or 1, T, C]``: squared error (times the ``[T]`` or
    ``[B, T]`` foreground weights when given), summed over the images, averaged over tokens and channels."""
    err = (keys.float() - reference.detach().float()) ** 2
    if foreground is not None:
        fg = foreground.to(err)
        err = err * (fg.unsqueeze(-1) if fg.ndim == err.ndim - 1 else fg.view(1, -1, 1))
    return err.sum(dim=0).mean()


def layout_loss(base: list[torch.Tensor], concepts: list[list[torch.Tensor]], reference: list[torch.Tensor],
                concept_factor: float = 1.0, foreground: list[torch.Tensor | None] | None = None) -> torch.Tensor:  # fmt: skip
    """The alignment loss over the alignment layers.

    ``base[l]``: the base branch's keys at layer ``l``; ``concepts[i][l]``: concept ``i``'s; ``reference[l]``:
    the reference's. With no concepts the loss is the base branch's alone."""
    per_layer = []
    for layer, ref in enumerate(reference):
        fg = foreground[layer] if foreground is not None else None
        loss = branch_loss(base[layer], ref, fg)
        if concepts:
            loss = loss + concept_factor * torch.stack([branch_loss(c[layer], ref, fg) for c in concepts]).mean()
        per_layer.append(loss)
    return torch.stack(per_layer).mean()


def latent_step(grad: torch.Tensor, sigma: float, weight: float) -> torch.Tensor:
    """The move of ComfyUI's latent ``x`` equal to the official ``z -= weight * dL/dz`` on the
    variance-preserving latent ``z = x / sqrt(sigma^2 + 1)``: ``dL/dz = sqrt(s) dL/dx`` and ``dx = sqrt(s) dz``
    with ``s = sigma^2 + 1``, so ``dx = -weight * s * dL/dx``."""
    return -weight * (sigma**2 + 1.0) * grad
