"""The ED-LoRA training objective and its regularisers, as functions of tensors (no ComfyUI).

* :func:`denoising_loss` — the noise-prediction MSE, optionally averaged inside the subject mask only.
* :func:`attention_outside_loss` — the share of each concept token's cross-attention that falls outside
  the subject mask (seed ``001``'s attention separation): zero when every map lies inside its mask.
* :func:`orthogonality_penalty` / :func:`keep_from_zero` — seed ``000``: the new concept's LoRA input
  subspace kept orthogonal to earlier concepts' (``Σ_i ‖A_g A_iᵀ‖²_F`` per layer), and its matrices kept off
  the trivial all-zero solution (MSE to the all-ones matrix).
* :func:`orthogonal_basis` — the frozen-basis variant: rows orthogonal to every earlier concept's rows.
* :func:`cap_norm_` — the embedding-norm cap applied after each optimiser step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` masks -> ``[B, h, w]`` by area averaging (soft edges where a pixel is partly inside)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=size, mode="area")[:, 0]


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of ``pred`` vs ``target`` (``[B, C, h, w]``).

    With ``mask`` (``[B, h, w]`` in [0, 1]) each image's error is averaged over its mask only (weighted by
    the mask), then over the batch; pixels where the mask is 0 contribute nothing, whatever they hold.
    A mask with nothing in it counts as a full mask (better than dividing by zero or skipping the image).
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=1)  # [B, h, w]
    if mask is None:
        return err.mean()
    m = mask.to(err).clamp(0, 1)
    empty = m.flatten(1).sum(1) <= 0
    if bool(empty.any()):
        m = torch.where(empty[:, None, None], torch.ones_like(m), m)
    per_image = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return per_image.mean()


def attention_outside_loss(maps: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean share of attention outside the mask.

    ``maps`` ``[B, N, h, w]``: attention probabilities of ``N`` concept tokens (head-averaged) over the
    ``h × w`` queries of one layer; ``mask`` ``[B, h, w]`` in [0, 1]. Each map is normalised to sum 1 over
    the pixels; the loss is ``mean_{b,n} Σ_p map[b,n,p] · (1 − mask[b,p])`` — 0 when all of every map lies
    in its mask, 1 when all of it lies outside.
    """
    a = maps.float().flatten(2)
    a = a / (a.sum(-1, keepdim=True) + eps)
    outside = 1.0 - mask.to(a).clamp(0, 1).flatten(1)[:, None, :]
    return (a * outside).sum(-1).mean()


def orthogonality_penalty(new_downs: list[torch.Tensor], old_downs: list[list[torch.Tensor]]) -> torch.Tensor:
    """``Σ_l Σ_i ‖A_g^l (A_i^l)ᵀ‖²_F``: overlap of the new concept's LoRA input rows with earlier concepts'.

    ``new_downs[l]`` is the new concept's ``[r, d]`` down matrix of layer ``l``; ``old_downs[l]`` the earlier
    concepts' down matrices of the same layer (``[r_i, d]`` each; layers an earlier concept lacks are empty
    lists). Zero exactly when every new row is orthogonal to every earlier row.
    """
    total = None
    for a_new, olds in zip(new_downs, old_downs, strict=True):
        for a_old in olds:
            term = (a_new.float().flatten(1) @ a_old.to(a_new).float().flatten(1).T).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        return new_downs[0].new_zeros(()) if new_downs else torch.zeros(())
    return total


def keep_from_zero(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Seed ``000``'s guard against the trivial solution of the orthogonality penalty: the mean squared
    difference of the matrices' entries from 1 (averaged over all entries of all matrices)."""
    total = sum((m.float() - 1.0).pow(2).sum() for m in matrices)
    count = sum(m.numel() for m in matrices)
    return total / max(count, 1)


def orthogonal_basis(rank: int, width: int, earlier: list[torch.Tensor], generator: torch.Generator,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """``[rank, width]`` rows orthonormal to each other and to the row space of ``earlier`` (``[r_i, width]``),
    times ``scale``: a frozen LoRA down matrix whose inputs no earlier concept reads (orthogonal adaptation),
    so the concepts' updates can be summed without interfering. Fails when the space is used up."""
    basis = None
    if earlier:
        stacked = torch.cat([e.float().flatten(1) for e in earlier], 0)
        q, _ = torch.linalg.qr(stacked.T)  # [width, k] orthonormal columns spanning the earlier rows
        basis = q
    used = 0 if basis is None else basis.shape[1]
    if used + rank > width:
        raise ValueError(f"no room for {rank} orthogonal rows in width {width}: {used} are used by earlier concepts")
    rows = torch.randn(width, rank, generator=generator)
    if basis is not None:
        rows = rows - basis @ (basis.T @ rows)
    q, _ = torch.linalg.qr(rows)
    return (q.T * scale).contiguous()


@torch.no_grad()
def cap_norm_(embedding: torch.Tensor, cap: float) -> None:
    """Scale, in place, each row of ``embedding`` (``[L, D]``) whose L2 norm exceeds ``cap`` back to ``cap``."""
    if cap <= 0:
        return
    norms = embedding.norm(dim=-1, keepdim=True)
    factor = torch.where(norms > cap, cap / norms.clamp_min(1e-12), torch.ones_like(norms))
    embedding.mul_(factor)
