"""Does an ordinary LoRA fit this MODEL / CLIP? One answer for every method that reads the concept stack.

ComfyUI's LoRA loader skips entries that name no layer of the model and logs shape errors only when the
weights are patched, so a LoRA made for another family (an SDXL LoRA on SD1.5, a Flux LoRA on SDXL) loads and
silently does nothing, or half of itself. Here the keys are mapped with ComfyUI's own tables
(``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip`` and ``comfy.lora.load_lora``, so every naming
its loader reads works), and a file is refused, naming it and the family it was made for, when any of its
layers has no counterpart or another shape than the model's. Text-encoder entries are checked against the
CLIP where a method encodes prompts with them, and only counted where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...formats.lora import family_hint

TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "lora_te1", "lora_te2", "clip_")
# ComfyUI's names for the model and text-encoder classes, as users know the families
MODEL_FAMILIES = {"SD15": "SD1.5", "SD20": "SD2", "SD21UnclipL": "SD2", "SD21UnclipH": "SD2", "SDXL": "SDXL"}
MODEL_FAMILIES.update({"SDXLRefiner": "SDXL refiner", "SSD1B": "SDXL (SSD-1B)", "Flux": "Flux", "SD3": "SD3"})
CLIP_FAMILIES = {"SD1ClipModel": "SD1.5", "SD2ClipModel": "SD2", "SDXLClipModel": "SDXL", "FluxClipModel": "Flux"}
CLIP_FAMILIES.update({"SD3ClipModel": "SD3", "SDXLRefinerClipModel": "SDXL refiner"})
# entries ComfyUI's loader reads as a whole-weight (not low-rank) patch of the module the key names
_WHOLE_WEIGHT_SUFFIXES = ("diff", "diff_b", "set_weight", "w_norm", "b_norm")


class LoRAFitError(ValueError):
    """The LoRA does not fit the model or text encoder it is given; the message names the file and the fix."""


@dataclass(frozen=True)
class LoRAPatches:
    """A LoRA's entries as ComfyUI patch dicts (``comfy.lora.load_lora``'s output), keyed by weight key.

    ``text`` is filled only when a CLIP was given; ``text_layers`` counts the file's text-encoder layers either way.
    """

    unet: dict = field(default_factory=dict, repr=False)
    text: dict = field(default_factory=dict, repr=False)
    text_layers: int = 0


def is_text_encoder_key(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES) or ".text_model." in key


def layer_of(key: str) -> str:
    """The layer name an entry belongs to (``x.lora_down.weight``, ``x.alpha``, ``x_lora.up.weight`` -> ``x``)."""
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    for tail in (".default", ".down", ".up"):  # peft's lora_A.default, diffusers' x.lora.down / x_lora.down
        if name.endswith(tail):
            name = name[: -len(tail)]
    name = name.rsplit(".", 1)[0] if "." in name else name
    for tail in ("_lora", ".lora", ".lora_linear_layer"):
        if name.endswith(tail):
            name = name[: -len(tail)]
    return name


def model_family_name(model_patcher) -> str:
    name = type(model_patcher.model.model_config).__name__
    return MODEL_FAMILIES.get(name, name)


def clip_family_name(clip) -> str:
    encoder = clip.cond_stage_model
    while hasattr(encoder, "vocabulary") and hasattr(encoder, "base"):  # the concept-word wrapper (edlora.clip)
        encoder = encoder.base
    name = type(encoder).__name__
    return CLIP_FAMILIES.get(name, name)


def _used_keys(tensors: dict, patches: dict, key_map: dict) -> set[str]:
    used: set[str] = set()
    for patch in patches.values():
        used.update(getattr(patch, "loaded_keys", ()))  # ComfyUI shares one set between a load's adapters
    for key in tensors:
        if key.rsplit(".", 1)[-1] in _WHOLE_WEIGHT_SUFFIXES and key.rsplit(".", 1)[0] in key_map:
            used.add(key)
    return used


def _shape_misfits(patches: dict, state: dict) -> list[tuple[str, list[int], list[int]]]:
    """``(weight key, the LoRA's [out, in], the weight's shape)`` for each low-rank patch of another shape."""
    import comfy.weight_adapter as weight_adapter

    bad = []
    for key, patch in patches.items():
        weight = state.get(key)
        if weight is None:
            continue
        if isinstance(patch, weight_adapter.LoRAAdapter):
            up, down, _, mid, _, reshape = patch.weights
            if reshape is not None:
                continue
            out_f = int(up.shape[0])
            in_f = int(down[0].numel()) if mid is None else int(down.shape[1] * mid.shape[2] * mid.shape[3])
            if (out_f, in_f) != (int(weight.shape[0]), int(weight[0].numel())):
                bad.append((key, [out_f, in_f], list(weight.shape)))
        elif isinstance(patch, tuple) and patch and patch[0] in ("diff", "set"):
            diff = patch[1][0]
            if diff.numel() != weight.numel():
                bad.append((key, list(diff.shape), list(weight.shape)))
    return bad


def _verb(n: int) -> str:
    return "has" if n == 1 else "have"


def _have(n: int) -> str:
    return f"{n} {_verb(n)}"


def _check(source: str, family: str, part: str, hint, tensors: dict, patches: dict, key_map: dict, state: dict) -> None:
    layers = {layer_of(k) for k in tensors if not k.endswith(".alpha")}
    if not layers:
        return
    used = {layer_of(k) for k in _used_keys(tensors, patches, key_map)}
    missing = sorted(layers - used)
    made_for = f"was made for {hint}" if hint and hint != family else "was made for another model architecture"
    target = f"{family} {part}"
    fix = f"Use a LoRA trained for {family}, or load a checkpoint of the family the LoRA was made for."
    misfits = _shape_misfits(patches, state)
    if misfits:
        key, lora_shape, weight_shape = misfits[0]
        where = key.removeprefix("diffusion_model.").removesuffix(".weight")
        also = f", and {_have(len(missing))} no counterpart (e.g. {missing[0]})" if missing else ""
        raise LoRAFitError(
            f"{source} {made_for}, not for this {target}: {len(misfits)} of its {len(layers)} layers "
            f"{_verb(len(misfits))} another shape than the model's (e.g. {where}: the LoRA makes {lora_shape}, the weight is {weight_shape}){also}. "
            + fix
        )
    if missing:
        sample = ", ".join(missing[:3])
        if len(missing) == len(layers):
            raise LoRAFitError(f"{source} matches no layer of this {target} (e.g. {sample}): it {made_for}. {fix}")
        raise LoRAFitError(
            f"{source}: only {len(layers) - len(missing)} of its {len(layers)} layers match this {target}; "
            f"{_have(len(missing))} no counterpart (e.g. {sample}): it {made_for}. {fix}"
        )


def _load_part(source: str, family: str, part: str, hint, tensors: dict, key_map: dict, state: dict) -> dict:
    """One part's ComfyUI patches (``comfy.lora.load_lora``), after checking that every layer fits."""
    import comfy.lora

    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    _check(source, family, part, hint, tensors, patches, key_map, state)
    return patches


def lora_patches(tensors: dict, source: str, model_patcher=None, clip=None) -> LoRAPatches:
    """The LoRA's UNet part on ``model_patcher`` and text part on ``clip`` (each when given), as ComfyUI patches.

    LoRAFitError when a part does not fit its target: a layer with no counterpart, or of another shape.
    """
    import comfy.lora

    text_t = {k: v for k, v in tensors.items() if is_text_encoder_key(k)}
    unet_t = {k: v for k, v in tensors.items() if k not in text_t}
    hint = family_hint(tensors)  # from the whole file: an SDXL LoRA's text part alone looks like SD1.5's
    unet: dict = {}
    text: dict = {}
    if model_patcher is not None and unet_t:
        key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
        unet = _load_part(source, model_family_name(model_patcher), "MODEL", hint, unet_t, key_map,
                          model_patcher.model.state_dict())  # fmt: skip
    if clip is not None and text_t:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        text = _load_part(source, clip_family_name(clip), "CLIP", hint, text_t, key_map,
                          clip.cond_stage_model.state_dict())  # fmt: skip
    text_layers = len({layer_of(k) for k in text_t if not k.endswith(".alpha")})
    return LoRAPatches(unet=unet, text=text, text_layers=text_layers)
