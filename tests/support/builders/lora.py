"""Ordinary LoRA files with seeded random values, for a given ComfyUI model (kohya naming, LoCon convs).

``make_lora(patcher, targets)`` writes factors for the listed diffusion-model module paths under kohya's
``lora_unet_<diffusers name>`` keys (the names real kohya/LyCORIS files use for SD1.5 and SDXL), with an
``alpha`` per module. Convolutions get LoCon factors (the kernel in ``lora_down``, or, with ``mid=True``, a
1x1 ``lora_down`` and the kernel in ``lora_mid``).
"""

from __future__ import annotations

import torch

# Module paths of the tiny SD1.5 test checkpoint, by kind (ComfyUI's diffusion-model names).
SD15_ATTENTION = [
    f"{block}.transformer_blocks.0.{attn}.{proj}"
    for block in ("input_blocks.1.1", "input_blocks.4.1", "middle_block.1", "output_blocks.4.1", "output_blocks.9.1")
    for attn in ("attn1", "attn2")
    for proj in ("to_q", "to_k", "to_v", "to_out.0")
]
SD15_FEEDFORWARD = [
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
    "output_blocks.9.1.transformer_blocks.0.ff.net.2",
]
SD15_PROJ = ["input_blocks.1.1.proj_in", "output_blocks.9.1.proj_out"]  # 1x1 convolutions in SD1.5
SD15_RESBLOCK = [
    "input_blocks.1.0.in_layers.2",  # 3x3
    "output_blocks.3.0.out_layers.3",  # 3x3
    "output_blocks.3.0.skip_connection",  # 1x1, 640 -> 320 channels
    "input_blocks.1.0.emb_layers.1",  # time-embedding projection (linear on [B, C])
    "input_blocks.3.0.op",  # stride-2 downsampling
    "output_blocks.2.1.conv",  # upsampling conv
]
SD15_ALL = SD15_ATTENTION + SD15_FEEDFORWARD + SD15_PROJ + SD15_RESBLOCK


def kohya_names(patcher) -> dict[str, str]:
    """ComfyUI module path -> kohya LoRA prefix (``lora_unet_`` + diffusers name with underscores)."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    out = {}
    for diffusers, comfy_key in table.items():
        if diffusers.endswith(".weight"):
            out[comfy_key[: -len(".weight")]] = "lora_unet_" + diffusers[: -len(".weight")].replace(".", "_")
    return out


def make_lora(
    patcher,
    targets: list[str],
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = 2.0,
    scale: float = 0.3,
    mid: bool = False,
) -> dict[str, torch.Tensor]:
    """A LoRA state dict for ``targets`` of ``patcher``'s diffusion model (float32, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    names = kohya_names(patcher)
    dm = patcher.model.diffusion_model
    sd: dict[str, torch.Tensor] = {}
    for path in targets:
        module = dm
        for part in path.split("."):
            module = getattr(module, part)
        w = module.weight
        prefix = names[path]
        out_f, in_f = int(w.shape[0]), int(w.shape[1])
        # factors sized so that the delta is a fixed fraction of the layer's typical output
        std = scale / (rank * in_f) ** 0.25 / (in_f**0.25)
        if w.ndim == 2:
            sd[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * std
            sd[f"{prefix}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * std
        else:
            kh, kw = int(w.shape[2]), int(w.shape[3])
            if mid and (kh, kw) != (1, 1):
                sd[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_f, 1, 1, generator=gen) * std
                sd[f"{prefix}.lora_mid.weight"] = (
                    torch.randn(rank, rank, kh, kw, generator=gen) / (rank * kh * kw) ** 0.5
                )
            else:
                sd[f"{prefix}.lora_down.weight"] = (
                    torch.randn(rank, in_f, kh, kw, generator=gen) * std / (kh * kw) ** 0.5
                )
            sd[f"{prefix}.lora_up.weight"] = torch.randn(out_f, rank, 1, 1, generator=gen) * std
        if alpha is not None:
            sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return sd


def transformer_linears(patcher) -> list[str]:
    """Every Linear of the diffusion model's transformer blocks (attention and feed-forward): where typical
    character LoRAs act."""
    out = []
    for name, module in patcher.model.diffusion_model.named_modules():
        if ".transformer_blocks." in name and isinstance(module, torch.nn.Linear):
            out.append(name)
    return out


# Layers of real LoRA files made for other families, under the kohya names sd-scripts writes and at those
# families' real shapes ``(out, in)``: SDXL's kohya names follow ComfyUI's module paths (input_blocks_4_1_...),
# its cross-attention reads 2048-wide text, it has a second text encoder (te2); Flux's blocks are DiT blocks.
SDXL_STYLE_LAYERS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640),
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": (1280, 5120),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
}
FLUX_STYLE_LAYERS = {
    "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
    "lora_unet_single_blocks_0_linear1": (21504, 3072),
}


def family_style_lora(layers: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA with small seeded factors for ``layers`` (name -> (out, in)), e.g. SDXL_STYLE_LAYERS."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for prefix, (out_f, in_f) in layers.items():
        sd[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
        sd[f"{prefix}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
        sd[f"{prefix}.alpha"] = torch.tensor(float(rank))
    return sd
