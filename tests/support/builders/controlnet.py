"""A random-weight ControlNet for the tiny SD1.5 test checkpoint (tests/support/builders/sd15.py), in the
original ``control_model.*`` layout (lllyasviel's ``control_sd15_*.pth`` / ``control_v11*.safetensors``)
that ComfyUI's stock ``comfy.controlnet.load_controlnet`` (the ControlNetLoader node) detects and loads.

What a real SD1.5 ControlNet is, at the tiny checkpoint's widths:

* ``time_embed``, ``input_blocks`` and ``middle_block``: a copy of the UNet's (ControlNet training starts
  from the UNet; here the copy is exact, so the control branch runs the UNet's own encoder);
* ``input_hint_block``: the hint encoder (3 -> 16 -> ... -> 320 channels, 8x down-sampling, SiLU);
* ``zero_convs`` (one 1x1 conv per input block, 12) and ``middle_block_out``: the "zero convolutions".
  They start at zero in training; after training they are not, so here they are seeded random (a zero
  conv would make the ControlNet a no-op and a test of it vacuous).

ComfyUI detects the UNet config from the ``control_model.`` keys (model_config_from_unet), builds
``comfy.cldm.cldm.ControlNet`` and wraps it in ``comfy.controlnet.ControlNet``: nothing here is patched.
The same seed and UNet give the same tensors.
"""

from __future__ import annotations

import os

import torch

from .sd15 import UNET_CONFIG

PREFIX = "control_model."
HINT_CHANNELS = 3
HINT_GAIN = 1.0  # hint encoder convs (std gain/sqrt(fan_in)): the hint's structure reaches the first block
ZERO_CONV_GAIN = 0.2  # the trained "zero" convs: a visible but not overwhelming residual on the UNet's skips
COPIED = ("time_embed.", "input_blocks.", "middle_block.")


def control_model(dtype=torch.float32):
    """An empty ``comfy.cldm.cldm.ControlNet`` with the tiny SD1.5 UNet's config (what the loader builds)."""
    import comfy.cldm.cldm

    config = {k: v for k, v in UNET_CONFIG.items() if k != "out_channels"}
    return comfy.cldm.cldm.ControlNet(hint_channels=HINT_CHANNELS, dtype=dtype, device="cpu", **config)


def build_controlnet_state_dict(unet_state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """``control_model.*`` tensors (fp16): the UNet's encoder copied from ``unet_state_dict`` (keys of the
    diffusion model, no prefix), the hint encoder and zero convs seeded random."""
    net = control_model()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, p in net.state_dict().items():
            if name.startswith(COPIED):
                src = unet_state_dict.get(name)
                if src is None or src.shape != p.shape:
                    raise KeyError(f"the UNet has no {name} of shape {tuple(p.shape)} to copy")
                value = src.detach().float().cpu()
            elif name.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
                gain = HINT_GAIN if name.startswith("input_hint_block.") else ZERO_CONV_GAIN
                if name.endswith(".weight"):
                    fan_in = p[0].numel()
                    value = torch.randn(p.shape, generator=gen) * (gain / fan_in**0.5)
                else:
                    value = torch.randn(p.shape, generator=gen) * 0.01
            else:
                raise AssertionError(f"unexpected ControlNet tensor {name}")
            out[PREFIX + name] = value.to(torch.float16).contiguous()
    return out


def build_tiny_controlnet(path: str | os.PathLike, unet_state_dict: dict[str, torch.Tensor], seed: int = 0) -> str:
    """Write the ControlNet as fp16 safetensors to ``path`` (as a downloaded ControlNet file is)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(build_controlnet_state_dict(unet_state_dict, seed), path)
    return path
