"""Concepts and the ordered stack of them that method nodes read (pure Python + torch, no ComfyUI).

A concept is an adapter plus what the methods need to place it: the words that name it in prompts, its
class word, the strengths of its UNet and text-encoder parts, and the label of the region it belongs to.
Nothing is merged here; each method decides how the adapter acts (scoped to a region, to batch rows, or
fused). Stacks are immutable: adding a concept returns a new stack, so a node's input is never changed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

log = logging.getLogger("multiconcept")

KINDS = ("edlora", "lora")
# The Concept Stack nodes' default strengths per kind (Mix-of-Show's inference alpha 0.7 for ED-LoRAs; 1.0, as
# Load LoRA, for ordinary LoRAs). A method whose official strength differs uses its own where these are left.
DEFAULT_STRENGTHS = {"edlora": 0.7, "lora": 1.0}


class ConceptStackError(ValueError):
    """A concept that cannot join the stack; the message says why and what to do."""


@dataclass(frozen=True)
class Concept:
    """One concept of the picture.

    ``adapter`` is an ``EDLoRAWeights`` for ``kind == "edlora"`` and a ``LoRAFile`` for ``kind == "lora"``.
    ``words``: for an ED-LoRA its new prompt words (``<cat1> <cat2>``); for a LoRA its trigger words
    (possibly none). ``label``: the label of the region this concept belongs to ("" = not placed).
    """

    uid: str
    kind: str
    source: str
    words: tuple[str, ...]
    class_word: str = ""
    label: str = ""
    strength_unet: float = 1.0
    strength_text: float = 1.0
    adapter: object = field(default=None, compare=False, repr=False)
    renamed_from: tuple[str, ...] = ()
    loader_uid: str = ""  # set when the concept came from an ED-LoRA Loader (which merged it into its MODEL)
    fused: str = ""  # the id of the fusion whose MODEL/CLIP carry this concept (Fuse Concepts); "" = not fused

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConceptStackError(f"unknown concept kind {self.kind!r}")

    @property
    def prompt_words(self) -> str:
        return " ".join(self.words)

    @property
    def name(self) -> str:
        """How messages refer to the concept: its label, else its words, else its file."""
        return self.label or self.prompt_words or self.source

    def describe(self) -> str:
        parts = [f"{self.kind} {self.source}"]
        if self.words:
            parts.append(f"words {self.prompt_words}")
        if self.class_word:
            parts.append(f"class {self.class_word}")
        parts.append(f"region {self.label!r}" if self.label else "no region")
        parts.append(f"unet x{self.strength_unet:g}, text x{self.strength_text:g}")
        if self.renamed_from:
            parts.append(f"renamed from {' '.join(self.renamed_from)}")
        if self.fused:
            parts.append("fused (its LoRA is in the fused MODEL and CLIP)")
        return ", ".join(parts)


def _suffixed(word: str, n: int) -> str:
    m = re.fullmatch(r"(.*?)(>+)", word)
    return f"{m.group(1)}_{n}{m.group(2)}" if m else f"{word}_{n}"


@dataclass(frozen=True)
class ConceptStack:
    """The concepts of one picture, in the order they were added (socket type ``CONCEPT_STACK``)."""

    concepts: tuple[Concept, ...] = ()

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self):
        return iter(self.concepts)

    def __getitem__(self, i) -> Concept:
        return self.concepts[i]

    def words_in_use(self) -> set[str]:
        return {w for c in self.concepts if c.kind == "edlora" for w in c.words}

    def free_words(self, words: tuple[str, ...]) -> tuple[str, ...]:
        """ED-LoRA ``words`` renamed where an earlier ED-LoRA of the stack uses them (``<cat1>`` -> ``<cat1_2>``)."""
        taken = self.words_in_use()
        out = []
        for w in words:
            candidate, n = w, 2
            while candidate in taken:
                candidate = _suffixed(w, n)
                n += 1
            taken.add(candidate)
            out.append(candidate)
        return tuple(out)

    def at_strength(self, strength: float) -> ConceptStack:
        """The stack with each strength still at its Concept Stack node's default (``DEFAULT_STRENGTHS``: the user
        left it) set to ``strength``, a method's official value; a strength the user changed (0 included) is
        kept. Words, labels and adapters unchanged."""

        def official(value: float, kind: str) -> float:
            default = DEFAULT_STRENGTHS.get(kind)
            return float(strength) if default is not None and abs(float(value) - default) < 1e-6 else value

        concepts = tuple(
            replace(c, strength_unet=official(c.strength_unet, c.kind), strength_text=official(c.strength_text, c.kind))
            for c in self
        )
        return replace(self, concepts=concepts)

    def with_concept(self, concept: Concept) -> ConceptStack:
        """A new stack with ``concept`` appended: a fresh uid, and clashing ED-LoRA words renamed."""
        uid = f"c{len(self.concepts)}"
        if concept.kind == "edlora":
            free = self.free_words(concept.words)
            if free != concept.words:
                log.warning(
                    "[multi-concept] %s: concept words %s are already used by an earlier concept of the stack; "
                    "use %s in prompts for this one.",
                    concept.source,
                    " ".join(concept.words),
                    " ".join(free),
                )
                adapter = concept.adapter.with_words(free) if concept.adapter is not None else None
                concept = replace(
                    concept, words=free, adapter=adapter, renamed_from=concept.renamed_from or concept.words
                )
        else:
            clash = set(concept.words) & {w for c in self.concepts for w in c.words}
            if clash:
                log.warning(
                    "[multi-concept] %s: trigger word(s) %s are also used by another concept of the stack; "
                    "a prompt naming them will call both.",
                    concept.source,
                    " ".join(sorted(clash)),
                )
        return ConceptStack(self.concepts + (replace(concept, uid=uid),))

    def labels(self) -> list[str]:
        return [c.label for c in self.concepts]

    def describe(self) -> str:
        if not self.concepts:
            return "(empty concept stack)"
        return "\n".join(f"{i + 1}. {c.describe()}" for i, c in enumerate(self.concepts))
