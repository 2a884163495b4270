"""Concept words in ComfyUI's CLIP: a tokenizer and a text encoder that understand ED-LoRA concepts.

The loader gives the user a clone of their CLIP whose ``tokenizer`` and ``cond_stage_model`` are these
thin wrappers (the wrapped objects are shared and never modified). With them, the stock
``CLIPTextEncode`` produces, for a prompt that names concepts:

* the usual conditioning tensor (concept words encoded with their layer-averaged embedding), and
* a :class:`LayerwiseContext` under ``LAYERWISE_KEY`` in the conditioning dict: the prompt encoded once
  per cross-attention layer with that layer's token embeddings (Mix-of-Show's ED-LoRA), computed in one
  batched text-encoder pass when the prompt is encoded — never per sampling step.

Prompts without concept words go straight to the wrapped objects, so they encode exactly as before.
"""

from __future__ import annotations

from .layerwise import LayerwiseContext
from .tokens import (
    PLACEHOLDER_CANDIDATES,
    find_concept_words,
    has_markers,
    layer_variants,
    replace_placeholder_tokens,
    substitute_placeholder,
)
from .vocabulary import ConceptVocabulary

LAYERWISE_KEY = "multiconcept_layerwise"


class _Delegating:
    """Wraps a ComfyUI object for one vocabulary; forwards every attribute it does not define."""

    def __init__(self, base, vocab: ConceptVocabulary):
        self._base = base
        self._vocab = vocab

    @property
    def base(self):
        return self._base

    @property
    def vocabulary(self) -> ConceptVocabulary:
        return self._vocab

    def __getattr__(self, name):
        # Never resolve private/dunder names through the wrapped object while it is not set yet
        # (copy/pickle create instances without __init__).
        if name.startswith("__") or name in ("_base", "_vocab", "_placeholder_ids"):
            raise AttributeError(name)
        return getattr(self._base, name)


class ConceptTokenizer(_Delegating):
    """Wraps a ComfyUI tokenizer (e.g. ``SD1Tokenizer``); concept words become marker tokens."""

    def __init__(self, base, vocab: ConceptVocabulary):
        super().__init__(base, vocab)
        self._placeholder_ids: dict[str, dict | None] = {}

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        words = self._vocab.words()
        if not find_concept_words(text, words):
            return self._base.tokenize_with_weights(text, return_word_ids, **kwargs)
        for placeholder in PLACEHOLDER_CANDIDATES:
            ids = self._placeholder_token_ids(placeholder)
            if ids is None:
                continue
            new_text, found = substitute_placeholder(text, words, placeholder)
            tokens = self._base.tokenize_with_weights(new_text, return_word_ids, **kwargs)
            result = {}
            for key, sections in tokens.items():
                if key not in ids:
                    break
                markers = [self._vocab.marker(w, key) for w in found]
                replaced = replace_placeholder_tokens(sections, ids[key], markers)
                if replaced is None:
                    break  # the prompt itself contains this placeholder word: try the next one
                result[key] = replaced
            else:
                return result
        raise ValueError(
            "could not place the concept words of this prompt (every stand-in word already occurs in it): " + text[:200]
        )

    def _placeholder_token_ids(self, placeholder: str) -> dict | None:
        """Per text encoder, the single token id of ``placeholder`` (None if it is not one token everywhere)."""
        if placeholder not in self._placeholder_ids:
            empty = self._base.tokenize_with_weights("")
            alone = self._base.tokenize_with_weights(placeholder)
            ids = {}
            for key, sections in alone.items():
                special = {item[0] for s in empty.get(key, []) for item in s}
                new = [item[0] for s in sections for item in s if item[0] not in special]
                if len(new) != 1 or not isinstance(new[0], int):
                    ids = None
                    break
                ids[key] = new[0]
            self._placeholder_ids[placeholder] = ids
        return self._placeholder_ids[placeholder]


class ConceptTextEncoder(_Delegating):
    """Wraps a ComfyUI text encoder (``cond_stage_model``); adds the layer-wise contexts."""

    def encode_token_weights(self, token_weight_pairs):
        num_layers = self._vocab.num_layers
        if num_layers <= 1 or not has_markers(token_weight_pairs):
            # No concept words (or single-token concepts): the markers already carry the embedding.
            return self._base.encode_token_weights(token_weight_pairs)

        # All layer variants go through the stock encoder as extra sections of one call, so they share
        # one batched forward pass and ComfyUI's own handling of (word:1.2) weights.
        sections = {len(s) for s in token_weight_pairs.values()}
        if len(sections) != 1:
            return self._base.encode_token_weights(token_weight_pairs)
        expanded = {
            key: layer_variants(list(s), num_layers, self._vocab.layer_embedding, key)
            for key, s in token_weight_pairs.items()
        }
        out = self._base.encode_token_weights(expanded)
        cond, pooled = out[0], out[1]
        extra = dict(out[2]) if len(out) > 2 and isinstance(out[2], dict) else {}
        variants = num_layers + 1
        b, total, width = cond.shape
        per_variant = total // variants
        stacked = cond.reshape(b, variants, per_variant, width)
        reference = stacked[:, 0].contiguous()
        layers = stacked[:, 1:].contiguous()
        if "attention_mask" in extra:  # keep masks describing the ordinary conditioning only
            extra["attention_mask"] = extra["attention_mask"][:, :per_variant]
        extra[LAYERWISE_KEY] = LayerwiseContext(layers=layers, reference=reference)
        return reference, pooled, extra


def concept_vocabulary_of(clip) -> ConceptVocabulary:
    tok = getattr(clip, "tokenizer", None)
    return tok.vocabulary if isinstance(tok, ConceptTokenizer) else ConceptVocabulary()


def with_vocabulary(clip, vocab: ConceptVocabulary):
    """A clone of ``clip`` whose tokenizer and text encoder understand ``vocab``'s concepts."""
    tok = clip.tokenizer
    enc = clip.cond_stage_model
    base_tok = tok.base if isinstance(tok, ConceptTokenizer) else tok
    base_enc = enc.base if isinstance(enc, ConceptTextEncoder) else enc
    new = clip.clone()
    new.tokenizer = ConceptTokenizer(base_tok, vocab)
    new.cond_stage_model = ConceptTextEncoder(base_enc, vocab)
    return new
