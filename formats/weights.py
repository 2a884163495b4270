"""Reading weight files safely, with errors that say what the file is and what to do.

Every weights file the pack reads (ED-LoRAs, LoRAs for the concept stack, fused-concepts files, SAM and
open_clip checkpoints) comes through here:

* ``.safetensors`` (or any file whose first bytes are a safetensors header) via ``safetensors``;
* PyTorch files (zip archives, or legacy pickles) via ``torch.load(weights_only=True)`` only: a file that
  needs pickle code execution is refused and nothing in it runs;
* anything else — an empty file, random bytes, an HTML page saved under a ``.pth`` name — is named as
  such instead of being reported as an unpicklable or "unsafe" file.

Tensors read from files are checked with :func:`check_weight_tensor` (float, finite, plausible size), so a
NaN or exploded weight is refused when it is loaded rather than producing black images later.

Pure torch + safetensors; no ComfyUI imports.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# No trained adapter or SAM weight comes anywhere near this; larger values mean a broken file or export.
MAX_ABS_WEIGHT = 1.0e4
_NEEDS_CODE = re.compile(r"GLOBAL|[Gg]lobal|reduce|[Cc]lass|build", re.ASCII)


class CheckpointFileError(ValueError):
    """A file that cannot be read as weights; the message names the file, what is wrong and the fix."""


def _sniff(path: str) -> str:
    """``"safetensors"``, ``"zip"`` (torch.save), ``"pickle"`` (legacy torch.save) or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _describe_bytes(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(12)
    text = head.decode("ascii", "replace")
    if head.lstrip().startswith((b"<", b"{")) or text.isprintable():
        return f"it starts with the text {text!r}"
    return "it starts with the bytes " + " ".join(f"{b:02x}" for b in head[:8])


def read_tensor_file(path: str | os.PathLike, what: str = "weights file") -> tuple[object, dict[str, str], str]:
    """``(content, metadata, kind)`` of a weights file. ``kind == "safetensors"``: a flat ``{key: Tensor}``
    dict and the file's string metadata; ``kind == "torch"``: whatever tensors and containers
    ``torch.save`` stored (no metadata)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointFileError(f"{what} {name} was not found at {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(
            f"{name} is empty (0 bytes): the download or copy did not finish. Get the {what} again."
        )
    kind = _sniff(path)
    if path.lower().endswith(SAFETENSORS_SUFFIXES) or kind == "safetensors":
        flat, metadata = _read_safetensors(path, name, what)
        return flat, metadata, "safetensors"
    if kind == "unknown":
        raise CheckpointFileError(
            f"{name} is not a PyTorch or safetensors file ({_describe_bytes(path)}); "
            f"was it saved from a web page or cut short? Get the {what} again."
        )
    return _read_torch(path, name, what), {}, "torch"


def _read_safetensors(path: str, name: str, what: str) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointFileError(
            f"{name} could not be read as safetensors (truncated or corrupt?): {detail}. Get the {what} again."
        ) from None
    return flat, metadata


def _read_torch(path: str, name: str, what: str):
    try:
        # weights_only=True: plain tensors and containers only; anything that needs code to run is refused.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        # torch's safe unpickler says "Weights only load failed" both for objects that need code (a GLOBAL,
        # a reduce or build of a class) and for plain garbage ("Unsupported operand 255"); tell them apart.
        corrupt = "Unsupported operand" in message or "Weights only load failed" not in message
        if not corrupt:
            detail = next((ln.strip() for ln in message.splitlines() if _NEEDS_CODE.search(ln)), "")
            raise CheckpointFileError(
                f"{name} needs pickle code execution to load, and that is refused for safety (nothing in it was "
                f"run). A {what} holds only tensors; re-save it as plain tensors or as .safetensors."
                + (f" Detail: {detail}" if detail else "")
            ) from None
        detail = next((ln.strip() for ln in message.splitlines() if "Unsupported operand" in ln), "")
        detail = detail or (message.splitlines()[0] if message else "bad pickle data")
        raise CheckpointFileError(
            f"{name} could not be read (truncated or corrupt?): {detail}. Get the {what} again."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointFileError(
            f"{name} could not be read (truncated or corrupt?): {detail}. Get the {what} again."
        ) from None


def check_weight_tensor(tensor, where: str, max_abs: float = MAX_ABS_WEIGHT) -> torch.Tensor:
    """``tensor`` if it is a finite float tensor of plausible magnitude; else a CheckpointFileError."""
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointFileError(f"{where} is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise CheckpointFileError(f"{where} holds {str(tensor.dtype).replace('torch.', '')} values, not floats")
    if tensor.numel() == 0:
        raise CheckpointFileError(f"{where} is empty (shape {list(tensor.shape)})")
    t = tensor.detach()
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointFileError(f"{where} contains {bad} NaN or infinite value(s): the file is broken")
    peak = float(t.abs().max())
    if peak > max_abs:
        raise CheckpointFileError(
            f"{where} has values up to {peak:.3g}, far beyond any trained weight (limit {max_abs:g}): the file is broken"
        )
    return tensor


def first_nonfinite(tensors: dict, limit: float = MAX_ABS_WEIGHT) -> str | None:
    """The first key of ``tensors`` whose float values are NaN/inf or beyond ``limit`` (None if all fine)."""
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            if not torch.isfinite(t).all() or float(t.detach().abs().max()) > limit:
                return str(key)
    return None


class OutputExistsError(FileExistsError):
    """The target name is taken (by a file, a folder or a link, dangling or not); nothing was written."""


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str], overwrite: bool = False) -> str:
    """Write a safetensors file whole or not at all, never through a link, never over what exists unless asked.

    The bytes go to a new temporary file in the target's folder, created exclusively under a random name
    (``tempfile.mkstemp``: a link planted there, at ``<name>.partial`` or any other name, is never opened),
    which is then renamed over ``path``: a rename replaces a link at ``path`` itself and never writes where it
    points. Without ``overwrite`` any entry at ``path``, a link included, is refused with OutputExistsError.
    A failure or an interruption leaves no temporary file behind.
    """
    import tempfile

    from safetensors.torch import save_file

    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{path} already exists; existing files are never overwritten")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        if not overwrite and os.path.lexists(path):  # taken while we wrote
            raise OutputExistsError(f"{path} already exists; existing files are never overwritten")
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return path
