"""Ordinary LoRA files (kohya, diffusers, peft, LoCon, ...): read safely as a flat ``{key: tensor}`` dict.

Read through :mod:`.weights` (safetensors, or ``torch.load(weights_only=True)``), with every float tensor
checked for NaN and absurd values. Files that are something else — an ED-LoRA, a fused-concepts file, a full
checkpoint — are refused with the node that loads them. Which keys fit which layer is decided later, against
the model, with ComfyUI's own key maps (``samplers.scoped_lora.adapters``).

Pure torch + safetensors; no ComfyUI imports.
"""

from __future__ import annotations

import os
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
        tensors[str(key)] = value
    return LoRAFile(name=name, tensors=tensors, metadata=dict(metadata))
