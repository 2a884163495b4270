"""Encoding the global and region prompts, each with only the concepts it may see (ComfyUI glue).

A region's prompt is encoded by the user's CLIP plus only that region's concepts: their words (ED-LoRA
layer-wise token embeddings) and their text-encoder LoRA. So concept A's text-encoder LoRA never touches
concept B's prompt. The global prompt is encoded with every concept's words known and, when it names
concepts, those concepts' text-encoder LoRA (the original encodes it with its fused text encoder).
"""

from __future__ import annotations

import torch

from ..concept_stack.lora_fit import LoRAFitError, lora_patches
from ..concept_stack.stack import Concept
from ..edlora.clip import LAYERWISE_KEY, concept_vocabulary_of, with_vocabulary
from ..edlora.vocabulary import ConceptEntry
from .plan import RegionalPlanError


def concept_clip(clip, concepts: list[Concept], lora_of: list[Concept], known_ok: bool = False):
    """A clone of ``clip`` that knows ``concepts``' words and carries the text-encoder LoRA of ``lora_of``.

    ``known_ok``: words the CLIP already knows (e.g. from an ED-LoRA Loader before this node) are used as they
    are; otherwise such a clash is an error, since the CLIP would already carry that concept everywhere.
    """
    vocab = concept_vocabulary_of(clip)
    for c in concepts:
        if c.kind != "edlora":
            continue
        known = [w for w in c.words if vocab.owner_of(w) is not None]
        if c.fused:
            if len(known) != len(c.words):
                raise RegionalPlanError(
                    f"{c.name} is a fused concept: its words and LoRA live in the CLIP of Fuse Concepts / Load Fused "
                    "Concepts. Connect that CLIP (and MODEL)."
                )
            continue
        if known and known_ok:
            continue
        if known:
            raise RegionalPlanError(
                f"the CLIP already knows {' '.join(known)} (it comes from an ED-LoRA Loader, which applies the concept "
                "to every prompt). Connect the checkpoint's CLIP, or set adapters to 'already applied'."
            )
        entry = ConceptEntry(
            uid=f"stack-{c.uid}:{c.source}", words=c.words, embeddings=c.adapter.embeddings, source=c.source
        )
        vocab = vocab.with_entry(entry)
    new = with_vocabulary(clip, vocab) if vocab.entries else clip.clone()
    for c in lora_of:
        if not c.strength_text or c.fused:
            continue
        if c.kind == "edlora":
            from ..edlora.model import text_encoder_patches

            patches = text_encoder_patches(new, c.adapter, c.source)
            if patches:
                new.add_patches(patches, c.strength_text)
        else:
            try:
                fitted = lora_patches(c.adapter.tensors, c.source, clip=new)
            except LoRAFitError as e:
                raise RegionalPlanError(str(e)) from None
            if fitted.text:
                new.add_patches(fitted.text, c.strength_text)
    return new


def encode(clip, text: str) -> list:
    """ComfyUI conditioning for ``text`` (what CLIPTextEncode returns)."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def layer_contexts(conditioning: list) -> torch.Tensor:
    """``[B, L, T, D]`` of an encoded prompt: its per-layer encodings, or its one encoding as ``L = 1``."""
    cond, extra = conditioning[0][0], conditioning[0][1]
    lw = extra.get(LAYERWISE_KEY)
    if lw is not None:
        return lw.layers
    return cond[:, None]
