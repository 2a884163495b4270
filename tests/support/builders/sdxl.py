"""A small SDXL-shaped UNet built directly from ComfyUI's model classes (not loadable as a checkpoint).

What makes it SDXL-shaped for the code under test: linear proj_in/proj_out, transformer depth 2 (so
``transformer_blocks.1`` exists), context width 2048, the ``label_emb`` ADM input of pooled text + sizes,
and ComfyUI's SDXL model class (so sampling builds its conds exactly as for SDXL). Widths are small.

``build_tiny_sdxl(all_cross_attention=True)`` has SDXL's full layout instead: 2 res blocks per level,
channel_mult (1, 2, 4), transformer depths 0/2/10 (input), 10 (middle), 10/2/0 (output), so all 70
cross-attention layers of SDXL exist under SDXL's module names (diffusers and ComfyUI), with channel widths
32/64/128 instead of 320/640/1280. ED-LoRA tests need that: an SDXL ED-LoRA has one token per layer.
"""

from __future__ import annotations

import torch

from .seeded import UNET_COMMON

UNET_CONFIG = {
    **UNET_COMMON,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "model_channels": 64,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 2, 2],
    "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 2,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 32,
    "transformer_depth_output": [0, 0, 2, 2, 2, 2],
}


# SDXL's layout (all 70 cross-attention layers) at a tenth of its widths. Depths are per res block; ComfyUI
# lists output-block depths from the last output block to the first (as in its SDXL detection).
ALL_CROSS_ATTENTION_CONFIG = {
    **UNET_CONFIG,
    "model_channels": 32,
    "num_head_channels": 16,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
}
SDXL_CROSS_ATTENTION_LAYERS = 70


# SDXL's real UNet (2.6B parameters): widths 320/640/1280, 64-wide heads.
FULL_UNET_CONFIG = {
    **ALL_CROSS_ATTENTION_CONFIG,
    "model_channels": 320,
    "num_head_channels": 64,
}


def build_tiny_sdxl(seed: int = 0, all_cross_attention: bool = False):
    """A ModelPatcher around a seeded random SDXL-shaped model, on ComfyUI's torch device.

    ``all_cross_attention``: SDXL's full block layout (70 cross-attention layers) at small widths, see above.
    """
    from .sd15 import build_unet_model

    config = ALL_CROSS_ATTENTION_CONFIG if all_cross_attention else UNET_CONFIG
    return build_unet_model("sdxl", config, seed, out_gain=0.1)


def build_full_sdxl_model(seed: int = 0, dtype=None, device=None):
    """SDXL's UNet at its real widths (2.6B parameters) with seeded random weights, for benchmarks on a GPU
    (``device="cuda"``, ``dtype=torch.float16``: made and filled there; on the CPU it takes minutes)."""
    from .sd15 import build_unet_model

    return build_unet_model("sdxl", FULL_UNET_CONFIG, seed, out_gain=0.1, dtype=dtype, device=device)


def sdxl_conds(seed: int = 1, width: int = 128, height: int = 96):
    """(positive, negative) conditionings of the right shapes for SDXL, from seeded noise."""
    gen = torch.Generator().manual_seed(seed)

    def one():
        return [
            [
                torch.randn(1, 77, 2048, generator=gen) * 0.5,
                {"pooled_output": torch.randn(1, 1280, generator=gen), "width": width, "height": height},
            ]
        ]

    return one(), one()
