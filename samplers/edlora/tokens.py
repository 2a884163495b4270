"""Concept words in prompts: finding them, marking their token positions, building per-layer variants.

Token lists here have ComfyUI's shape — ``[[(token, weight[, word_id]), ...], ...]`` per text encoder, one
inner list per 77-token section — but are plain Python data; nothing here imports ComfyUI.

A concept word becomes one *marker* token: a dict ``{"type": "embedding", "data": Tensor[width],
MARKER_KEY: (concept_uid, word)}``. ComfyUI's text encoder already understands ``{"type": "embedding"}``
tokens (it feeds ``data`` as that position's input embedding), so a marker that reaches a stock encoder
still encodes sensibly (as the concept's layer-averaged embedding); our encoder swaps ``data`` per layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

MARKER_KEY = "multiconcept_word"

# Rare single-token words of CLIP's vocabulary, used as stand-ins while the stock tokenizer splits a
# prompt; the first one that does not already occur in the prompt is used.
PLACEHOLDER_CANDIDATES = ("ohwx", "httr", "shld", "rcn", "waj", "nhljets", "sks")


def word_pattern(words: Sequence[str]) -> re.Pattern | None:
    """A regex matching any of ``words`` as a whole word (longest first, so <cat10> beats <cat1>)."""
    if not words:
        return None
    parts = []
    for w in sorted(set(words), key=len, reverse=True):
        left = r"(?<![\w])" if re.match(r"\w", w[0]) else ""
        right = r"(?![\w])" if re.match(r"\w", w[-1]) else ""
        parts.append(f"{left}{re.escape(w)}{right}")
    return re.compile("|".join(parts))


def find_concept_words(text: str, words: Sequence[str]) -> list[str]:
    """The concept words of ``text`` in reading order (repeats included)."""
    pattern = word_pattern(words)
    return [] if pattern is None else [m.group(0) for m in pattern.finditer(text)]


def substitute_placeholder(text: str, words: Sequence[str], placeholder: str) -> tuple[str, list[str]]:
    """Replace every concept word by `` placeholder `` and return the new text and the words in order.

    The spaces keep the placeholder a separate word for the tokenizer; CLIP's tokenizer ignores spacing.
    """
    pattern = word_pattern(words)
    found: list[str] = []
    if pattern is None:
        return text, found

    def _sub(m: re.Match) -> str:
        found.append(m.group(0))
        return f" {placeholder} "

    return pattern.sub(_sub, text), found


def is_marker(token) -> bool:
    return isinstance(token, dict) and MARKER_KEY in token


def make_marker(concept_uid: str, word: str, data: torch.Tensor) -> dict:
    return {"type": "embedding", "data": data, MARKER_KEY: (concept_uid, word)}


def replace_placeholder_tokens(
    sections: list[list[tuple]], placeholder_id: int, markers: Sequence[dict]
) -> list[list[tuple]] | None:
    """Swap the k-th occurrence of ``placeholder_id`` for ``markers[k]``.

    Returns None when the count differs (the prompt itself contains the placeholder word), so the caller
    can retry with another placeholder.
    """
    count = sum(1 for section in sections for item in section if _is_token_id(item[0], placeholder_id))
    if count != len(markers):
        return None
    it = iter(markers)
    out = []
    for section in sections:
        new_section = []
        for item in section:
            if _is_token_id(item[0], placeholder_id):
                item = (next(it),) + tuple(item[1:])
            new_section.append(item)
        out.append(new_section)
    return out


def _is_token_id(token, token_id: int) -> bool:
    return isinstance(token, int) and not isinstance(token, bool) and token == token_id


def has_markers(token_dict: dict) -> bool:
    return any(is_marker(item[0]) for sections in token_dict.values() for section in sections for item in section)


def layer_variants(
    sections: list[list[tuple]],
    n_layers: int,
    layer_embedding: Callable[[tuple, str, int], torch.Tensor],
    clip_key: str,
) -> list[list[tuple]]:
    """``sections`` followed by ``n_layers`` copies in which every marker carries layer ``i``'s embedding.

    The first copy keeps the markers (layer-averaged data) and gives the conditioning that consumers
    without layer routing (ControlNet, other packs) see. The stock encoder batches all copies in one pass.
    """
    out = [list(s) for s in sections]
    for layer in range(n_layers):
        for section in sections:
            new_section = []
            for item in section:
                token = item[0]
                if is_marker(token):
                    token = {"type": "embedding", "data": layer_embedding(token[MARKER_KEY], clip_key, layer)}
                new_section.append((token,) + tuple(item[1:]))
            out.append(new_section)
    return out
