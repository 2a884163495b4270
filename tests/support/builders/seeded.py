"""The one way the builders fill a network that ComfyUI's ops layers leave uninitialised: seeded values."""

from __future__ import annotations

import torch

# What every UNet config of the builders shares (ComfyUI's UNetModel arguments for an SD-family UNet).
UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "in_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def fill_seeded(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter of ``module`` from ``gen``, in registration order (which fixes the result for a seed):
    matrices and kernels normal with std 1/sqrt(fan_in), norm weights (and scales) one, biases zero.

    The values are drawn on ``gen``'s device and copied in, so a CUDA generator fills a model on the GPU.
    A float buffer is refused: it would be saved or used uninitialised."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                values = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=gen.device) / fan_in**0.5
                p.copy_(values)
            elif name.endswith("weight") or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point():
                raise AssertionError(f"unexpected float buffer {name}: it would be saved uninitialised")
