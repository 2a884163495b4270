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
    channels_of = channels_of or (lambda block: 320)
    out = {}
    for block in sd15_transformer_blocks():
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
) -> dict:
    """The dict Mix-of-Show saves (``{'params': {...}}``), with seeded random tensors."""
    gen = torch.Generator().manual_seed(seed)
    unet_modules = sd15_unet_modules() if unet_modules is None else unet_modules
    te_modules = sd15_te_modules() if te_modules is None else te_modules
    if sdxl:
        layers = 70
    params = {
        "new_concept_embedding": {w: torch.randn(layers, 768, generator=gen) * 0.02 for w in words},
        "text_encoder": lora_tree(te_modules, rank, gen, lora_scale),
        "unet": lora_tree(unet_modules, rank, gen, lora_scale),
    }
    if sdxl:
        params["new_concept_embedding_2"] = {w: torch.randn(layers, 1280, generator=gen) * 0.02 for w in words}
    return {"params": params}


def save_official_edlora(path, **kwargs) -> dict:
    data = official_edlora(**kwargs)
    torch.save(data, path)
    return data
