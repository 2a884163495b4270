"""open_clip models from local files: build the model a checkpoint fits and load it. Never downloads.

The files themselves (open_clip / LAION and OpenAI layouts, training checkpoints, the config JSON beside
them, TorchScript refused) are read by ``formats.open_clip``; nothing in them is run. The architecture is
named in the node (``ViT-B-32`` ...) or read from a config JSON beside the weights (``<file name>.json``, or
the Hub folder's ``open_clip_config.json``). OpenAI-layout weights get QuickGELU; with ``auto`` and no config
beside them, the architecture (ViT or ModifiedResNet) is read from the tensor shapes, as open_clip does for
OpenAI's files.

Architectures whose text tower or tokenizer comes from Hugging Face (``hf_model_name``, ``hf_tokenizer_name``)
would fetch files at load time, so they are not offered.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..formats.open_clip import HUB_CONFIG, OpenClipFileError, config_beside, read_state_dict

AUTO = "auto"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class OpenClip:
    """A loaded open_clip model with what scoring needs around it."""

    model: torch.nn.Module
    tokenizer: object  # callable: list[str] -> LongTensor [T, context]
    image_size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    name: str = ""
    architecture: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - a requirement of the pack
        raise OpenClipFileError(
            f"the open_clip package is not installed: run `pip install open_clip_torch` in ComfyUI's Python ({e})"
        ) from None
    return open_clip


def _needs_download(cfg: dict) -> str | None:
    text = cfg.get("text_cfg") or {}
    vision = cfg.get("vision_cfg") or {}
    if text.get("hf_model_name"):
        return f"its text tower comes from Hugging Face ({text['hf_model_name']})"
    if text.get("hf_tokenizer_name"):
        return f"its tokenizer comes from Hugging Face ({text['hf_tokenizer_name']})"
    if vision.get("hf_model_name"):
        return f"its image tower comes from Hugging Face ({vision['hf_model_name']})"
    return None


def list_architectures() -> list[str]:
    """``auto`` and every built-in open_clip architecture that can be built without fetching anything.

    Read from open_clip's bundled config files without importing it (importing pulls in timm and
    huggingface_hub: seconds at ComfyUI's start, for a list)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return [AUTO]
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model_configs")
    names = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not entry.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, entry), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and "vision_cfg" in cfg and _needs_download(cfg) is None:
            names.append(entry[: -len(".json")])
    return [AUTO, *sorted(names, key=str.lower)]


def _build(cfg: dict) -> torch.nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = json.loads(json.dumps(cfg))  # a deep copy the constructors may change
    vision = cfg.setdefault("vision_cfg", {})
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False  # the file holds the weights: never fetch timm's
    custom_text = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        from open_clip.coca_model import CoCa

        return CoCa(**cfg)
    return (CustomTextCLIP if custom_text else CLIP)(**cfg)


def _fit(model: torch.nn.Module, sd: dict, name: str, architecture: str) -> None:
    from open_clip.model import convert_to_custom_text_state_dict

    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        target = getattr(model, key, None)
        if key in sd and target is not None and target.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(target.shape)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(sd[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in {architecture})")  # fmt: skip
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in {architecture} (e.g. {unexpected[0]})")
        raise OpenClipFileError(
            f"{name} does not fit the architecture {architecture}: " + "; ".join(parts) + ". Pick the architecture "
            f"the file was trained as (e.g. ViT-B-32 for a ViT-B/32 file; -quickgelu for OpenAI's weights), or 'auto' "
            f"with a config JSON beside the file ({os.path.splitext(name)[0]}.json or {HUB_CONFIG})."
        )
    model.load_state_dict(sd, strict=True)


def _image_size(cfg_or_model) -> tuple[int, int]:
    size = cfg_or_model
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def load_open_clip(path: str | os.PathLike, architecture: str = AUTO) -> OpenClip:
    """Build the model ``architecture`` names (or ``auto``) and load the file's weights into it."""
    open_clip = _open_clip()
    path = os.fspath(path)
    name = os.path.basename(path)
    sd = read_state_dict(path)
    notes: list[str] = []
    preprocess: dict = {}
    if architecture == AUTO:
        found = config_beside(path)
        if found is not None:
            cfg, preprocess = found
            arch_name = "config beside the file"
        else:
            openai_layout = "visual.proj" in sd or "visual.attnpool.c_proj.weight" in sd
            if "token_embedding.weight" not in sd or not openai_layout:
                raise OpenClipFileError(
                    f"{name}: 'auto' reads the architecture from a config JSON beside the file "
                    f"({os.path.splitext(name)[0]}.json or {HUB_CONFIG}) or from OpenAI-layout weights; this file has "
                    "neither. Pick its architecture in the node (e.g. ViT-B-32)."
                )
            from open_clip.model import build_model_from_openai_state_dict

            try:
                model = build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)
                # it loads through float16 (as OpenAI's files were stored): load the file's own precision again
                model = model.float()
                own = model.state_dict()
                model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items() if k in own}, strict=True)
            except (KeyError, RuntimeError, ValueError, IndexError) as e:
                raise OpenClipFileError(
                    f"{name}: the architecture could not be read from the weights ({type(e).__name__}: {e}). Pick it "
                    "in the node (e.g. ViT-B-32)."
                ) from None
            model = model.eval().requires_grad_(False)
            size = model.visual.image_size
            notes.append("architecture read from the OpenAI-layout weights (QuickGELU)")
            return OpenClip(model, open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length),
                            _image_size(size), name=name, architecture="auto (OpenAI layout)", notes=notes)  # fmt: skip
    else:
        cfg = open_clip.get_model_config(architecture)
        if cfg is None:
            raise OpenClipFileError(f"unknown open_clip architecture {architecture!r}; pick one from the list")
        arch_name = architecture
    problem = _needs_download(cfg)
    if problem:
        raise OpenClipFileError(f"{arch_name}: {problem}, which would need a download; pick another architecture")
    try:
        model = _build(cfg)
    except (TypeError, ValueError, KeyError, RuntimeError, ImportError) as e:
        raise OpenClipFileError(f"{name}: the model config cannot be built ({type(e).__name__}: {e})") from None
    _fit(model, sd, name, arch_name)
    model = model.float().eval().requires_grad_(False)
    text_cfg = cfg.get("text_cfg") or {}
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)))
    vision_cfg = cfg.get("vision_cfg") or {}
    mean = tuple(preprocess.get("mean", OPENAI_MEAN))
    std = tuple(preprocess.get("std", OPENAI_STD))
    size = preprocess.get("size", vision_cfg.get("image_size", 224))
    return OpenClip(model, tokenizer, _image_size(size), mean, std, name=name, architecture=arch_name, notes=notes)
