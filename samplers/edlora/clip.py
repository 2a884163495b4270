"""Concept words in ComfyUI's CLIP: a tokenizer and a text encoder that understand ED-LoRA concepts.

The loader gives the user a clone of their CLIP whose ``tokenizer`` and ``cond_stage_model`` are these
thin wrappers (the wrapped objects are shared and never modified). With them, the stock
``CLIPTextEncode`` produces, for a prompt that names concepts:

* the usual conditioning tensor (concept words encoded with their layer-averaged embedding), and
* a :class:`LayerwiseContext` under ``LAYERWISE_KEY`` in the conditioning dict: the prompt encoded once
  per cross-attention layer with that layer's token embeddings (Mix-of-Show's ED-LoRA; 16 layers on SD1.5,
  70 on SDXL with both CLIP-L and CLIP-G embeddings), computed in batched text-encoder passes when the
  prompt is encoded — never per sampling step.

Prompts without concept words go straight to the wrapped objects, so they encode exactly as before.
"""

from __future__ import annotations

import torch

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
# Most 77-token sections per text-encoder call while encoding the layer variants of a prompt. One call
# holds the SD1.5 variants of a one-section prompt (17); SDXL's 71 go in three, which halves the text
# encoders' working memory and was no slower (full-size SDXL CLIP-L + CLIP-G, fp32, 2 CPU cores: one call
# +540 MB and 74 s, chunks of 24 +260 MB and 58 s; a plain prompt 1.1 s).
SECTIONS_PER_CALL = 24


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
    """Wraps a ComfyUI text encoder (``cond_stage_model``); adds the layer-wise contexts.

    Works for every encoder that turns each text encoder's token sections into one row of tokens each (77 for
    CLIP) and concatenates the sections along the tokens: SD1.5's CLIP-L (``{"l": ...}``, width 768) and SDXL's
    CLIP-L + CLIP-G (``{"l": ..., "g": ...}``, each encoded on its own and concatenated to width 2048 per
    token). Every key's sections are expanded into the same variants in the same order, so variant ``v``
    occupies the same token rows in every encoder's output and in their concatenation.

    ``include_reference=False`` (see :func:`layer_variants_only`) encodes the per-layer variants only, not the
    ordinary (layer-averaged) one; the returned conditioning is then layer 0's.
    """

    def __init__(self, base, vocab: ConceptVocabulary, include_reference: bool = True):
        super().__init__(base, vocab)
        self._include_reference = include_reference

    def encode_token_weights(self, token_weight_pairs):
        num_layers = self._vocab.num_layers
        if num_layers <= 1 or not has_markers(token_weight_pairs):
            # No concept words (or single-token concepts): the markers already carry the embedding.
            return self._base.encode_token_weights(token_weight_pairs)

        # All layer variants go through the stock encoder as extra sections (a few calls at most), so they
        # share batched forward passes and ComfyUI's own handling of (word:1.2) weights.
        section_counts = {len(s) for s in token_weight_pairs.values()}
        if len(section_counts) != 1:
            return self._base.encode_token_weights(token_weight_pairs)
        n = section_counts.pop()
        expanded = {}
        for key, sections in token_weight_pairs.items():
            variants = layer_variants(list(sections), num_layers, self._vocab.layer_embedding, key)
            # Layer 0 first, the ordinary (layer-averaged) conditioning last: ComfyUI returns the pooled
            # output of the first section, and ED-LoRAs are trained and sampled with layer 0's pooled output
            # (it conditions SDXL's whole UNet through the ADM input; SD1.5 does not use it).
            expanded[key] = variants[n:] + (variants[:n] if self._include_reference else [])
        cond, pooled, extra = self._encode_in_chunks(expanded)
        if not self._include_reference:
            b, total, width = cond.shape
            layers = cond.reshape(b, num_layers, total // num_layers, width)
            extra[LAYERWISE_KEY] = LayerwiseContext(layers=layers.contiguous(), reference=layers[:, 0].contiguous())
            return layers[:, 0].contiguous(), pooled, extra
        variants = num_layers + 1
        b, total, width = cond.shape
        if total % variants != 0:
            raise RuntimeError(
                f"the text encoder returned {total} tokens for {variants} prompt variants; cannot split them into "
                "per-layer encodings"
            )
        per_variant = total // variants
        stacked = cond.reshape(b, variants, per_variant, width)
        layers = stacked[:, :num_layers].contiguous()
        reference = stacked[:, num_layers].contiguous()
        if "attention_mask" in extra:  # keep masks describing the ordinary conditioning only
            extra["attention_mask"] = extra["attention_mask"][:, -per_variant:]
        extra[LAYERWISE_KEY] = LayerwiseContext(layers=layers, reference=reference)
        return reference, pooled, extra

    def _encode_in_chunks(self, expanded: dict):
        """The stock encoder over ``expanded``'s sections, at most ``SECTIONS_PER_CALL`` per call.

        Chunking bounds the text encoder's working memory (SDXL: 71 variants of every section through CLIP-G)
        without changing what is computed: sections are encoded independently (ComfyUI's prompt-weight
        interpolation uses an empty section of the same length in every call), and the pooled output is the
        first call's, i.e. the first section's, as in one call.
        """
        keys = list(expanded)
        total = len(expanded[keys[0]])
        conds, masks = [], []
        pooled, extra = None, {}
        for start in range(0, total, SECTIONS_PER_CALL):
            chunk = {key: sections[start : start + SECTIONS_PER_CALL] for key, sections in expanded.items()}
            out = self._base.encode_token_weights(chunk)
            conds.append(out[0])
            if start == 0:
                pooled = out[1]
                extra = dict(out[2]) if len(out) > 2 and isinstance(out[2], dict) else {}
            if len(out) > 2 and isinstance(out[2], dict) and "attention_mask" in out[2]:
                masks.append(out[2]["attention_mask"])
        if masks and len(masks) == len(conds):
            extra["attention_mask"] = torch.cat(masks, dim=1)
        return (conds[0] if len(conds) == 1 else torch.cat(conds, dim=1)), pooled, extra


def layer_variants_only(clip):
    """A clone of ``clip`` whose concept words are encoded as the per-layer prompt variants only (one per
    cross-attention layer, as official Mix-of-Show binds a prompt), without the ordinary layer-averaged one.
    For recording what the text encoder sees (fusion); ``clip`` itself is unchanged."""
    enc = clip.cond_stage_model
    if not isinstance(enc, ConceptTextEncoder):
        return clip
    new = clip.clone()
    new.tokenizer = clip.tokenizer
    new.cond_stage_model = ConceptTextEncoder(enc.base, enc.vocabulary, include_reference=False)
    return new


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
