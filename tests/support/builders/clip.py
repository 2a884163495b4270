"""Small text encoders (CLIPs) built from ComfyUI's own classes, with seeded random weights.

* ``build_tiny_clip("sdxl")``: ComfyUI's SDXL CLIP (``comfy.sdxl_clip.SDXLClipModel`` + ``SDXLTokenizer``):
  CLIP-L (width 768) and CLIP-G (width 1280, projected pooled output), tokenised and encoded exactly as
  for a real SDXL checkpoint (penultimate layer, l and g concatenated to 2048 wide).
* ``build_tiny_clip("sd15")``: ComfyUI's SD1.5 CLIP (``comfy.sd1_clip.SD1ClipModel``): CLIP-L only.

Only the depth (and the MLP width) are smaller than the real ones: the token-embedding widths must stay,
since ED-LoRA concept embeddings have them. The depth goes through ComfyUI's own per-model config override
(``model_options["clip_l_model_config"]`` / ``["clip_g_model_config"]``, read by ``SDClipModel``), so no
ComfyUI global is touched. The real vocabulary (49408 tokens) and tokenizer files ship with ComfyUI; nothing
is downloaded. ComfyUI's ops layers do not initialise their weights, so every tensor is filled here from a
seeded generator (same seed, same weights).
"""

from __future__ import annotations

import torch

# Width, heads and the real depth of each text model, by ComfyUI clip key.
TEXT_MODELS = {"l": (768, 12, 12), "g": (1280, 20, 32)}


def _config(layers: int, mlp: int, positions: int | None) -> dict:
    # SDXL reads the penultimate layer (layer_idx -2), which ComfyUI asserts exists: at least 3 layers.
    if layers < 3:
        raise ValueError("a text model needs at least 3 layers (SDXL reads the penultimate one)")
    config = {"num_hidden_layers": int(layers), "intermediate_size": int(mlp)}
    if positions is not None:
        config["max_position_embeddings"] = int(positions)
    return config


def _fill(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("token_embedding.weight") or name.endswith("position_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)  # CLIP-like embedding scale
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("logit_scale"):
                p.fill_(4.6052)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build_tiny_clip(
    family: str = "sdxl", seed: int = 0, layers: int = 3, mlp: int = 256, dtype=None, max_length: int | None = None
):
    """A ``comfy.sd.CLIP`` of ``family`` ("sdxl" or "sd15") with ``layers`` layers per text model.

    ``dtype``: the text encoder's dtype; None lets ComfyUI choose as for a checkpoint load.
    ``layers=None`` keeps the real depth (12 for CLIP-L, 32 for CLIP-G) and ``mlp=None`` the real MLP width.
    ``max_length``: tokens per prompt section, set the way ComfyUI configures long-CLIP text encoders (248
    tokens): ``tokenizer_data["clip_l_max_length"]`` / ``["clip_g_max_length"]`` for the tokenizers and
    ``max_position_embeddings`` for the text models. None keeps CLIP's 77. Shorter sections make every
    encoding cheaper (an SDXL concept prompt is 71 sections) and long, multi-section prompts cheap to test.
    """
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    if family == "sdxl":
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        keys = ("l", "g")
    elif family == "sd15":
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        keys = ("l",)
    else:
        raise ValueError(f"unknown family {family!r}")
    options = {}
    for key in keys:
        width, _, depth = TEXT_MODELS[key]
        options[f"clip_{key}_model_config"] = _config(depth if layers is None else layers, mlp or 4 * width, max_length)
    if dtype is not None:
        options["dtype"] = dtype
    tokenizer_data = {}
    if max_length is not None:
        tokenizer_data = {f"clip_{key}_max_length": int(max_length) for key in keys}
    clip = comfy.sd.CLIP(target=target, model_options=options, tokenizer_data=tokenizer_data)
    gen = torch.Generator().manual_seed(seed)
    _fill(clip.cond_stage_model, gen)
    return clip
