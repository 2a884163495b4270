"""Where words sit in an encoded prompt (ComfyUI glue shared by the methods that read attention maps)."""

from __future__ import annotations


def _token_key(token):
    """A comparable stand-in for a token: its id, or for an embedding token (an ED-LoRA concept word's
    marker, a textual inversion) what identifies it."""
    if isinstance(token, int):
        return token
    if isinstance(token, dict):
        from .edlora.tokens import MARKER_KEY

        if MARKER_KEY in token:
            return ("concept", token[MARKER_KEY])
    return ("embedding", id(token))


def token_ids(clip, text: str) -> list:
    """The tokens of ``text`` as ``clip`` encodes it (ids; concept words as ``("concept", (uid, word))``), its
    77-token chunks concatenated (with their start, end and padding tokens), so positions index the encoded
    context."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    return [_token_key(t[0]) for chunk in tokens[key] for t in chunk]


def phrase_positions(clip, prompt: str, phrase: str) -> list[list[int]]:
    """For each occurrence of ``phrase`` in ``prompt``: the positions of all its tokens."""
    empty = token_ids(clip, "")
    end = empty[1] if len(empty) > 1 else None
    inner = []
    for t in token_ids(clip, phrase)[1:]:
        if t == end:
            break
        inner.append(t)
    if not inner:
        return []
    seq = token_ids(clip, prompt)
    n = len(inner)
    return [list(range(i, i + n)) for i in range(len(seq) - n + 1) if seq[i : i + n] == inner]
