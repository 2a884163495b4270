"""A random-weight, SD1.5-shaped checkpoint that ComfyUI's stock CheckpointLoaderSimple loads as SD1.5.

Shapes (what ComfyUI's model detection sees):

* UNet: model_channels 320, channel_mult (1, 1, 1, 1), 2 res blocks per level, a transformer of depth 1
  wherever SD1.5 has one (6 input, 1 middle, 9 output: all 16 cross-attention layers), context 768,
  8 heads. Only the widths are smaller than SD1.5's (320 everywhere instead of 320/640/1280).
* Text encoder: the full CLIP-L text model (12 layers, width 768, vocabulary 49408), so tokenisation,
  embeddings and prompt weighting behave exactly as with a real SD1.5 checkpoint.
* VAE: TAESD (``first_stage_model.taesd_encoder.*`` / ``taesd_decoder.*`` plus ``vae_scale``/``vae_shift``;
  comfy.sd.VAE recognises it by ``taesd_decoder.1.weight``), with SD1.5's TAESD scale 0.18215.

Values: ComfyUI's ops layers do not initialise their weights, so every tensor is filled here from one
seeded ``torch.Generator`` (normal with std 1/sqrt(fan_in) for weights, ones for norm weights, zeros for
biases). Pure noise would make a useless sampler test (the "noise prediction" would be unrelated to the
noise, latents would stay at sigma_max and the picture would be saturated), so on top of the random
network a fixed route makes the UNet a crude denoiser: ``conv_in`` writes +x and -x copies of each latent
channel, the last output block's skip connection passes them through, and ``out`` reads them back
(silu(x) - silu(-x) = x after the group norm). The noise prediction is then about the normalised input
plus a prompt-dependent random part (about 4 % of it), samplers land on latents of unit scale, and a
different prompt gives a visibly different, unsaturated image. The TAESD decoder's last layer is biased
to mid-grey for the same reason.

Every tensor ComfyUI's SD1.5 loader can read is in the file, so a load leaves nothing uninitialised but
``clip_l.transformer.text_projection.weight``, which no checkpoint key can reach: SD15.process_clip_state_dict
renames every ``cond_stage_model.transformer.X`` not under ``text_model.`` to
``cond_stage_model.transformer.text_model.X``, a name the model does not have (and the saving conversion
drops the key anyway). ComfyUI keeps whatever memory that weight got, sometimes NaN; SD1.5 never uses it
(its CLIP returns the unprojected pooled output). tests/integration/test_harness_smoke.py checks both, and
tests compare weights bit for bit (tests/support/tensors.py) so that such memory cannot make them flaky.
``clip_l.logit_scale``, which the saving conversion drops as well, is written back under the key the loader
reads (``cond_stage_model.logit_scale``).

The same seed always gives the same bytes. Needs ComfyUI importable (its model classes define the
layout); nothing is downloaded. About 4-20 s on 2 CPU cores, 474 MB of fp16 safetensors.
"""

from __future__ import annotations

import os

import torch

from .seeded import UNET_COMMON, fill_seeded

# Bump when the recipe changes, so that a file built by an older recipe is never taken as current.
RECIPE = "tiny-sd15-v3"

UNET_CONFIG = {
    **UNET_COMMON,
    "adm_in_channels": None,
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
    "num_head_channels": -1,
}

# Text-encoder depth for the tests that only need *a* text encoder (conftest's ``tiny_models_shallow_clip``):
# SD1.5 reads CLIP-L's last layer, so the first 3 of the file's 12 layers make a working, four times cheaper
# one, loaded through ComfyUI's ``te_model_options``. ED-LoRA files for it carry text LoRA on those 3 layers
# (``clip_te_modules(SHALLOW_TEXT_LAYERS, 768)``); such files load into the full-depth CLIP as well.
SHALLOW_TEXT_LAYERS = 3
LATENT_CHANNELS = 4
GROUP = 10  # channels per GroupNorm group at width 320 (32 groups)
RANDOM_SHARE = 0.3  # how much of the deep (prompt-dependent) path reaches the last output block
OUT_GAIN = 1.3  # brings the predicted noise back to unit scale once the random share is mixed in
TAESD_SD15_SCALE = 0.18215
LOGIT_SCALE = 4.6052  # CLIP's trained logit scale, log(100); unused by SD1.5
DECODER_GAIN = 0.7  # TAESD decoder's last conv: image std about 0.1-0.25 around a mid-grey bias


def _channel_plan(width: int) -> list[tuple[int, float]]:
    """(latent channel, sign) for each UNet channel: each norm group holds +/- copies of one channel."""
    return [((j // GROUP) % LATENT_CHANNELS, 1.0 if j % 2 == 0 else -1.0) for j in range(width)]


def _add_denoising_route(unet: torch.nn.Module) -> None:
    width = UNET_CONFIG["model_channels"]
    plan = _channel_plan(width)
    pairs_per_latent_channel = width // LATENT_CHANNELS // 2
    with torch.no_grad():
        conv_in = unet.input_blocks[0][0]
        conv_in.weight.mul_(0.1)
        for j, (c, sign) in enumerate(plan):
            conv_in.weight[j, c, 1, 1] += sign

        res, transformer = unet.output_blocks[-1][0], unet.output_blocks[-1][1]
        skip = res.skip_connection.weight  # (width, 2*width, 1, 1): [deep path h | long skip from conv_in]
        skip.mul_(RANDOM_SHARE)
        for j in range(width):
            skip[j, width + j, 0, 0] += 1.0
        res.out_layers[-1].weight.mul_(RANDOM_SHARE)
        transformer.proj_out.weight.mul_(RANDOM_SHARE)

        out = unet.out[-1].weight  # (4, width, 3, 3), after GroupNorm + SiLU
        out.mul_(0.1)
        for j, (c, sign) in enumerate(plan):
            out[c, j, 1, 1] += OUT_GAIN * sign / pairs_per_latent_channel


def build_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    unet = config.get_model({}).diffusion_model
    fill_seeded(unet, gen)
    _add_denoising_route(unet)

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    fill_seeded(clip, gen)
    with torch.no_grad():
        emb = clip.clip_l.transformer.text_model.embeddings
        emb.token_embedding.weight.mul_(0.02 * 768**0.5)  # CLIP-like embedding scales
        emb.position_embedding.weight.mul_(0.01 * 768**0.5)

    taesd = comfy.taesd.taesd.TAESD(latent_channels=LATENT_CHANNELS)
    fill_seeded(taesd, gen)
    with torch.no_grad():
        taesd.vae_scale.fill_(TAESD_SD15_SCALE)  # what ComfyUI's VAELoader sets for SD1.5's "taesd"
        taesd.vae_shift.zero_()
        taesd.taesd_decoder[-1].weight.mul_(DECODER_GAIN)
        taesd.taesd_decoder[-1].bias.fill_(0.5)

    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
    # dropped by the saving conversion but read back by the loader: write it, so the load sets it too
    sd["cond_stage_model.logit_scale"] = torch.tensor(LOGIT_SCALE)
    sd.update({f"first_stage_model.{k}": v for k, v in taesd.state_dict().items()})
    return {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()
    }


def _metadata(seed: int) -> dict[str, str]:
    # One entry only: safetensors writes the metadata map in hash order, which differs between runs
    # once there are two keys, and "same seed, same bytes" is part of the contract.
    return {"tiny_sd15": f"{RECIPE} seed={seed}"}


def is_current_build(path: str | os.PathLike, seed: int = 0) -> bool:
    """True when ``path`` is a complete file from this recipe and seed (its safetensors metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return all(meta.get(k) == v for k, v in _metadata(seed).items())


def build_tiny_sd15(path: str | os.PathLike, seed: int = 0) -> str:
    """Write the checkpoint to ``path`` (fp16 safetensors) unless this recipe/seed is already there."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if is_current_build(path, seed):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sd = build_state_dict(seed)
    tmp = f"{path}.{os.getpid()}.partial"
    try:
        save_file(sd, tmp, metadata=_metadata(seed))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# SD1.5's real UNet: the same layout with the widths 320/640/1280/1280 (860M parameters).
FULL_UNET_CONFIG = {**UNET_CONFIG, "channel_mult": [1, 2, 4, 4]}


def sd15_block_width(block: str) -> int:
    """The width of an SD1.5 transformer block at full size, by its diffusers name (for ED-LoRA factors)."""
    if block.startswith("mid_block"):
        return 1280
    index = int(block.split(".")[1])
    return (320, 640, 1280)[index] if block.startswith("down_blocks") else (1280, 1280, 640, 320)[index]


def build_small_sd15_model(seed: int = 0, model_channels: int = 32):
    """A ModelPatcher around a seeded random SD1.5-shaped UNet (all 16 cross-attention layers, context 768)
    at ``model_channels`` wide, built directly from ``comfy.supported_models.SD15`` (not a checkpoint: the
    stock loader would not detect a UNet this narrow as SD1.5). For tests that need SD1.5's shapes only."""
    return build_unet_model("sd15", {**UNET_CONFIG, "model_channels": int(model_channels)}, seed)


def build_full_sd15_model(seed: int = 0, dtype=None, device=None):
    """SD1.5's UNet at its real widths (860M parameters) with seeded random weights, for benchmarks.

    ``dtype``: the weights' dtype (None: float32); ``device``: where they are made and filled (None: the CPU;
    a CUDA device fills them there, far faster than the CPU's generator)."""
    return build_unet_model("sd15", FULL_UNET_CONFIG, seed, out_gain=0.1, dtype=dtype, device=device)


def build_unet_model(family: str, unet_config: dict, seed: int = 0, out_gain: float = 1.0, dtype=None, device=None):
    """A ModelPatcher around ComfyUI's model class of ``family`` ("sd15", "sdxl") built from ``unet_config``,
    every weight from one seeded generator (fill_seeded); ``out_gain`` scales the last convolution (a random
    UNet's raw output is far from unit scale)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config_class = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]
    config = config_class(dict(unet_config))
    if dtype is not None:
        config.set_inference_dtype(dtype, None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = config.get_model({}, device=device)
    fill_seeded(model.diffusion_model, torch.Generator(device=device).manual_seed(seed))
    if out_gain != 1.0:
        with torch.no_grad():
            model.diffusion_model.out[-1].weight.mul_(out_gain)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
