"""Where is ComfyUI? COMFYUI_PATH, else the pack's grandparent (custom_nodes install), else ~/comfy/ComfyUI."""

from __future__ import annotations

import os
import re
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
SKIP_REASON = (
    "ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI (or place this pack in ComfyUI/custom_nodes/, "
    "or install ComfyUI at ~/comfy/ComfyUI); integration and e2e tests skipped"
)


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:  # an explicit choice: a wrong path means "not found", never a silent fallback
        p = Path(env).expanduser().resolve()
        return p if is_comfyui(p) else None
    if PACK_ROOT.parent.name == "custom_nodes" and is_comfyui(PACK_ROOT.parent.parent):
        return PACK_ROOT.parent.parent
    home = Path.home() / "comfy" / "ComfyUI"
    return home if is_comfyui(home) else None


def comfyui_version(path: Path) -> str:
    try:
        text = (path / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return m.group(1) if m else "unknown"
