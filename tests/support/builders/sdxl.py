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

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 2, 2],
    "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 2,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 32,
    "transformer_depth_output": [0, 0, 2, 2, 2, 2],
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
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


def build_tiny_sdxl(seed: int = 0, all_cross_attention: bool = False):
    """A ModelPatcher around a seeded random SDXL-shaped model, on ComfyUI's torch device.

    ``all_cross_attention``: SDXL's full block layout (70 cross-attention layers) at small widths, see above.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(ALL_CROSS_ATTENTION_CONFIG if all_cross_attention else UNET_CONFIG))
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        model.diffusion_model.out[-1].weight.mul_(0.1)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


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
