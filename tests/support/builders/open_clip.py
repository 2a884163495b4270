"""A tiny open_clip model with seeded random weights (ViT image tower, CLIP text tower; real tokenizer vocabulary).

Saved as open_clip's own layout (``visual.*``, ``transformer.*``, ``token_embedding.weight`` ...) with its
architecture in a config JSON beside the file, the way the Hub ships open_clip models, so the loader's
``auto`` reads it. ``openai_layout=True`` leaves the config out: the loader then reads the architecture from
the tensor shapes (OpenAI's format).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# one 64-wide head per layer: OpenAI's convention, which the loader assumes when it reads a file's shapes
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def build_tiny_open_clip(seed: int = 0, quick_gelu: bool = False) -> torch.nn.Module:
    from open_clip.model import CLIP

    torch.manual_seed(seed)  # open_clip initialises its parameters from the global generator
    state = torch.random.get_rng_state()
    try:
        model = CLIP(**json.loads(json.dumps(TINY_CONFIG)), quick_gelu=quick_gelu)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # larger weights than the default init, so different images embed differently
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.2, generator=gen)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def save_tiny_open_clip(path: Path, seed: int = 0, openai_layout: bool = False, torch_format: bool = False) -> Path:
    """Write the tiny model to ``path`` (.safetensors, or a torch ``state_dict`` checkpoint with ``module.``
    prefixes when ``torch_format``) and, unless ``openai_layout``, ``<stem>.json`` with its config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_tiny_open_clip(seed, quick_gelu=openai_layout)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if torch_format:
        torch.save({"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        save_file(sd, str(path))
    if not openai_layout:
        path.with_suffix(".json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    return path
