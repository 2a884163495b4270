"""Which region each concept of a stack goes to: matched by the region's label (pure Python + torch)."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..regions import Regions
from .stack import Concept, ConceptStack, ConceptStackError


def _listing(labels) -> str:
    shown = [f"'{label}'" for label in labels if label]
    return ", ".join(shown) if shown else "(no box has a label)"


def concept_masks(stack: ConceptStack, regions: Regions) -> list[tuple[Concept, torch.Tensor]]:
    """``[(concept, mask [H, W] at image size)]`` for every concept of the stack, in stack order.

    A concept goes to every region whose label equals its ``label`` (SAM masks where the regions carry
    them, else boxes); several regions with one label are joined. A concept without a label, or with a
    label no region has, is an error listing the labels there are; so is a region whose mask is empty.
    """
    if len(stack) == 0:
        raise ConceptStackError("the concept stack is empty: add concepts with the Concept Stack nodes")
    if len(regions) == 0:
        raise ConceptStackError("there are no regions: draw a box per concept in the Regions node")
    masks = regions.masks()
    labels = [r.label for r in regions.regions]
    out = []
    for i, concept in enumerate(stack):
        where = f"concept {i + 1} ({concept.source})"
        if not concept.label:
            raise ConceptStackError(
                f"{where} has no region label. Set its region_label to the label of its box: {_listing(labels)}."
            )
        picked = [k for k, label in enumerate(labels) if label == concept.label]
        if not picked:
            raise ConceptStackError(
                f"{where} is labelled '{concept.label}', but no region has that label. Region labels: "
                f"{_listing(labels)}. Rename the box or the concept's region_label so they match."
            )
        mask = masks[picked].amax(dim=0)
        if float(mask.max()) <= 0:
            raise ConceptStackError(
                f"the mask of region '{concept.label}' is empty (nothing of it is inside the image, or SAM found "
                "nothing). Redraw the box, or check the SAM masks."
            )
        out.append((concept, mask))
    return out


def labelled_for_preview(stack: ConceptStack, regions: Regions) -> Regions:
    """``regions`` with each label extended by the concepts placed there (``cat: cat_lora.safetensors``)."""
    by_label: dict[str, list[str]] = {}
    for concept in stack:
        by_label.setdefault(concept.label, []).append(concept.prompt_words or concept.source)
    new = []
    for r in regions.regions:
        names = by_label.get(r.label)
        new.append(replace(r, label=f"{r.label}: {', '.join(names)}" if names else (r.label or "") + " (no concept)"))
    return replace(regions, regions=tuple(new))
