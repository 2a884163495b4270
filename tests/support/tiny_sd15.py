"""A random-weight, SD1.5-shaped checkpoint that ComfyUI's stock CheckpointLoaderSimple loads as SD1.5.

UNet: model_channels 320, channel_mult (1, 1, 1, 1), 2 res blocks, a transformer wherever SD1.5 has one
(so all 16 cross-attention layers exist), context 768. Text encoder: full CLIP-L shape (12 layers, 768).
VAE: TAESD-shaped. Weights come from a seeded generator (ComfyUI's layers do not initialise themselves),
so the same seed always gives the same file. Needs ComfyUI on sys.path; nothing is downloaded.
"""

from __future__ import annotations

import os

import torch

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    # ComfyUI lists output-block depths from the last output block to the first.
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_head_channels": -1,
}


def _fill(module: torch.nn.Module, gen: torch.Generator, gain: float = 1.0) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / fan_in**0.5))
            elif name.endswith("weight") or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    unet = config.get_model({}).diffusion_model
    _fill(unet, gen, gain=0.8)
    with torch.no_grad():  # keep the noise prediction in a sane range so images are neither flat nor NaN
        unet.out[-1].weight.mul_(0.1)

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    _fill(clip, gen)
    with torch.no_grad():
        emb = clip.clip_l.transformer.text_model.embeddings
        emb.token_embedding.weight.mul_(0.02 * 768**0.5)  # CLIP-like token embedding scale
        emb.position_embedding.weight.mul_(0.01 * 768**0.5)

    taesd = comfy.taesd.taesd.TAESD()
    _fill(taesd, gen)

    sd = {}
    for k, v in unet.state_dict().items():
        sd[f"model.diffusion_model.{k}"] = v
    clip_sd = config.process_clip_state_dict_for_saving(clip.state_dict())
    sd.update(clip_sd)
    for k, v in taesd.state_dict().items():
        sd[f"first_stage_model.{k}"] = v
    return {
        k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()
    }


def build_tiny_sd15(path: str | os.PathLike, seed: int = 0) -> str:
    """Write the checkpoint to ``path`` (safetensors, fp16) unless an identical build is already there."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    marker = f"{path}.seed{seed}.done"
    if os.path.exists(path) and os.path.exists(marker):
        return path
    sd = build_state_dict(seed)
    tmp = path + ".partial"
    save_file(sd, tmp, metadata={"tiny_sd15_seed": str(seed)})
    os.replace(tmp, path)
    open(marker, "w").close()
    return path
