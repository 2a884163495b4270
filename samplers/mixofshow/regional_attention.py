"""Regional cross-attention (Mix-of-Show), pure torch.

In one cross-attention layer, with ``G`` the layer's ordinary (global-prompt) attention output and ``R_r``
the output when the queries attend to region ``r``'s own prompt instead::

    out = (1 - c) * G + sum_r s_r * R_r
    c   = max_r m_r                              (how much of a position is inside any region)
    s_r = c * w_r * m_r / sum_q (w_q * m_q)      (region r's share there: overlaps averaged, weighted)

``m_r`` is region ``r``'s mask at the layer's resolution (area-averaged from image size, so a box edge that
cuts a feature cell gives a fraction) and ``w_r`` its weight (1 by default). With binary masks: the global
result outside every region, the region's own result inside one region, the (weighted) mean where regions
overlap — the rule of the original, which averages overlapping regions with equal weights.

Cost: the region results are computed only at the positions a region covers, all regions of a layer in one
attention call (queries gathered per region and stacked along the batch, padded to the longest region).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..scoped_lora.lowrank import resize_area

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on ``[B, N, heads * d]`` tensors (the layout of ComfyUI's attention functions)."""
    b, n, inner = q.shape
    d = inner // heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, inner)


def region_shares(
    masks: torch.Tensor, size: tuple[int, int], weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shares [R, h*w], outside [h*w])`` for masks ``[R, H, W]`` at a layer's feature size ``(h, w)``.

    ``shares[r]`` is ``s_r`` of the formula above and ``outside`` is ``1 - c``; at every position
    ``outside + shares.sum(0) == 1``.
    """
    m = resize_area(masks.float().clamp(0, 1), size).flatten(1)  # [R, N]
    w = torch.ones(m.shape[0]) if weights is None else weights.float()
    wm = w.to(m.device)[:, None] * m
    total = wm.sum(dim=0)
    cover = m.amax(dim=0) if m.shape[0] else torch.zeros(m.shape[1])
    shares = torch.where(total > 0, wm / total.clamp(min=1e-12) * cover, torch.zeros_like(wm))
    return shares, 1.0 - cover


def _repeat_to(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """Repeat a ``[B, T, C]`` key/value sequence to ``tokens`` (a multiple of ``T``): attention is unchanged,
    since every key keeps the same share of the softmax."""
    return t if t.shape[1] == tokens else t.repeat(1, tokens // t.shape[1], 1)


def stack_regions(per_region: list[torch.Tensor]) -> torch.Tensor:
    """``[R, B, T, C]`` from per-region ``[B, T_r, C]`` keys or values (token counts made equal by repetition)."""
    tokens = math.lcm(*(int(t.shape[1]) for t in per_region))
    return torch.stack([_repeat_to(t, tokens) for t in per_region])


@dataclass(frozen=True)
class LayerRegions:
    """The regions at one layer's resolution, laid out for one gathered attention call.

    ``shares [R, N]`` and ``outside [N]`` as in :func:`region_shares`; ``live`` the regions covering any
    position; ``index [R_live, L]`` each live region's positions, padded (with position 0) to the longest;
    ``weight [R_live, L]`` the region's share at each of them (0 on padding).
    """

    shares: torch.Tensor
    outside: torch.Tensor
    live: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor

    def to(self, device) -> LayerRegions:
        return LayerRegions(*(t.to(device) for t in (self.shares, self.outside, self.live, self.index, self.weight)))


def layer_regions(masks: torch.Tensor, size: tuple[int, int], weights: torch.Tensor | None = None) -> LayerRegions:
    shares, outside = region_shares(masks, size, weights)
    positions = [torch.nonzero(s > 0).flatten() for s in shares]
    live = [r for r, p in enumerate(positions) if p.numel()]
    longest = max((int(positions[r].numel()) for r in live), default=0)
    index = torch.zeros(len(live), longest, dtype=torch.long)
    weight = torch.zeros(len(live), longest)
    for i, r in enumerate(live):
        p = positions[r]
        index[i, : p.numel()] = p
        weight[i, : p.numel()] = shares[r, p]
    return LayerRegions(shares, outside, torch.tensor(live, dtype=torch.long), index, weight)


def regional_attention(
    q: torch.Tensor,
    global_out: torch.Tensor,
    region_k: torch.Tensor | list[torch.Tensor],
    region_v: torch.Tensor | list[torch.Tensor],
    regions: LayerRegions,
    heads: int,
    attention: Attention = sdpa_attention,
) -> torch.Tensor:
    """The formula above for one layer.

    ``q``                  ``[B, N, C]`` projected queries; ``global_out`` ``[B, N, C]`` the global result.
    ``region_k/region_v``  ``[R, B, T, C]`` (or a list of per-region ``[B, T_r, C]``): projected keys/values of
                           each region's prompt, row by row (the cond rows carry the region prompt, the uncond
                           rows its negative).
    ``regions``            from :func:`layer_regions` at this layer's size (``N`` positions).
    """
    rl, longest = regions.index.shape
    if rl == 0 or longest == 0:
        return global_out
    if isinstance(region_k, list):
        region_k, region_v = stack_regions(region_k), stack_regions(region_v)
    if rl < region_k.shape[0]:
        region_k, region_v = region_k.index_select(0, regions.live), region_v.index_select(0, regions.live)
    b, _, c = q.shape
    flat = regions.index.flatten()
    queries = q.index_select(1, flat).reshape(b, rl, longest, c).transpose(0, 1).reshape(rl * b, longest, c)
    tokens = region_k.shape[2]
    results = attention(
        queries,
        region_k.reshape(rl * b, tokens, -1).to(q.dtype),
        region_v.reshape(rl * b, tokens, -1).to(q.dtype),
        heads,
    ).reshape(rl, b, longest, -1)
    weighted = (results * regions.weight.to(results)[:, None, :, None]).transpose(0, 1).reshape(b, rl * longest, -1)
    out = global_out * regions.outside.to(global_out)[None, :, None]
    return out.index_add_(1, flat, weighted.to(out.dtype))


def regional_attention_reference(
    q: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    region_k: list[torch.Tensor],
    region_v: list[torch.Tensor],
    masks: torch.Tensor,
    size: tuple[int, int],
    heads: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The formula written out directly, every region over every position (for tests)."""
    m = resize_area(masks.float(), size).flatten(1)
    w = torch.ones(m.shape[0]) if weights is None else weights.float()
    g = sdpa_attention(q, k_global, v_global, heads)
    c = m.amax(dim=0)
    out = (1 - c)[None, :, None] * g
    total = (w[:, None] * m).sum(dim=0)
    for r in range(m.shape[0]):
        full = sdpa_attention(q, region_k[r], region_v[r], heads)
        share = torch.where(total > 0, c * w[r] * m[r] / total.clamp(min=1e-12), torch.zeros_like(c))
        out = out + share[None, :, None] * full
    return out
