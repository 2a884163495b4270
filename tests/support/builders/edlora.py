"""Builds ED-LoRA files with the official Mix-of-Show layout and seeded random values (pure torch)."""

from __future__ import annotations

import torch

SD15_TE_MODULES = [
    f"text_model.encoder.layers.{i}.self_attn.{p}"
    for i in range(12)
    for p in ("q_proj", "k_proj", "v_proj", "out_proj")
]


def sd15_transformer_blocks() -> list[str]:
    """Diffusers names of SD1.5's 16 transformer blocks in Mix-of-Show's layer order."""
    blocks = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in range(3) for a in range(2)]
    blocks.append("mid_block.attentions.0.transformer_blocks.0")
    blocks += [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in range(1, 4) for a in range(3)]
    return blocks


def sd15_unet_modules(channels_of=None, context_dim: int = 768) -> dict[str, tuple[int, int]]:
    """``{module: (out_features, in_features)}`` for to_q/k/v/out.0 of attn1 and attn2 of all 16 blocks.

    ``channels_of(block_name)`` gives the block's width (SD1.5: 320/640/1280); default 320 everywhere,
    which is the width of the test checkpoint.
    """
    return attention_modules(sd15_transformer_blocks(), channels_of or (lambda block: 320), context_dim)


def attention_modules(blocks, channels_of, context_dim: int) -> dict[str, tuple[int, int]]:
    """The attention projections an ED-LoRA's UNet LoRA covers, for each transformer block of ``blocks``."""
    out = {}
    for block in blocks:
        c = channels_of(block)
        for attn in ("attn1", "attn2"):
            kv_in = context_dim if attn == "attn2" else c
            out[f"{block}.{attn}.to_q"] = (c, c)
            out[f"{block}.{attn}.to_k"] = (c, kv_in)
            out[f"{block}.{attn}.to_v"] = (c, kv_in)
            out[f"{block}.{attn}.to_out.0"] = (c, c)
    return out


def sd15_te_modules() -> dict[str, tuple[int, int]]:
    return {m: (768, 768) for m in SD15_TE_MODULES}


def clip_te_modules(layers: int, width: int) -> dict[str, tuple[int, int]]:
    """q/k/v/out projections of a CLIP text model's ``layers`` layers (diffusers names, as LoRA'd by the
    trainers: every Linear of each CLIPAttention). CLIP-L: 12 layers of 768; CLIP-G: 32 of 1280."""
    return {
        f"text_model.encoder.layers.{i}.self_attn.{p}": (width, width)
        for i in range(layers)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    }


# SDXL's transformer depth per attention-holding block (diffusers names) and its channel widths.
SDXL_DEPTHS = {"down_blocks.1": 2, "down_blocks.2": 10, "mid_block": 10, "up_blocks.0": 10, "up_blocks.1": 2}
SDXL_CHANNELS = {
    "down_blocks.1": 640,
    "down_blocks.2": 1280,
    "mid_block": 1280,
    "up_blocks.0": 1280,
    "up_blocks.1": 640,
}


def sdxl_transformer_blocks() -> list[str]:
    """Diffusers names of SDXL's 70 transformer blocks in Concept Conductor's layer order.

    That order is how Concept Conductor's SDXL trainer and pipelines number the 70 layer tokens: a recursive
    walk over ``down_blocks``, then ``mid_block``, then ``up_blocks``, counting each ``attn2`` it meets
    (``mixofshow/models/edlora_sdxl.py: revise_edlora_unet_attention_forward``): per block its attentions in
    turn, per attention its transformer blocks in turn.
    """
    blocks = []
    for block, depth in SDXL_DEPTHS.items():
        attentions = 1 if block == "mid_block" else 3 if block.startswith("up_blocks") else 2
        blocks += [f"{block}.attentions.{a}.transformer_blocks.{t}" for a in range(attentions) for t in range(depth)]
    return blocks


def sdxl_unet_modules(channels_of=None, context_dim: int = 2048) -> dict[str, tuple[int, int]]:
    """``{module: (out_features, in_features)}`` for to_q/k/v/out.0 of attn1 and attn2 of all 70 SDXL blocks.

    ``channels_of(block_name)`` gives the block's width; default SDXL's (640 / 1280).
    """
    channels_of = channels_of or (lambda block: SDXL_CHANNELS[block.split(".attentions")[0]])
    return attention_modules(sdxl_transformer_blocks(), channels_of, context_dim)


def lora_tree(modules: dict[str, tuple[int, int]], rank: int, gen: torch.Generator, scale: float) -> dict:
    tree = {}
    for name, (out_f, in_f) in modules.items():
        tree[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * scale
        tree[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * scale
    return tree


def official_edlora(
    words=("<cat1>", "<cat2>"),
    unet_modules=None,
    te_modules=None,
    rank: int = 4,
    seed: int = 0,
    layers: int = 16,
    lora_scale: float = 0.05,
    sdxl: bool = False,
    te2_modules=None,
    te2_rank: int | None = None,
    unet_rank: int | None = None,
) -> dict:
    """The dict Mix-of-Show saves (``{'params': {...}}``), with seeded random tensors.

    ``sdxl=True``: the layout of Concept Conductor's SDXL trainer (``EDLoRA.delta_state_dict``): 70 layer
    tokens per word in ``new_concept_embedding`` ([70, 768], CLIP-L) and ``new_concept_embedding_2``
    ([70, 1280], CLIP-G), LoRA in ``text_encoder`` (CLIP-L), ``text_encoder_2`` (CLIP-G) and ``unet``
    (defaults: the real SDXL modules; the trainer's own ranks are 4 / 32 / 32).
    """
    gen = torch.Generator().manual_seed(seed)
    if unet_modules is None:
        unet_modules = sdxl_unet_modules() if sdxl else sd15_unet_modules()
    te_modules = sd15_te_modules() if te_modules is None else te_modules
    if sdxl:
        layers = 70
    params = {
        "new_concept_embedding": {w: torch.randn(layers, 768, generator=gen) * 0.02 for w in words},
        "text_encoder": lora_tree(te_modules, rank, gen, lora_scale),
        "unet": lora_tree(unet_modules, unet_rank or rank, gen, lora_scale),
    }
    if sdxl:
        params["new_concept_embedding_2"] = {w: torch.randn(layers, 1280, generator=gen) * 0.02 for w in words}
        te2_modules = clip_te_modules(32, 1280) if te2_modules is None else te2_modules
        params["text_encoder_2"] = lora_tree(te2_modules, te2_rank or rank, gen, lora_scale)
    return {"params": params}


def save_official_edlora(path, **kwargs) -> dict:
    data = official_edlora(**kwargs)
    torch.save(data, path)
    return data
