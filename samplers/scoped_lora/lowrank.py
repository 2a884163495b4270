"""Low-rank adapter maths for scoped LoRA: pure torch, no ComfyUI.

A LoRA adds ``delta(x) = scale * up(mid(down(x)))`` to a layer's output, where ``down``/``up`` are the
two factors (``mid`` only for LoCon's Tucker-decomposed convolutions) and ``scale = strength * alpha /
rank`` (ComfyUI's convention; ``alpha`` missing means ``alpha = rank``). Merged into the weight that is
``W + scale * up @ mid @ down``; unmerged we keep it as two (or three) thin products so that each
concept's delta can be weighted per batch row and per position before it is added.

All concepts that adapt one layer are applied together: their ``down`` factors are stacked into one
``[R, in]`` matrix (``R`` = the sum of their ranks) and their scaled ``up`` factors side by side into one
``[out, R]`` matrix, so one layer call costs two thin matrix products whatever the number of concepts.
Each concept's weight (its mask value at that position, zero in rows it does not own) multiplies its own
block of the ``R`` intermediate channels in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LowRankFactors:
    """One concept's adapter for one layer (``up @ mid @ down`` scaled).

    Linear layers: ``down [r, in]``, ``up [out, r]``. Convolutions: ``down [r, in, kh, kw]`` (the layer's
    kernel; or ``[r, in, 1, 1]`` with ``mid [r, r, kh, kw]`` carrying the kernel), ``up [out, r, 1, 1]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def dense_delta(self, weight_shape) -> torch.Tensor:
        """``scale * up @ mid @ down`` as a dense tensor shaped like the layer's weight (float32 or wider)."""
        dtype = torch.promote_types(self.down.dtype, torch.float32)
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype)
        if self.mid is not None:
            mid = self.mid.to(dtype)  # [r, r, kh, kw]: compose down (pointwise) into the mid kernel
            down = torch.einsum("abhw,bi->aihw", mid, down.flatten(1))
        return (self.scale * (up @ down.flatten(1))).reshape(weight_shape)


def _cast(t: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype)


@dataclass
class LayerFactors:
    """Every concept's factors for one layer, stacked for one batched product.

    ``owners[i]`` is the concept index (into the run's concept list) of ``factors[i]``.
    ``conv`` holds ``(stride, padding, dilation)`` of the layer for convolutions, None for linear layers.
    """

    owners: tuple[int, ...]
    factors: tuple[LowRankFactors, ...]
    conv: tuple | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if len(self.owners) != len(self.factors) or not self.factors:
            raise ValueError("LayerFactors needs one owner per factor, and at least one factor")
        self.owners = tuple(self.owners)
        self.factors = tuple(self.factors)
        self.has_mid = any(f.mid is not None for f in self.factors)

    @property
    def total_rank(self) -> int:
        return sum(f.rank for f in self.factors)

    def stacked(self, device, dtype):
        """``(down [R, ...], scaled up [out, R, ...], owner [R])`` cast once per device/dtype; ``owner`` is the
        concept index (as in ``owners``) of each of the ``R`` intermediate channels."""
        key = (device, dtype)
        if key not in self._cache:
            wide = torch.promote_types(self.factors[0].down.dtype, torch.float32)  # scale folded in at >= fp32
            down = torch.cat([f.down.to(wide) for f in self.factors], 0)
            up = torch.cat([f.up.to(wide) * f.scale for f in self.factors], 1)
            owner = torch.cat(
                [torch.full((f.rank,), o, dtype=torch.long) for o, f in zip(self.owners, self.factors, strict=True)]
            )
            self._cache[key] = (
                down.to(device=device, dtype=dtype),
                up.to(device=device, dtype=dtype),
                owner.to(device),
            )
        return self._cache[key]

    def per_concept(self, device, dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``[(down, scaled up, mid), ...]`` per factor, cast once per device/dtype."""
        key = ("each", device, dtype)
        if key not in self._cache:
            self._cache[key] = [
                (_cast(f.down, device, dtype), _cast(f.up * f.scale, device, dtype), _cast(f.mid, device, dtype))
                for f in self.factors
            ]
        return self._cache[key]


# ------------------------------------------------------------------------------------------ products


def linear_delta(x: torch.Tensor, layer: LayerFactors, weights: torch.Tensor | None) -> torch.Tensor:
    """The summed, weighted LoRA deltas of a linear layer.

    ``x``        ``[B, N, in]`` (tokens) or ``[B, in]``.
    ``weights``  per concept (indexed like ``layer.owners``): ``[B, N, K]`` (tokens) or ``[B, K]``;
                 None = weight 1 everywhere.
    Returns ``[B, N, out]`` / ``[B, out]`` in ``x``'s dtype.
    """
    down, up, owner = layer.stacked(x.device, x.dtype)
    h = x @ down.flatten(1).t()  # [..., R]
    if weights is not None:
        h = h * weights.to(h.dtype).index_select(-1, owner)
    return h @ up.flatten(1).t()


def conv_delta(x: torch.Tensor, layer: LayerFactors, weights: torch.Tensor | None, out_hw) -> torch.Tensor:
    """The summed, weighted LoRA deltas of a 2-D convolution.

    ``x`` ``[B, C, H, W]``; ``weights`` ``[B, K, h, w]`` per concept at the output size ``out_hw`` (or None).
    """
    stride, padding, dilation = layer.conv
    if not layer.has_mid:
        down, up, owner = layer.stacked(x.device, x.dtype)
        h = F.conv2d(x, down, stride=stride, padding=padding, dilation=dilation)  # [B, R, h, w]
        if weights is not None:
            h = h * weights.to(h.dtype).index_select(1, owner)
        return F.conv2d(h, up)
    out = None
    for i, (down, up, mid) in enumerate(layer.per_concept(x.device, x.dtype)):
        if mid is None:
            h = F.conv2d(x, down, stride=stride, padding=padding, dilation=dilation)
        else:
            h = F.conv2d(F.conv2d(x, down), mid, stride=stride, padding=padding, dilation=dilation)
        if weights is not None:
            o = layer.owners[i]
            h = h * weights[:, o : o + 1].to(h.dtype)
        d = F.conv2d(h, up)
        out = d if out is None else out + d
    return out


def per_concept_linear(x: torch.Tensor, layer: LayerFactors) -> list[torch.Tensor]:
    """Each factor's own delta ``scale * up(down(x))`` (no weighting), e.g. for cross-attention keys."""
    down, up, owner = layer.stacked(x.device, x.dtype)
    h = x @ down.flatten(1).t()
    out, start = [], 0
    for f in layer.factors:
        end = start + f.rank
        out.append(h[..., start:end] @ up.flatten(1)[:, start:end].t())
        start = end
    return out


# ----------------------------------------------------------------------------------- masks and weights


def normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    """``[K, ...]`` concept weights divided by their sum where it exceeds 1.

    Where regions overlap, each concept then acts with its share (two full masks: half each); where they
    do not, weights are unchanged, so one concept with an all-ones mask acts exactly like its merged LoRA.
    """
    total = weights.sum(dim=0, keepdim=True)
    return torch.where(total > 1, weights / total.clamp(min=1e-12), weights)


def resize_area(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., h, w]`` by area averaging (adaptive pooling handles non-integer factors)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    out = F.adaptive_avg_pool2d(flat, size)
    return out.reshape(*lead, *size).to(masks.dtype)


def grid_sizes(height: int, width: int, levels: int = 8) -> list[tuple[int, int]]:
    """The feature-map sizes a UNet reaches from a ``height x width`` latent: halving, rounding up."""
    sizes = [(height, width)]
    for _ in range(levels):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """Which feature-map size ``(h, w)`` a sequence of ``tokens`` positions is (None if none fits)."""
    for h, w in grid_sizes(height, width):
        if h * w == tokens:
            return h, w
    return None


def blend_outputs(base: torch.Tensor, variants: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``base + sum_k w_k * (out_k - base)``: each variant's output where its weight is, base elsewhere.

    ``variants``: ``(out_k, w_k)`` with ``out_k`` shaped like ``base`` ``[B, N, D]`` and ``w_k`` ``[B, N]``
    (weights already normalised across variants).
    """
    out = base
    for variant, weight in variants:
        out = out + weight.to(base.dtype).unsqueeze(-1) * (variant - base)
    return out
