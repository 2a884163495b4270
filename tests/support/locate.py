"""Where is ComfyUI?  COMFYUI_PATH, else the pack's grandparent (custom_nodes install), else ~/comfy/ComfyUI.

scripts/test.sh searches in the same order (keep the two in step). An explicitly set COMFYUI_PATH that is
not a ComfyUI checkout means "not found": it never falls through to the other places.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def _pack_roots_as_reached() -> list[Path]:
    """The pack's path with symlinks kept (ComfyUI/custom_nodes/<pack> may be a link to a clone elsewhere).

    Python gives __file__ from the physical working directory, so the shell's logical $PWD is asked too.
    """
    roots = [Path(os.path.abspath(__file__)).parents[2]]
    pwd = os.environ.get("PWD")
    if pwd:
        for p in (Path(pwd), *Path(pwd).parents):
            try:
                if p.resolve() == PACK_ROOT:
                    roots.append(p)
                    break
            except OSError:
                break
    roots.append(PACK_ROOT)
    return list(dict.fromkeys(roots))


SKIP_REASON = (
    "ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI (or place this pack in ComfyUI/custom_nodes/, "
    "or install ComfyUI at ~/comfy/ComfyUI); integration and e2e tests skipped"
)


def is_comfyui(path: Path) -> bool:
    """A candidate counts only if it has ComfyUI's core files (not just a folder called ComfyUI)."""
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def candidates() -> list[tuple[str, Path]]:
    """(where from, path) in search order; COMFYUI_PATH, when set, is the only candidate."""
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if env:
        return [("COMFYUI_PATH", Path(env).expanduser().absolute())]
    found = []
    for root in _pack_roots_as_reached():
        if root.parent.name == "custom_nodes":
            found.append(("custom_nodes install", root.parent.parent))
    found.append(("~/comfy/ComfyUI", Path.home() / "comfy" / "ComfyUI"))
    return found


def find_comfyui() -> Path | None:
    for _, path in candidates():
        if is_comfyui(path):
            return path.resolve()
    return None


def wrong_comfyui_path() -> str | None:
    """The message for a COMFYUI_PATH that is set but is not a ComfyUI checkout (None when all is well).

    Such a run must fail, not quietly skip every integration and e2e test."""
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if not env or is_comfyui(Path(env).expanduser().absolute()):
        return None
    return (
        f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py and nodes.py there). "
        "Fix the path, or unset COMFYUI_PATH to use ~/comfy/ComfyUI."
    )


def comfyui_version(path: Path) -> str:
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return m.group(1) if m else "unknown"
