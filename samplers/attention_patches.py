"""What every attention replace patch of the pack shares (ComfyUI glue)."""

from __future__ import annotations


def chained_attention(inner, q, k, v, extra_options):
    """The attention a replace patch builds on: the replace patch that was on the layer before ours
    (``inner``: another pack's, kept, never clobbered), else ComfyUI's own optimized attention."""
    if inner is not None:
        return inner(q, k, v, extra_options)
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(
        q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision")
    )
