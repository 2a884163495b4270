"""Which tokens and boxes LoRA-Composer's losses follow (glue between the regional plan and the losses)."""

from __future__ import annotations

import math

import torch

from ..prompt_tokens import phrase_positions
from ..scoped_lora.lowrank import resize_area
from .guider import ComposerConcept, ComposerError
from .losses import bounding_rect

MIN_CELLS = 2  # a box must span this many cells of the loss map each way


def composer_concepts(node: str, stack, plans, region_clips, prompt_tokens: list[int]) -> list[ComposerConcept]:
    """One entry per (concept, its box): the positions of the concept's words in the box's prompt (its class
    word when it has no words). A concept whose words the box's prompt does not contain is an error: the
    enhancement loss pushes exactly those words' attention into the box."""
    out = []
    for plan, clip in zip(plans, region_clips, strict=True):
        for ci in plan.concepts:
            concept = stack[ci]
            words = list(concept.words) or ([concept.class_word.strip()] if concept.class_word.strip() else [])
            name = concept.prompt_words or concept.class_word or concept.source
            if not words:
                raise ComposerError(
                    f"{node}: concept {ci + 1} ({concept.source}) has no words and no class word, so LoRA-Composer "
                    "does not know which tokens to push into its box. Give it a class_word in its Concept Stack node."
                )
            tokens = sorted({p for w in words for found in phrase_positions(clip, plan.prompt, w) for p in found})
            if not tokens:
                raise ComposerError(
                    f"{node}: the prompt of {plan.name} ('{plan.prompt[:80]}') does not contain concept {ci + 1}'s "
                    f"words ({' '.join(words)}); LoRA-Composer pushes those words' attention into the box. Write them "
                    "in the box's prompt."
                )
            out.append(ComposerConcept(label=plan.label or name, region=plan.index, tokens=tuple(tokens),
                                       prompt_tokens=int(prompt_tokens[plan.index])))  # fmt: skip
    return out


def check_box_sizes(node: str, masks: torch.Tensor, concepts: list[ComposerConcept], width: int, height: int,
                    divisor: int) -> None:  # fmt: skip
    """Every concept's box must span ``MIN_CELLS`` cells of the loss map (1/``divisor`` of the latent)."""
    grid = (math.ceil(height / 8 / divisor), math.ceil(width / 8 / divisor))
    cell = 8 * divisor
    at_grid = resize_area(masks.float(), grid) >= 0.5
    for c in concepts:
        rect = bounding_rect(at_grid[c.region])
        span = (0, 0) if rect is None else (rect[1] - rect[0], rect[3] - rect[2])
        if min(span) < MIN_CELLS:
            raise ComposerError(
                f"{node}: box '{c.label}' is too small for the attention losses at {width}x{height}: they read a "
                f"{grid[1]}x{grid[0]} map (one cell per {cell} px), and a box must cover at least {MIN_CELLS}x"
                f"{MIN_CELLS} cells, i.e. {MIN_CELLS * cell}x{MIN_CELLS * cell} px. Draw it larger, or set "
                "enhancement, fill and region weights to 0."
            )
