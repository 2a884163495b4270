"""Concepts known to a CLIP: their prompt words and layer-wise token embeddings (pure Python + torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .tokens import make_marker


@dataclass(frozen=True)
class ConceptEntry:
    """One loaded concept: ``embeddings[word][clip_key]`` is ``[L, width]`` (row i = layer i's token)."""

    uid: str
    words: tuple[str, ...]
    embeddings: dict[str, dict[str, torch.Tensor]]
    source: str = ""

    @property
    def num_layers(self) -> int:
        first = self.embeddings[self.words[0]]
        return int(next(iter(first.values())).shape[0])


@dataclass(frozen=True)
class ConceptVocabulary:
    """The concepts a CLIP clone understands. Immutable: adding a concept gives a new vocabulary."""

    entries: tuple[ConceptEntry, ...] = ()
    _by_word: dict = field(default_factory=dict, compare=False, repr=False)
    _by_uid: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for e in self.entries:
            self._by_uid[e.uid] = e
            for w in e.words:
                self._by_word[w] = e

    def words(self) -> list[str]:
        return list(self._by_word)

    def entry(self, uid: str) -> ConceptEntry:
        return self._by_uid[uid]

    def owner_of(self, word: str) -> ConceptEntry | None:
        return self._by_word.get(word)

    @property
    def num_layers(self) -> int:
        return max((e.num_layers for e in self.entries), default=0)

    def free_words(self, words: tuple[str, ...]) -> tuple[str, ...]:
        """``words``, renamed where another concept already uses them (``<cat1>`` -> ``<cat1_2>``)."""
        taken = set(self._by_word)
        out = []
        for w in words:
            candidate, n = w, 2
            while candidate in taken:
                candidate = _suffixed(w, n)
                n += 1
            taken.add(candidate)
            out.append(candidate)
        return tuple(out)

    def with_entry(self, entry: ConceptEntry) -> ConceptVocabulary:
        clash = [w for w in entry.words if w in self._by_word]
        if clash:
            raise ValueError(f"concept words already in use: {' '.join(clash)}")
        if entry.uid in self._by_uid:
            raise ValueError(f"concept id {entry.uid} already in use")
        return ConceptVocabulary(entries=self.entries + (entry,))

    def new_uid(self, source: str) -> str:
        return f"c{len(self.entries)}:{source}"

    # --- embeddings used while encoding -------------------------------------------------------

    def marker(self, word: str, clip_key: str) -> dict:
        """The token that stands for ``word`` in a token list: carries the layer-averaged embedding."""
        entry = self._by_word[word]
        emb = entry.embeddings[word][clip_key]
        return make_marker(entry.uid, word, emb.mean(dim=0))

    def layer_embedding(self, ref: tuple[str, str], clip_key: str, layer: int) -> torch.Tensor:
        uid, word = ref
        emb = self._by_uid[uid].embeddings[word][clip_key]
        return emb[layer if emb.shape[0] > 1 else 0]


def _suffixed(word: str, n: int) -> str:
    m = re.fullmatch(r"(.*?)(>+)", word)
    return f"{m.group(1)}_{n}{m.group(2)}" if m else f"{word}_{n}"


@dataclass(frozen=True)
class EDLoRAConcept:
    """What the loader node hands to later nodes: which words name the concept and where it came from."""

    uid: str
    words: tuple[str, ...]
    class_word: str
    file: str
    base_model: str
    layer_tokens: int
    strength_unet: float
    strength_text: float
    renamed_from: tuple[str, ...] = ()
    # The parsed file under the concept's (possibly renamed) words, so the concept can join a concept stack.
    weights: object = field(default=None, compare=False, repr=False)

    @property
    def prompt_words(self) -> str:
        """The words to type in a prompt, e.g. ``<cat1> <cat2>``."""
        return " ".join(self.words)

    def describe(self) -> str:
        cls = f" ({self.class_word})" if self.class_word else ""
        renamed = f", renamed from {' '.join(self.renamed_from)}" if self.renamed_from else ""
        return f"{self.prompt_words}{cls} from {self.file}{renamed}"
