"""What every attention replace patch of the pack shares (ComfyUI glue)."""

from __future__ import annotations

import torch

# ComfyUI's kernels that build the whole score matrix of a call when memory allows (the CPU default is
# sub-quadratic). Their cost grows faster than the rows: measured on 2 CPU cores at 4096 tokens inside the
# SD1.5 UNet, a 6-row call's attention took 3.5-4.5x a 2-row call's. Fused kernels (PyTorch SDPA, xformers,
# flash, sage) never hold the scores, so they get the whole batch at once.
SCORE_MATRIX_KERNELS = ("attention_basic", "attention_split", "attention_sub_quad")

# extra_options entry a patch sets when it hands its inner attention only some of the layer's query positions
# (a LongTensor of their indices), so a position-aware inner patch (LoRA-Composer's isolation) knows them
QUERY_POSITIONS_KEY = "multiconcept_query_positions"


def slice_rows(extra_options: dict, batch: int) -> int | None:
    """Rows per slice for a call of ``batch`` rows: one CFG pair's worth (the rows a plain sampling call
    holds), or None when the call is no bigger than that or its conds are unknown."""
    kinds = extra_options.get("cond_or_uncond") or []
    if len(kinds) <= 2 or batch % len(kinds):
        return None
    return 2 * (batch // len(kinds))


def chained_attention(inner, q, k, v, extra_options):
    """The attention a replace patch builds on: the replace patch that was on the layer before ours
    (``inner``: another pack's, kept, never clobbered), else ComfyUI's own optimized attention.

    ComfyUI's attention is computed in slices of one CFG pair's rows when the call batches more (OMG's
    stage 2, Concept Conductor's branches) and the kernel holds the score matrix: each row's attention is
    independent of the others, so it is the same maths, and a batched call's attention then costs (and
    holds) per row what plain sampling's does. Another pack's patch gets the whole batch (it may index it)."""
    if inner is not None:
        return inner(q, k, v, extra_options)
    import comfy.ldm.modules.attention as attention

    fn = attention.optimized_attention
    heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
    step = slice_rows(extra_options, q.shape[0])
    if step is None or fn.__name__ not in SCORE_MATRIX_KERNELS or not q.shape[0] == k.shape[0] == v.shape[0]:
        return fn(q, k, v, heads, attn_precision=precision)
    return torch.cat(
        [
            fn(q[i : i + step], k[i : i + step], v[i : i + step], heads, attn_precision=precision)
            for i in range(0, q.shape[0], step)
        ]  # fmt: skip
    )
