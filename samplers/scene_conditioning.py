"""A scene conditioning the user made with stock nodes (CLIPTextEncode -> Apply ControlNet, T2I-Adapter, GLIGEN,
style model, ...), given to a method node in place of the scene prompt it would encode: checked against the MODEL
before anything samples, so a conditioning or ControlNet of another model family is refused by name instead of
failing deep inside sampling (ComfyUI glue).

OMG reads it in stage 1 and in stage 2's global branch, LoRA-Composer as its global prompt (the regions ride on
it), Concept Conductor in its base branch and reference run, with its control also on every concept branch (the
branches must share one batched call, and ComfyUI batches only conds with the same control): where each official
method puts its ControlNet / T2I-Adapter. The concepts' own prompts stay the node's encodings."""

from __future__ import annotations

import torch

from ..formats.lora import CONTEXT_WIDTHS
from .concept_stack.lora_fit import model_family_name
from .edlora.model import cross_attention_layers


class SceneConditioningError(ValueError):
    """A conditioning (or a ControlNet in it) that does not fit the MODEL; the message says what to change."""


def _family(width: int) -> str:
    name = CONTEXT_WIDTHS.get(int(width))
    return f"{width} wide, as {name}'s" if name else f"{width} wide"


def _model_width(model_patcher) -> int | None:
    widths = {w for _, w in cross_attention_layers(model_patcher)}
    return next(iter(widths)) if len(widths) == 1 else None


def controls_in(conditioning: list) -> list:
    """Every control object (ControlNet, T2I-Adapter, ...) the entries of ``conditioning`` carry, chains unrolled."""
    out, seen = [], set()
    for _, extras in conditioning:
        control = extras.get("control")
        while control is not None and id(control) not in seen:
            seen.add(id(control))
            out.append(control)
            control = getattr(control, "previous_controlnet", None)
    return out


def _control_width(control) -> int | None:
    """The prompt width a ControlNet's own cross-attention reads (None: it has none, e.g. a T2I-Adapter)."""
    network = getattr(control, "control_model", None)
    if not isinstance(network, torch.nn.Module):
        return None
    for name, module in network.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            return int(module.to_k.weight.shape[1])
    return None


def check_scene_conditioning(conditioning, model_patcher, what: str) -> list:
    """``conditioning`` (ComfyUI's ``[[tensor, extras], ...]``) if it fits ``model_patcher``: its prompts are as
    wide as the model's cross-attention reads, and every ControlNet in it was made for such prompts. ``what``
    names the input in messages ('positive')."""
    if not isinstance(conditioning, list) or not conditioning:
        raise SceneConditioningError(f"{what} is not a conditioning (connect a CLIP Text Encode or Apply ControlNet).")
    width = _model_width(model_patcher)
    if width is None:
        return conditioning
    family = model_family_name(model_patcher)
    for tensor, _ in conditioning:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            raise SceneConditioningError(
                f"{what} holds no prompt embedding [batch, tokens, width]: connect a text encode."
            )
        if int(tensor.shape[-1]) != width:
            raise SceneConditioningError(
                f"{what} is {_family(int(tensor.shape[-1]))}, but this {family} MODEL reads prompts "
                f"{width} wide: it was encoded with another model family's CLIP. Encode it with this checkpoint's CLIP."
            )
    for control in controls_in(conditioning):
        cw = _control_width(control)
        if cw is not None and cw != width:
            raise SceneConditioningError(
                f"a ControlNet in {what} reads prompts {_family(cw)}; this {family} MODEL's are "
                f"{width} wide: the ControlNet was made for another model family. Load a ControlNet made for {family}."
            )
    return conditioning


def same_text(given: list, encoded: list, atol: float = 1e-3) -> bool:
    """Whether ``given``'s prompt embedding starts with ``encoded``'s (a style model may append tokens)."""
    a, b = given[0][0], encoded[0][0]
    n = int(b.shape[-2])
    if a.shape[-2] < n or a.shape[-1] != b.shape[-1]:
        return False
    return bool(torch.allclose(a[..., :n, :].float().cpu(), b.float().cpu(), atol=atol, rtol=0))


def with_control_of(conds: list, source: list) -> list:
    """``conds`` with the control (ControlNet / T2I-Adapter chain) of ``source``'s first entry, or as they are."""
    control = source[0][1].get("control") if source else None
    if control is None:
        return conds
    return [[c, {**d, "control": control}] for c, d in conds]
