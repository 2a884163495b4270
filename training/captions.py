"""Training captions: one per image, each naming the concept through a placeholder.

Pure Python; no ComfyUI, no torch.

A caption says what the picture shows *besides* the subject (SID, seed ``003``): the background, other
objects, the pose, the light. Whatever a caption leaves out, the concept words learn — so "a photo of <TOK>"
teaches the concept the sofa it sat on, while "a photo of <TOK> sitting on a green sofa by a window" keeps
the sofa and the window out of it. ``<TOK>`` stands for the concept words (``<cat1> <cat2>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLACEHOLDER = "<TOK>"
_PLACEHOLDER = re.compile(re.escape(PLACEHOLDER), re.IGNORECASE)


class CaptionError(ValueError):
    """Captions that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Captions:
    """The captions of a training set, placeholder replaced, one per image, and what was adjusted."""

    texts: tuple[str, ...]
    warnings: tuple[str, ...]


def split_captions(text: str) -> list[str]:
    """One caption per non-empty line (surrounding blanks dropped)."""
    if not isinstance(text, str):
        raise CaptionError(f"captions must be text, got {type(text).__name__}")
    return [line.strip() for line in text.splitlines() if line.strip()]


def prepare_captions(
    text: str, num_images: int, concept_words: str, default: str = f"a photo of {PLACEHOLDER}"
) -> Captions:
    """Captions for ``num_images`` images with ``<TOK>`` replaced by ``concept_words``.

    * One line per image, in image order. A single line is used for every image. Any other count is an
      error (which caption belongs to which picture would be a guess).
    * A caption without ``<TOK>`` gets ``concept_words`` put in front of it, with a warning: the concept
      must be named in every caption or its words learn nothing from that image.
    * No caption at all: ``default`` ("a photo of <TOK>"; "<TOK>" when the trainer adds the templates) for every
      image, with a warning.
    """
    if num_images < 1:
        raise CaptionError("there are no images to caption")
    words = concept_words.strip()
    if not words:
        raise CaptionError("the concept words are empty; give one or more words such as <cat1> <cat2>")
    lines = split_captions(text)
    warnings: list[str] = []
    if not lines:
        lines = [default]
        warnings.append(f"no captions given: every image is captioned '{default.replace(PLACEHOLDER, words)}'")
    if len(lines) == 1 and num_images > 1:
        lines = lines * num_images
    elif len(lines) != num_images:
        raise CaptionError(
            f"{len(lines)} caption lines for {num_images} images: write one line per image (in the images' order), "
            "or a single line for all of them"
        )
    out = []
    for i, line in enumerate(lines):
        if _PLACEHOLDER.search(line) is None:
            warnings.append(f"caption {i + 1} has no {PLACEHOLDER}: the concept words were put in front of it")
            line = f"{PLACEHOLDER} {line}"
        out.append(_PLACEHOLDER.sub(lambda _m: words, line))
    return Captions(texts=tuple(out), warnings=tuple(dict.fromkeys(warnings)))
