"""Response-weighted concept mixing on ComfyUI's MODEL and CLIP (the ComfyUI glue of ``response``).

* ``e_avg_i`` (:func:`concept_means`): for an ED-LoRA the mean of its token input embeddings over all its
  words and all layer rows (``adapter.embeddings[word][clip_key]``), per text encoder, concatenated in the
  order the conditioning concatenates the encoders (SDXL: CLIP-L then CLIP-G, 768 + 1280 = 2048 wide, as
  ``comfy/sdxl_clip.py`` does); for an ordinary LoRA the mean of the CLIP's token-embedding rows of its
  trigger words' tokens, concatenated the same way.
* ``e_prompt_t`` (:func:`prompt_token_outputs`): the prompt encoded by a CLIP that knows every ED-LoRA
  concept's words (no text-encoder LoRA), at its real tokens: per 77-token section the BOS position and the
  padding after the first end token are left out (the end token itself is kept: CLIP's summary of the
  prompt). When the prompt names ED-LoRA words it has layer-wise encodings (``LayerwiseContext``): then
  every layer's rows count as well as the ordinary (reference) conditioning's, so ``R_i`` is the max over
  layers and tokens.
* :func:`apply_weighted`: each concept's LoRA merged at ``strength_unet * w_i`` (UNet) and
  ``strength_text * w_i`` (text encoder), as ordinary weight patches on clones; the inputs are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..concept_stack.lora_fit import LoRAFitError, lora_patches
from ..concept_stack.stack import Concept, ConceptStack
from ..edlora.clip import LAYERWISE_KEY, ConceptTokenizer
from ..edlora.model import (
    _TOKEN_EMBEDDING,
    MERGED_KEY,
    add_layerwise_routing,
    check_compatible,
    text_encoder_prefixes,
    unet_patches,
)
from ..mixofshow.encoding import concept_clip, encode
from .response import DEFAULT_TEMPERATURE, MODES, response_scores, response_weights

# SDXL's conditioning is torch.cat([CLIP-L, CLIP-G], dim=-1) (comfy/sdxl_clip.py); other keys follow, sorted.
CONDITIONING_ORDER = ("l", "g")


class ResponseMixError(ValueError):
    """Input the response-weighted mix cannot use; the message names the concept and the fix."""


@dataclass(frozen=True)
class ResponseMix:
    """What the node returns: the weighted clones, the prompt encoded with the weighted CLIP, the numbers."""

    model: object
    clip: object
    conditioning: list
    scores: torch.Tensor  # R [N]
    weights: torch.Tensor  # w [N]
    table: str


def _concept_title(index: int, concept: Concept) -> str:
    label = f" (region {concept.label})" if concept.label else ""
    return f"concept {index + 1} ({concept.source}{label})"


def _refuse_fused(stack: ConceptStack) -> None:
    for i, concept in enumerate(stack):
        if getattr(concept, "fused", ""):
            raise ResponseMixError(
                f"{_concept_title(i, concept)} is a fused concept: its LoRA is part of the fused MODEL's and CLIP's "
                "weights, so it cannot be weighted by the prompt. Build the stack from the original concept files "
                "(Concept Stack: ED-LoRA / LoRA) and connect the checkpoint's MODEL and CLIP."
            )


# ------------------------------------------------------------------------------------------ e_avg


def conditioning_keys(clip) -> tuple[str, ...]:
    """The CLIP's text-encoder keys in the order its conditioning concatenates them (SDXL: ``("l", "g")``)."""
    keys = list(clip.tokenize("a").keys())
    return tuple(k for k in CONDITIONING_ORDER if k in keys) + tuple(
        sorted(k for k in keys if k not in CONDITIONING_ORDER)
    )


def _edlora_mean(concept: Concept, key: str, index: int) -> torch.Tensor:
    rows = []
    for word in concept.words:
        emb = concept.adapter.embeddings.get(word, {}).get(key)
        if emb is None:
            raise ResponseMixError(
                f"{_concept_title(index, concept)} has no token embedding of {word} for text encoder "
                f"CLIP-{key.upper()}: it was trained for another model family. Use the CLIP of the checkpoint it "
                "was trained for."
            )
        rows.append(emb.detach().float().cpu().reshape(-1, emb.shape[-1]))
    return torch.cat(rows).mean(dim=0)


def _token_tables(clip) -> dict[str, torch.Tensor]:
    """``{clip key: token-embedding weight [vocabulary, width]}`` of the CLIP's text encoders."""
    state = clip.patcher.model.state_dict()
    return {key: state[prefix + _TOKEN_EMBEDDING] for key, prefix in text_encoder_prefixes(clip).items()}


def _trigger_word_mean(clip, concept: Concept, key: str, index: int, tables: dict) -> torch.Tensor:
    tokenizer = clip.tokenizer.base if isinstance(clip.tokenizer, ConceptTokenizer) else clip.tokenizer
    tokens = tokenizer.tokenize_with_weights(concept.prompt_words, True)
    table = tables.get(key)
    if table is None:
        raise ResponseMixError(f"this CLIP has no token-embedding table for text encoder CLIP-{key.upper()}")
    rows = []
    for section in tokens.get(key, []):
        for item in section:
            token, word_id = item[0], item[2]
            if word_id <= 0:
                continue  # start, end and padding
            if isinstance(token, int) and not isinstance(token, bool):
                rows.append(table[token].detach().float().cpu())
            elif isinstance(token, torch.Tensor) and token.shape[-1] == table.shape[1]:  # a textual inversion
                rows.append(token.detach().float().cpu().reshape(-1, table.shape[1]).mean(dim=0))
    if not rows:
        raise ResponseMixError(
            f"the trigger words of {_concept_title(index, concept)} ({concept.prompt_words!r}) give no tokens for "
            f"CLIP-{key.upper()}. Give the LoRA's trigger words in its Concept Stack node."
        )
    return torch.stack(rows).mean(dim=0)


def concept_means(clip, stack: ConceptStack) -> torch.Tensor:
    """``e_avg [N, D]``, one row per concept of ``stack`` in stack order (see the module doc).

    ``D`` is the width of the CLIP's conditioning (768 for SD1.5, 2048 for SDXL). An ordinary LoRA without
    trigger words has nothing to compare with the prompt: ResponseMixError naming the concept.
    """
    keys = conditioning_keys(clip)
    tables = None
    rows = []
    for i, concept in enumerate(stack):
        if concept.kind == "edlora":
            parts = [_edlora_mean(concept, key, i) for key in keys]
        else:
            if not concept.words:
                raise ResponseMixError(
                    f"{_concept_title(i, concept)} is a LoRA without trigger words, so the prompt's response to it "
                    "cannot be measured. Type its trigger words into trigger_words of its Concept Stack: LoRA node "
                    "(and use them in the prompt)."
                )
            tables = _token_tables(clip) if tables is None else tables
            parts = [_trigger_word_mean(clip, concept, key, i, tables) for key in keys]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------- e_prompt


def prompt_clip(clip, stack: ConceptStack):
    """A clone of ``clip`` that knows every ED-LoRA concept's words and carries no concept's LoRA."""
    return concept_clip(clip, [c for c in stack if c.kind == "edlora"], [])


def real_token_mask(tokens: dict) -> torch.Tensor:
    """``bool [T]`` over the tokenized prompt's positions (all sections in a row): True at real tokens.

    ``tokens`` as ``clip.tokenize(text, return_word_ids=True)`` gives it. Per section the start token
    (position 0, word id 0) and everything after the first end token (the first later position with word id
    0) are False; the end token is True. CLIP-L's positions are used (every key has the same layout).
    """
    key = "l" if "l" in tokens else next(iter(tokens))
    mask = []
    for section in tokens[key]:
        if section and len(section[0]) < 3:
            raise ValueError("real_token_mask needs tokens with word ids (tokenize(text, return_word_ids=True))")
        keep = [False] * len(section)
        start = 1 if section and section[0][2] == 0 else 0
        for j in range(start, len(section)):
            keep[j] = True
            if section[j][2] == 0:
                break  # the first end token: kept; the padding after it is not
        mask.extend(keep)
    return torch.tensor(mask, dtype=torch.bool)


def prompt_token_outputs(conditioning: list, tokens: dict) -> torch.Tensor:
    """``e_prompt [K * T_real, D]``: the encoded prompt's rows at its real tokens (:func:`real_token_mask`).

    ``K = 1`` for an ordinary encoding; with layer-wise encodings (``LAYERWISE_KEY``) ``K = layers + 1``:
    every layer's encoding and the reference conditioning.
    """
    cond, extra = conditioning[0][0], conditioning[0][1]
    encodings = [cond[0]]
    layerwise = extra.get(LAYERWISE_KEY)
    if layerwise is not None:
        encodings = list(layerwise.layers[0]) + encodings
    mask = real_token_mask(tokens)
    stacked = torch.stack([e.detach().float().cpu() for e in encodings])
    if stacked.shape[1] != mask.shape[0]:
        raise ResponseMixError(
            f"the text encoder returned {stacked.shape[1]} token rows for a prompt of {mask.shape[0]} tokens; this "
            "CLIP's encodings cannot be matched to the prompt's tokens"
        )
    return stacked[:, mask].reshape(-1, stacked.shape[-1])


def encode_prompt_tokens(clip, stack: ConceptStack, prompt: str) -> torch.Tensor:
    """``e_prompt`` of ``prompt``, encoded with :func:`prompt_clip` (every ED-LoRA concept's words known)."""
    known = prompt_clip(clip, stack)
    with torch.no_grad():
        tokens = known.tokenize(prompt, return_word_ids=True)
        return prompt_token_outputs(encode(known, prompt), tokens)


# ------------------------------------------------------------------------------------------ applying


def apply_weighted(model, clip, stack: ConceptStack, weights) -> tuple[object, object]:
    """``(model clone, clip clone)`` with every concept's LoRA merged at its strengths times ``weights[i]``.

    The CLIP clone knows every ED-LoRA concept's words and carries each concept's text-encoder LoRA at
    ``strength_text * w_i``; the MODEL clone each UNet LoRA at ``strength_unet * w_i`` (plus the layer-wise
    routing when there are ED-LoRA concepts, as the ED-LoRA Loader adds it). ``model`` and ``clip`` are
    never modified.
    """
    w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != len(stack):
        raise ResponseMixError(f"{len(w)} weight(s) for {len(stack)} concept(s)")
    _refuse_fused(stack)
    merged = set(model.model_options.get("transformer_options", {}).get(MERGED_KEY, ()))
    patches = []  # build everything first: a failure must leave nothing half-applied
    for i, (concept, wi) in enumerate(zip(stack, w, strict=True)):
        if concept.loader_uid and concept.loader_uid in merged:
            raise ResponseMixError(
                f"the MODEL already has {_concept_title(i, concept)} merged everywhere (it comes from that ED-LoRA "
                "Loader). Connect the checkpoint's MODEL and CLIP."
            )
        strength = concept.strength_unet * wi
        if not strength:
            continue
        if concept.kind == "edlora":
            patches.append((unet_patches(model, concept.adapter, concept.source), strength))
            continue
        try:
            fitted = lora_patches(concept.adapter.tensors, _concept_title(i, concept), model)
        except LoRAFitError as e:
            raise ResponseMixError(str(e)) from None
        if fitted.unet:
            patches.append((fitted.unet, strength))
    edlora = [c for c in stack if c.kind == "edlora"]
    text_weighted = [replace(c, strength_text=c.strength_text * wi) for c, wi in zip(stack, w, strict=True)]
    new_clip = concept_clip(clip, edlora, text_weighted)
    new_model = model.clone()
    for p, strength in patches:
        new_model.add_patches(p, strength)
    if edlora:
        add_layerwise_routing(new_model)
    return new_model, new_clip


# ------------------------------------------------------------------------------------------- the mix


def weights_table(stack: ConceptStack, scores, weights, mode: str, temperature: float) -> str:
    """The table the node shows: one row per concept with its words, ``R_i`` and ``w_i``."""
    how = f"softmax, temperature {temperature:g}" if mode == "softmax" else mode
    rows = [("#", "concept", "words", "R", "weight")]
    for i, (c, r, wi) in enumerate(zip(stack, scores.tolist(), weights.tolist(), strict=True)):
        name = c.source + (f" [{c.label}]" if c.label else "")
        rows.append((str(i + 1), name, c.prompt_words or "-", f"{r:+.4f}", f"{wi:.4f}"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = [f"response-weighted mix ({how}); R = max cosine(concept embedding, prompt token)"]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[k]) for k, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def response_mix(
    model, clip, stack: ConceptStack, prompt: str, mode: str = MODES[0], temperature: float = DEFAULT_TEMPERATURE
) -> ResponseMix:
    """Scores, weights, the weighted clones and the prompt encoded with the weighted CLIP."""
    if mode not in MODES:
        raise ResponseMixError(f"mode is {mode!r}; choose one of {', '.join(MODES)}")
    if not len(stack):
        raise ResponseMixError("the concept stack is empty")
    _refuse_fused(stack)
    for concept in stack:  # SD1.5 vs SDXL: refused by name before anything is computed
        if concept.kind == "edlora":
            check_compatible(model, clip, concept.adapter, concept.source)
    means = concept_means(clip, stack)
    tokens = encode_prompt_tokens(clip, stack, prompt)
    if means.shape[1] != tokens.shape[1]:
        raise ResponseMixError(
            f"the concepts' token embeddings are {means.shape[1]} wide but this CLIP's prompt encodings "
            f"{tokens.shape[1]}: the text encoder is not a CLIP whose outputs the embeddings can be compared with "
            "(SD1.x/SD2.x/SDXL)"
        )
    scores = response_scores(means, tokens)
    weights = response_weights(scores, mode, temperature)
    new_model, new_clip = apply_weighted(model, clip, stack, weights)
    with torch.no_grad():
        conditioning = encode(new_clip, prompt)
    table = weights_table(stack, scores, weights, mode, temperature)
    return ResponseMix(new_model, new_clip, conditioning, scores, weights, table)


__all__ = [
    "ResponseMix",
    "ResponseMixError",
    "apply_weighted",
    "concept_means",
    "conditioning_keys",
    "encode_prompt_tokens",
    "prompt_clip",
    "prompt_token_outputs",
    "real_token_mask",
    "response_mix",
    "weights_table",
]
