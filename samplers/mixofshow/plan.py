"""Which concepts and prompts go to which region, checked before anything is encoded (pure Python + torch).

A concept goes to the regions whose label equals its ``label``; a concept without a label goes to the
regions whose prompt names its words. Every error names the box or concept and says what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..concept_stack.stack import Concept, ConceptStack
from ..edlora.tokens import find_concept_words
from ..regions import Regions

# Words written like ED-LoRA concept words (<cat1>): one that no concept of the stack owns is a mistake.
_CONCEPT_LIKE = re.compile(r"<[^<>\s:]+>")


class RegionalPlanError(ValueError):
    """A mismatch between prompts, regions and concepts; the message says what to change."""


@dataclass(frozen=True)
class RegionPlan:
    """One region: its prompts, its weight and the stack indices of its concepts."""

    index: int
    label: str
    prompt: str
    negative: str
    concepts: tuple[int, ...]
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"box {self.index + 1}" + (f" '{self.label}'" if self.label else "")


def box_name(index: int, label: str) -> str:
    return f"box {index + 1}" + (f" '{label}'" if label else "")


def _listing(stack: ConceptStack) -> str:
    if not len(stack):
        return "the concept stack is empty (no concepts are connected)"
    parts = []
    for c in stack:
        words = c.prompt_words or "(no words)"
        parts.append(f"{words} ({c.source}{', region ' + repr(c.label) if c.label else ''})")
    return "loaded concepts: " + "; ".join(parts)


def check_concept_words(text: str, where: str, stack: ConceptStack) -> None:
    """Refuse ``<word>``-style concept words that no concept of the stack owns."""
    known = {w for c in stack for w in c.words}
    unknown = [w for w in _CONCEPT_LIKE.findall(text) if w not in known]
    if unknown:
        raise RegionalPlanError(
            f"the {where} names {' '.join(dict.fromkeys(unknown))}, which no concept of the stack has; "
            f"{_listing(stack)}. Fix the words, or add the concept with a Concept Stack node."
        )


def parse_region_weights(text: str, regions: Regions, name: str = "region_weights", zero_ok: bool = False,
                         unset: float | None = 1.0) -> list[float | None]:  # fmt: skip
    """``""`` -> all ``unset``; ``"1, 1.5"`` -> per box in order; ``"cat=1.5, dog=0.8"`` -> by label (others
    ``unset``). ``name`` is the input named in messages; ``zero_ok`` allows 0."""
    count = len(regions)
    text = (text or "").strip()
    if not text:
        return [unset] * count
    items = [t.strip() for t in re.split(r"[,;\n]", text) if t.strip()]
    labels = [r.label for r in regions.regions]
    out = [unset] * count

    def number(s: str, what: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise RegionalPlanError(f"{name}: {what} is {s!r}, not a number") from None
        if not (v > 0 or (zero_ok and v == 0)) or v != v or v == float("inf"):
            kind = "a number from 0 up" if zero_ok else "a positive number"
            raise RegionalPlanError(f"{name}: {what} must be {kind}, got {s}")
        return v

    if all("=" in t for t in items):
        for t in items:
            label, value = (p.strip() for p in t.split("=", 1))
            picked = [i for i, lb in enumerate(labels) if lb == label]
            if not picked:
                shown = ", ".join(f"'{lb}'" for lb in labels if lb) or "(no box has a label)"
                raise RegionalPlanError(f"{name} names '{label}', but no box has that label; labels: {shown}")
            for i in picked:
                out[i] = number(value, f"the weight of '{label}'")
        return out
    if any("=" in t for t in items):
        raise RegionalPlanError(f"{name}: use either numbers in box order ('1, 1.5') or label=weight pairs")
    if len(items) != count:
        raise RegionalPlanError(
            f"{name} has {len(items)} number(s) but there are {count} boxes; give one per box, in order"
        )
    return [number(t, f"weight {i + 1}") for i, t in enumerate(items)]


def plan_regions(
    stack: ConceptStack, regions: Regions, global_prompt: str, global_negative: str, weights: list[float]
) -> list[RegionPlan]:
    """The regions with their concepts; RegionalPlanError for every mismatch the user can fix."""
    if not global_prompt or not global_prompt.strip():
        raise RegionalPlanError(
            "the global prompt is empty. Describe the whole scene there (e.g. 'a man and a dog in a park'); the "
            "boxes' prompts describe what goes inside each box."
        )
    if len(regions) == 0:
        raise RegionalPlanError("there are no regions: draw a box per concept in the Regions node")
    check_concept_words(global_prompt, "global prompt", stack)
    check_concept_words(global_negative or "", "global negative prompt", stack)
    labels = [r.label for r in regions.regions]
    concepts: list[list[int]] = [[] for _ in regions.regions]
    for ci, concept in enumerate(stack):
        if concept.label:
            picked = [i for i, lb in enumerate(labels) if lb == concept.label]
            if not picked:
                shown = ", ".join(f"'{lb}'" for lb in labels if lb) or "(no box has a label)"
                raise RegionalPlanError(
                    f"concept {ci + 1} ({concept.prompt_words or concept.source}) has region label "
                    f"'{concept.label}', but no box has that label; box labels: {shown}. Rename the box or the "
                    "concept's region_label so they match."
                )
        else:
            picked = [
                i
                for i, r in enumerate(regions.regions)
                if concept.words and find_concept_words(r.prompt, concept.words)
            ]
            if not picked:
                raise RegionalPlanError(
                    f"concept {ci + 1} ({concept.prompt_words or concept.source}) is in no box: give it the region "
                    "label of its box, or name its words in that box's prompt."
                )
        for i in picked:
            concepts[i].append(ci)
    plans = []
    for i, r in enumerate(regions.regions):
        where = box_name(i, r.label)
        if not r.prompt or not r.prompt.strip():
            raise RegionalPlanError(
                f"{where} has no prompt. Write what goes inside it (e.g. 'a photo of <cat1> <cat2>, a cat'), "
                "or delete the box."
            )
        check_concept_words(r.prompt, f"prompt of {where}", stack)
        check_concept_words(r.negative or "", f"negative prompt of {where}", stack)
        own = set(concepts[i])
        for ci, concept in enumerate(stack):
            if ci in own or not concept.words:
                continue
            if find_concept_words(r.prompt, concept.words) and concept.kind == "edlora":
                placed = ", ".join(box_name(j, labels[j]) for j, cs in enumerate(concepts) if ci in cs)
                raise RegionalPlanError(
                    f"the prompt of {where} names {concept.prompt_words}, the words of concept {ci + 1} which "
                    f"belongs to {placed}. A box's prompt can name only its own concepts: move the words, or give "
                    "the concept this box's label."
                )
        plans.append(
            RegionPlan(
                index=i,
                label=r.label,
                prompt=r.prompt,
                negative=r.negative or "",
                concepts=tuple(concepts[i]),
                weight=float(weights[i]),
            )
        )
    return plans


def concepts_in(text: str, stack: ConceptStack) -> list[int]:
    """Stack indices of the concepts whose words ``text`` names."""
    return [i for i, c in enumerate(stack) if c.words and find_concept_words(text, c.words)]


__all__ = [
    "Concept",
    "RegionPlan",
    "RegionalPlanError",
    "check_concept_words",
    "concepts_in",
    "parse_region_weights",
    "plan_regions",
]
