"""From a concept's adapter to low-rank factors per layer of a given diffusion model (ComfyUI glue).

Key names are mapped with ComfyUI's own tables (``comfy.lora.model_lora_keys_unet`` and
``comfy.lora.load_lora``), so every naming ComfyUI's LoRA loader reads (kohya ``lora_unet_*``, diffusers,
peft ``lora_A/lora_B``, LyCORIS/LoCon) works here too, and the scale follows ComfyUI's convention
(``strength * alpha / rank``; ED-LoRAs: ``strength``, Mix-of-Show does not divide by rank).

What cannot be applied unmerged and scoped is refused by name: DoRA (it rescales the whole weight),
LoHa, LoKr, GLoRA, OFT/BOFT (their deltas are not two thin factors), full weight differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..concept_stack.lora_fit import LoRAFitError, lora_patches
from ..concept_stack.stack import Concept
from .lowrank import LowRankFactors


class ScopedLoRAError(ValueError):
    """An adapter that does not fit the model or cannot be scoped; the message names the layer."""


@dataclass(frozen=True)
class ResolvedConcept:
    """One concept's UNet adapter on one model: ``factors[module path] -> LowRankFactors``.

    Module paths are relative to the diffusion model (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``).
    ``ignored_text_keys``: how many text-encoder layers the file also has (not applied to the UNet).
    """

    concept: Concept
    factors: dict[str, LowRankFactors]
    ignored_text_keys: int = 0


def _module_path(weight_key: str) -> str:
    if not weight_key.startswith("diffusion_model.") or not weight_key.endswith(".weight"):
        raise ScopedLoRAError(f"{weight_key} is not a diffusion-model weight")
    return weight_key[len("diffusion_model.") : -len(".weight")]


def _check_shape(name: str, where: str, factors: LowRankFactors, weight: torch.Tensor) -> None:
    out_f, in_f = int(weight.shape[0]), int(weight[0].numel())
    up_out = int(factors.up.shape[0])
    down_in = int(factors.down[0].numel()) if factors.mid is None else int(factors.down.shape[1])
    if factors.mid is not None:
        down_in *= int(factors.mid.shape[2] * factors.mid.shape[3])
    if up_out != out_f or down_in != in_f or factors.up.reshape(up_out, -1).shape[1] != factors.rank:
        raise ScopedLoRAError(
            f"{name}: the LoRA for layer {where} has shape up {list(factors.up.shape)} / down "
            f"{list(factors.down.shape)}, but the model's weight is {list(weight.shape)}: the LoRA was made for "
            "another model architecture (e.g. SDXL vs SD1.5). Use a LoRA trained for this checkpoint's family."
        )


def _edlora_factors(model_patcher, concept: Concept) -> dict[str, LowRankFactors]:
    """An ED-LoRA's UNet LoRA (SD1.5 or SDXL, diffusers module names) as factors on this model's layers."""
    import comfy.lora

    from ..edlora.model import FAMILIES, model_family

    trained_for = FAMILIES.get(getattr(concept.adapter, "base_model", ""))
    family = model_family(model_patcher)
    if trained_for is not None and family is not None and FAMILIES[family] is not trained_for:
        raise ScopedLoRAError(
            f"{concept.source} is an {trained_for.name} ED-LoRA, but the MODEL is {FAMILIES[family].name}. Load "
            f"{trained_for.checkpoints} for it, or use an ED-LoRA trained for {FAMILIES[family].name}."
        )
    where = f"an {trained_for.name} checkpoint" if trained_for is not None else "a checkpoint of its family"
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    state = model_patcher.model.state_dict()
    out = {}
    for module, pair in concept.adapter.unet_lora.items():
        key = key_map.get("lora_unet_" + module.replace(".", "_"))
        if key is None or key not in state:
            raise ScopedLoRAError(
                f"{concept.source}: the UNet module '{module}' has no counterpart in this model: the ED-LoRA was "
                f"trained for another architecture. Use {where}."
            )
        factors = LowRankFactors(down=pair.down, up=pair.up, scale=float(concept.strength_unet))
        _check_shape(concept.source, module, factors, state[key])
        out[_module_path(key)] = factors
    return out


def _lora_factors(model_patcher, concept: Concept) -> tuple[dict[str, LowRankFactors], int]:
    import comfy.weight_adapter as weight_adapter

    try:
        fitted = lora_patches(concept.adapter.tensors, concept.source, model_patcher)
    except LoRAFitError as e:
        raise ScopedLoRAError(str(e)) from None
    state = model_patcher.model.state_dict()
    out: dict[str, LowRankFactors] = {}
    refused: dict[str, list[str]] = {}
    for weight_key, patch in fitted.unet.items():
        if isinstance(patch, weight_adapter.LoRAAdapter):
            up, down, alpha, mid, dora_scale, reshape = patch.weights
            if dora_scale is not None:
                refused.setdefault("DoRA (weight-decomposed LoRA)", []).append(weight_key)
                continue
            if reshape is not None:
                refused.setdefault("LoRA with reshape_weight", []).append(weight_key)
                continue
            rank = int(down.shape[0])
            scale = float(concept.strength_unet) * (float(alpha) / rank if alpha is not None else 1.0)
            if weight_key not in state:
                raise ScopedLoRAError(f"{concept.source}: {weight_key} is not a weight of this model")
            weight = state[weight_key]
            if weight.ndim == 4 and down.ndim == 2:  # linear-shaped factors for a 1x1 convolution
                down, up = down[:, :, None, None], up[:, :, None, None]
            factors = LowRankFactors(down=down, up=up, scale=scale, mid=mid)
            _check_shape(concept.source, _module_path(weight_key), factors, weight)
            out[_module_path(weight_key)] = factors
        else:
            kind = getattr(patch, "name", None) or (patch[0] if isinstance(patch, tuple) else type(patch).__name__)
            refused.setdefault(str(kind), []).append(weight_key)
    if refused:
        kinds = ", ".join(f"{k} ({len(v)} layer(s), e.g. {_module_path_or_key(v[0])})" for k, v in refused.items())
        raise ScopedLoRAError(
            f"{concept.source} contains adapter types that cannot act inside a region: {kinds}. Only plain LoRA "
            "and LoCon (low-rank up/down, optional mid) can be scoped; use an ordinary LoRA node for this file."
        )
    if not out and not fitted.text_layers:
        raise ScopedLoRAError(f"{concept.source} has no LoRA weights for this model")
    return out, fitted.text_layers


def _module_path_or_key(key: str) -> str:
    try:
        return _module_path(key)
    except ScopedLoRAError:
        return key


def resolve_concept(model_patcher, concept: Concept) -> ResolvedConcept:
    """The concept's UNet factors on this model; ScopedLoRAError when they do not fit or cannot be scoped."""
    if concept.fused:
        raise ScopedLoRAError(
            f"{concept.name} is a fused concept: its LoRA is part of the fused MODEL's weights, so it cannot act in one "
            "region or batch row only. Use the fused MODEL with Mix-of-Show Regional or LoRA-Composer, or build the "
            "stack from the original concept files for this method."
        )
    if concept.kind == "edlora":
        return ResolvedConcept(concept, _edlora_factors(model_patcher, concept) if concept.strength_unet else {})
    factors, text = _lora_factors(model_patcher, concept)
    if not concept.strength_unet:
        factors = {}
    return ResolvedConcept(concept, factors, ignored_text_keys=text)
