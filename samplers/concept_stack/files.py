"""Adapter files for the concept stack: read once, cached by (path, size, mtime); pure torch.

ED-LoRA files go through ``training.edlora_file``; ordinary LoRA files (kohya, diffusers, peft, LoCon, ...)
are read here as a flat ``{key: tensor}`` dict, safely (``training.checkpoint_io``), with every float tensor
checked for NaN and absurd values. Which of their keys fit which layer is decided later, against the model,
with ComfyUI's own key maps (``samplers.scoped_lora.adapters``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...training.checkpoint_io import CheckpointFileError, check_weight_tensor, read_tensor_file
from ...training.edlora_file import EDLoRAWeights, read_edlora

CACHE_SIZE = 16
_CACHE: OrderedDict[tuple, object] = OrderedDict()


def cached(path: str, reader: Callable[[str], object]):
    """``reader(path)``, parsed once per file version (path, size, modification time)."""
    st = os.stat(path)
    key = (reader.__qualname__, os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = reader(path)
    _CACHE[key] = value
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def load_edlora(path: str) -> EDLoRAWeights:
    return cached(path, read_edlora)


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
    if metadata.get("format") == "multiconcept.fused":
        raise CheckpointFileError(
            f"{name} is a fused multi-concept file (from Fuse Concepts), not a LoRA: load it with the 'Load Fused "
            "Concepts' node"
        )
    if (
        "params" in content
        or metadata.get("format") == "multiconcept.edlora"
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


def load_lora(path: str) -> LoRAFile:
    return cached(path, read_lora_file)
