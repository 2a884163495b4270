"""The ED-LoRA training objective and its regularisers, as functions of tensors (no ComfyUI).

* :func:`denoising_loss` — the noise-prediction error as Mix-of-Show computes it: squared error summed over
  the latent channels, averaged over the mask's pixels (the subject, or the picture's own area).
* :func:`mixofshow_attention_loss` — Mix-of-Show's attention regulariser (``trainer_edlora.py``
  ``cal_attn_reg``): per resolution, each concept word's map divided by its batch-wide maximum, its mean
  outside the subject mask, weighted and summed over resolutions.
* :func:`attention_outside_loss` — the share of each concept token's cross-attention that falls outside
  the subject mask (seed ``001``'s attention separation): zero when every map lies inside its mask.
* :func:`orthogonality_penalty` / :func:`keep_from_zero` — seed ``000``: the new concept's LoRA input
  subspace kept orthogonal to earlier concepts' (``Σ_i ‖A_g A_iᵀ‖²_F`` per layer), and its matrices kept off
  the trivial all-zero solution (MSE to the all-ones matrix).
* :func:`orthogonal_basis` — the frozen-basis variant: rows orthogonal to every earlier concept's rows.
* :func:`cap_norm_` — the embedding-norm cap applied after each optimiser step (an option; Mix-of-Show freezes
  the embeddings instead once :func:`mean_norm` reaches its threshold).
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
    """Squared error of ``pred`` vs ``target`` (``[B, C, h, w]``), summed over the channels and averaged over the
    pixels of ``mask`` (``[B, h, w]`` in [0, 1]; all pixels without one), then over the batch.

    This is Mix-of-Show's ``((mse * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()`` with a one-channel mask
    (``trainer_edlora.py`` l. 251-252): ``C`` times the per-element mean, which is what the official weights of
    the regularisers (0.01) are measured against. A mask with nothing in it counts as a full mask.
    """
    err = (pred.float() - target.float()).pow(2).sum(dim=1)  # [B, h, w]
    if mask is None:
        return err.mean()
    m = mask.to(err).clamp(0, 1)
    empty = m.flatten(1).sum(1) <= 0
    if bool(empty.any()):
        m = torch.where(empty[:, None, None], torch.ones_like(m), m)
    per_image = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return per_image.mean()


def mixofshow_attention_loss(maps: dict[tuple[int, int], torch.Tensor], mask: torch.Tensor, weight: float,
                             full_identity: bool = False) -> torch.Tensor:  # fmt: skip
    """Mix-of-Show's attention regulariser (``trainer_edlora.py`` l. 263-313).

    ``maps[(h, w)]`` ``[B, N, h, w]``: the ``N`` concept words' cross-attention at one resolution, averaged over
    every head of every cross-attention layer of that resolution. ``mask`` ``[B, H, W]``: the subject masks at the
    latent's size (0 off the subject), taken to each resolution by nearest neighbour. The last word is the subject
    word (the one that starts as the class word), the others are "adjective" words. Per resolution: each word's
    map is divided by its maximum over the whole batch; the subject word's mean over the pixels outside the mask
    (with ``full_identity``: its mean squared difference from the mask) plus each adjective word's mean outside
    (averaged over the adjective words; Mix-of-Show has one), times ``weight``; summed over the resolutions.
    Zero when every map lies inside its mask. When the mask leaves no pixel outside at some resolution the
    official mean is NaN and the whole term is dropped for the step: then this returns 0.
    """
    total = mask.new_zeros((), dtype=torch.float32)
    for (h, w), m in sorted(maps.items()):
        gt = F.interpolate(mask[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        outside = gt == 0
        if not bool(outside.any()):
            return mask.new_zeros((), dtype=torch.float32)
        words = m.float()
        words = words / words.flatten(2).amax(dim=(0, 2)).clamp_min(1e-12)[None, :, None, None]
        subject = words[:, -1]
        if full_identity:
            loss_subject = (subject - gt).pow(2).mean()
        else:
            loss_subject = subject[outside].mean()
        term = loss_subject
        if words.shape[1] > 1:
            term = term + torch.stack([words[:, i][outside].mean() for i in range(words.shape[1] - 1)]).mean()
        total = total + weight * term
    return total


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


def mean_norm(embeddings: list[torch.Tensor]) -> float:
    """The mean L2 norm of every row (layer) of every concept word's ``[L, D]`` embedding: Mix-of-Show's
    ``token_embeds[concept_token_ids].norm(dim=-1).mean()`` (``train_edlora.py`` l. 140)."""
    rows = torch.cat([e.detach().float().reshape(-1, e.shape[-1]) for e in embeddings])
    return float(rows.norm(dim=-1).mean())
