"""Ordinary LoRA files (kohya, diffusers, peft, LoCon, ...): read safely as a flat ``{key: tensor}`` dict.

Read through :mod:`.weights` (safetensors, or ``torch.load(weights_only=True)``), with every float tensor
checked for NaN and absurd values. Files that are something else — an ED-LoRA, a fused-concepts file, a full
checkpoint — are refused with the node that loads them. Which keys fit which layer is decided later, against
the model, with ComfyUI's own key maps (``samplers.scoped_lora.adapters``).

Pure torch + safetensors; no ComfyUI imports.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .edlora import FORMAT_NAME as EDLORA_FORMAT
from .fused import FORMAT_NAME as FUSED_FORMAT
from .weights import CheckpointFileError, check_weight_tensor, read_tensor_file


@dataclass(frozen=True)
class LoRAFile:
    """An ordinary LoRA file: its tensors (flat, as stored) and safetensors metadata."""

    name: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)


def read_lora_file(path: str) -> LoRAFile:
    """Read an ordinary LoRA file; CheckpointFileError when it is broken or is not a LoRA at all."""
    name = os.path.basename(path)
    content, metadata, _ = read_tensor_file(path, what="LoRA file")
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content:
        raise CheckpointFileError(f"{name} holds no tensors ({type(content).__name__}); it is not a LoRA file")
    if metadata.get("format") == FUSED_FORMAT:
        raise CheckpointFileError(
            f"{name} is a fused multi-concept file (from Fuse Concepts), not a LoRA: load it with the 'Load Fused "
            "Concepts' node"
        )
    if (
        "params" in content
        or metadata.get("format") == EDLORA_FORMAT
        or any(str(k).startswith("new_concept_embedding") for k in content)
    ):
        raise CheckpointFileError(
            f"{name} is an ED-LoRA (Mix-of-Show), not an ordinary LoRA: add it with the 'Concept Stack: ED-LoRA' node"
        )
    if any(str(k).startswith(("model.diffusion_model.", "first_stage_model.")) for k in content):
        raise CheckpointFileError(f"{name} is a full checkpoint, not a LoRA: load it with Load Checkpoint")
    tensors = {}
    for key, value in content.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointFileError(
                f"{name}: entry {str(key)!r} is a {type(value).__name__}, not a tensor; this is not a LoRA file"
            )
        if value.is_floating_point() and value.numel():
            check_weight_tensor(value, f"{name}: {key}")
        elif not value.is_floating_point() and not _is_scalar_setting(str(key), value):
            raise CheckpointFileError(
                f"{name}: entry {str(key)!r} holds {str(value.dtype).replace('torch.', '')} values, not float weights: "
                "the file is broken or not a LoRA. Save the LoRA with float weights (fp32, fp16 or bf16)."
            )
        tensors[str(key)] = value
    return LoRAFile(name=name, tensors=tensors, metadata=dict(metadata))


# Settings a LoRA may store as integers: alpha (kohya writes it as an int when it was one), LoKr's rank split.
_SCALAR_SETTINGS = (".alpha", ".reshape_weight")


def _is_scalar_setting(key: str, value: torch.Tensor) -> bool:
    return key.endswith(_SCALAR_SETTINGS) and value.numel() <= 4


# A cross-attention key/value projection's input width is the text width the model was trained with.
_CROSS_ATTENTION_DOWN = re.compile(r"attn2[._](processor[._])?(to_)?k[._].*(lora_down|lora_A|[._]down)")
CONTEXT_WIDTHS = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}


def family_hint(tensors: dict[str, torch.Tensor]) -> str | None:
    """The model family a LoRA was most likely made for, from its key names and shapes; None when unclear.

    Only for messages: which layers fit is decided against the model itself.
    """
    keys = list(tensors)
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return "Flux"
    if any("joint_blocks" in k or "context_block" in k for k in keys):
        return "SD3"
    if any(k.startswith(("lora_te2_", "text_encoder_2", "te2.", "te2_")) for k in keys):
        return "SDXL"
    widths = {int(v.shape[1]) for k, v in tensors.items() if v.ndim == 2 and _CROSS_ATTENTION_DOWN.search(k)}
    found = {CONTEXT_WIDTHS[w] for w in widths if w in CONTEXT_WIDTHS}
    return found.pop() if len(found) == 1 else None
