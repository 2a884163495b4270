"""Layer-wise text context (Mix-of-Show's ED-LoRA): one encoding of the prompt per cross-attention layer.

Pure torch. The ComfyUI glue in ``model.py`` calls :func:`route_layer_context` from an
``attn2_patch``; everything here is checked on small tensors in the unit tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_CROSS_ATTENTION = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<num>\d+)|middle_block)\.\d+\.transformer_blocks\.(?P<depth>\d+)\.attn2$"
)


def cross_attention_order(diffusion_model: torch.nn.Module) -> dict[tuple[str, int, int], int]:
    """Each cross-attention layer's place in the UNet's order: ``(block, number, depth) -> index``.

    ``block`` is ``input``/``middle``/``output`` and ``number`` the block's position, as ComfyUI puts them in
    ``extra_options["block"]``; ``depth`` is the transformer block inside (``extra_options["block_index"]``).
    The order is the forward order — input blocks, middle, output blocks, and inside a spatial transformer its
    blocks in turn — which is how ED-LoRAs number their layer tokens: 16 on SD1.5 (one block per spatial
    transformer, so the index equals ComfyUI's ``transformer_index``) and 70 on SDXL (depths 2 and 10).
    """
    order: dict[tuple[str, int, int], int] = {}
    for name, _module in diffusion_model.named_modules():
        m = _CROSS_ATTENTION.match(name)
        if m is not None:
            key = (m.group("kind") or "middle", int(m.group("num") or 0), int(m.group("depth")))
            order.setdefault(key, len(order))
    return order


def cross_attention_paths(diffusion_model: torch.nn.Module) -> list[str]:
    """Module paths of the cross-attention layers in the order of :func:`cross_attention_order` (layer index)."""
    return [name for name, _ in diffusion_model.named_modules() if _CROSS_ATTENTION.match(name)]


def layer_index(extra_options: dict, order: dict | None) -> int | None:
    """The running cross-attention layer's index in ``order`` (see :func:`cross_attention_order`).

    Without an order (or for a layer it does not know) this is ComfyUI's ``transformer_index``, which
    counts spatial transformers and so equals the layer index on SD1.5-shaped models only.
    """
    block = extra_options.get("block")
    if order and block is not None:
        found = order.get((block[0], int(block[1]), int(extra_options.get("block_index", 0))))
        if found is not None:
            return found
    return extra_options.get("transformer_index")


@dataclass(frozen=True)
class LayerwiseContext:
    """Per-layer encodings of one prompt.

    ``layers``    ``[B, L, T, D]``: layer ``i`` of the UNet's cross-attention reads ``layers[:, i]``.
    ``reference`` ``[B, T, D]``: the ordinary conditioning tensor returned alongside (what ComfyUI carries
                  as ``cross_attn``); used to recognise the conditioning after other nodes touched it.
    """

    layers: torch.Tensor
    reference: torch.Tensor

    @property
    def num_layers(self) -> int:
        return int(self.layers.shape[1])

    def aligned_to(self, cross_attn: torch.Tensor | None) -> torch.Tensor | None:
        """The per-layer contexts that belong to ``cross_attn``, or None if it is not ours.

        ``cross_attn`` may be our reference itself, or the reference followed by more tokens
        (ComfyUI's ConditioningConcat appends the other prompt's tokens): then every layer gets the same
        tail appended. Anything else (an averaged or zeroed conditioning) is not ours.
        """
        if cross_attn is None:
            return None
        ref = self.reference
        if cross_attn is ref:
            return self.layers
        if cross_attn.ndim != 3 or cross_attn.shape[0] != ref.shape[0] or cross_attn.shape[2] != ref.shape[2]:
            return None
        t = ref.shape[1]
        if cross_attn.shape[1] < t:
            return None
        head = cross_attn[:, :t].to(device=ref.device, dtype=ref.dtype)
        if not torch.equal(head, ref):
            return None
        if cross_attn.shape[1] == t:
            return self.layers
        tail = cross_attn[:, t:].to(device=self.layers.device, dtype=self.layers.dtype)
        tail = tail[:, None].expand(-1, self.layers.shape[1], -1, -1)
        return torch.cat([self.layers, tail], dim=2)


def layer_for(transformer_index: int | None, num_layers: int) -> int | None:
    """Which layer slice a cross-attention call uses; None when the call is outside the layer range."""
    if transformer_index is None:
        return None
    if num_layers == 1:
        return 0
    if 0 <= transformer_index < num_layers:
        return int(transformer_index)
    return None


def _to_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat a ``[b, ...]`` tensor to ``rows`` rows the way ComfyUI batches conditionings."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:])
    reps = -(-rows // t.shape[0])
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:rows]


def route_layer_context(
    context: torch.Tensor, chunk_layers: list[torch.Tensor | None], transformer_index: int | None
) -> torch.Tensor:
    """Replace each chunk's rows of a batched cross-attention context with that chunk's layer slice.

    ``context``      ``[N * R, T, D]``: ComfyUI's batched context, ``N`` conds of ``R`` rows each, tokens
                     padded to a common length ``T`` by repetition.
    ``chunk_layers`` per cond: ``[Bc, L, Tc, D]`` per-layer contexts, or None to leave its rows alone.
    ``transformer_index`` which cross-attention layer is running (0..15 on SD1.5); chunks whose contexts
                     have one layer use it everywhere, layers outside the range are left alone.

    Rows of conds without layer-wise contexts (e.g. the negative prompt) are returned untouched, and if
    no cond has any, ``context`` itself is returned.
    """
    n = len(chunk_layers)
    if n == 0 or all(c is None for c in chunk_layers) or context.shape[0] % n != 0:
        return context
    rows = context.shape[0] // n
    out = None
    for j, layers in enumerate(chunk_layers):
        if layers is None:
            continue
        layer = layer_for(transformer_index, int(layers.shape[1]))
        if layer is None:
            continue
        ctx = layers[:, layer]  # [Bc, Tc, D]
        tokens = context.shape[1]
        if tokens % ctx.shape[1] != 0:
            continue  # not a repetition-padded length: leave this chunk as ComfyUI built it
        if tokens != ctx.shape[1]:
            ctx = ctx.repeat(1, tokens // ctx.shape[1], 1)
        if out is None:
            out = context.clone()
        out[j * rows : (j + 1) * rows] = _to_rows(ctx, rows).to(device=context.device, dtype=context.dtype)
    return context if out is None else out


class LayerwiseTable:
    """The layer-wise contexts of one sampling run, keyed by ComfyUI's per-cond uuid.

    Device/dtype copies are made once per run and reused for every step and layer.
    """

    def __init__(self, by_uuid: dict):
        self._by_uuid = dict(by_uuid)
        self._cast: dict = {}

    def __bool__(self) -> bool:
        return bool(self._by_uuid)

    def __len__(self) -> int:
        return len(self._by_uuid)

    def __contains__(self, uuid) -> bool:
        return uuid in self._by_uuid

    def num_layers(self) -> int:
        return max((int(t.shape[1]) for t in self._by_uuid.values()), default=0)

    def get(self, uuid, device, dtype) -> torch.Tensor | None:
        layers = self._by_uuid.get(uuid)
        if layers is None:
            return None
        key = (uuid, device, dtype)
        cast = self._cast.get(key)
        if cast is None:
            cast = layers.to(device=device, dtype=dtype)
            self._cast[key] = cast
        return cast

    def chunk_layers(self, uuids, device, dtype) -> list[torch.Tensor | None]:
        return [self.get(u, device, dtype) for u in uuids]

    # ComfyUI deep-copies model_options when a ModelPatcher is cloned; a run table is per-run data and
    # must not be duplicated (or dragged along) by such copies.
    def __deepcopy__(self, memo):
        return self
