"""Adapter files for the concept stack: read once, cached by (path, size, mtime).

The file formats themselves live in ``formats/``: ED-LoRA files in ``formats.edlora``, ordinary LoRA files
(kohya, diffusers, peft, LoCon, ...) in ``formats.lora``, both read safely through ``formats.weights``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

from ...formats.edlora import EDLoRAWeights, read_edlora
from ...formats.lora import LoRAFile, read_lora_file

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


def load_lora(path: str) -> LoRAFile:
    return cached(path, read_lora_file)
