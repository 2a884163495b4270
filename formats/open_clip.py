"""open_clip checkpoints on disk: the weights (open_clip / LAION or OpenAI layout) and the config JSON beside them.

* **open_clip / LAION**: a state dict in open_clip's key layout (``visual.*``, ``token_embedding.weight`` or
  ``text.*``), as ``.safetensors`` (e.g. the Hub's ``open_clip_model.safetensors``), ``.bin``/``.pt``/``.pth``
  (``open_clip_pytorch_model.bin``), or a training checkpoint (``{"state_dict": ..., "epoch": ...}``, keys
  prefixed ``module.``).
* **OpenAI**: the same layout (``visual.proj``, ``visual.attnpool.*``). OpenAI's own download is a TorchScript
  archive, which needs code to load: it is refused with a message saying how to get the plain state dict.
* **The config**: ``<file name>.json`` beside the weights, or the Hub folder's ``open_clip_config.json``
  (``model_cfg`` / ``preprocess_cfg``, or a bare model config).

Only the file's tensors are read (through :mod:`.weights`); nothing in it is run. Building the model the
weights fit is ``evaluation.open_clip_model``'s work. Pure torch; no ComfyUI or open_clip imports.
"""

from __future__ import annotations

import json
import os
import zipfile

import torch

from .weights import CheckpointFileError, read_tensor_file

HUB_CONFIG = "open_clip_config.json"


class OpenClipFileError(ValueError):
    """A file that cannot be used as an open_clip model; the message names the file and what to do."""


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The file's ``{key: tensor}`` in open_clip's layout (training checkpoints and ``module.`` unwrapped)."""
    name = os.path.basename(path)
    if _is_torchscript(path):
        raise OpenClipFileError(
            f"{name} is a TorchScript archive (OpenAI's original CLIP download), which needs code to load, and "
            "that is refused for safety. Use the plain weights instead: e.g. open_clip's "
            "open_clip_model.safetensors for the same model (on the Hugging Face Hub, repo timm/<model>.openai), "
            "or re-save this one once with torch.jit.load(...).state_dict() and safetensors."
        )
    try:
        content, _, _ = read_tensor_file(path, what="open_clip checkpoint")
    except CheckpointFileError as e:
        raise OpenClipFileError(str(e)) from None
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content:
        raise OpenClipFileError(
            f"{name} holds no weights dictionary ({type(content).__name__}): not an open_clip checkpoint"
        )
    sd = {}
    for key, value in content.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        sd[key[len("module.") :] if key.startswith("module.") else key] = value
    has_image = any(k.startswith("visual.") for k in sd)
    has_text = "token_embedding.weight" in sd or any(k.startswith("text.") for k in sd)
    if not (has_image and has_text):
        sample = ", ".join(sorted(sd)[:3]) or "no tensors"
        raise OpenClipFileError(
            f"{name} is not an open_clip checkpoint: it has no "
            f"{'image tower (visual.*)' if not has_image else 'text tower (token_embedding / text.*)'} "
            f"(its keys start: {sample}). An open_clip file holds both towers, e.g. open_clip_model.safetensors."
        )
    for key, t in sd.items():
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            raise OpenClipFileError(f"{name}: weight '{key}' holds NaN or infinite values; get the file again")
    return sd


def config_beside(path: str) -> tuple[dict, dict] | None:
    """``(model_cfg, preprocess_cfg)`` from ``<file>.json`` or the folder's ``open_clip_config.json``."""
    stem = os.path.splitext(path)[0]
    for candidate in (stem + ".json", os.path.join(os.path.dirname(path), HUB_CONFIG)):
        if os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise OpenClipFileError(f"{os.path.basename(candidate)} is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise OpenClipFileError(f"{os.path.basename(candidate)} does not hold a model config")
            model_cfg = data.get("model_cfg", data)
            if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
                raise OpenClipFileError(
                    f"{os.path.basename(candidate)} is not an open_clip model config (it needs embed_dim, "
                    "vision_cfg and text_cfg)"
                )
            return dict(model_cfg), dict(data.get("preprocess_cfg") or {})
    return None
