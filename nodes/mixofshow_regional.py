"""Mix-of-Show regionally controllable sampling: a global prompt for the scene, each box its own prompt and
concept, in every cross-attention layer of the one UNet pass per step."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import torch
from comfy_api.latest import io

from ..samplers.concept_stack import ConceptStack
from ..samplers.concept_stack.lora_fit import LoRAFitError, lora_patches
from ..samplers.edlora.clip import LAYERWISE_KEY
from ..samplers.edlora.model import (
    FUSED_KEY,
    MERGED_KEY,
    EDLoRAApplyError,
    add_layerwise_routing,
    check_compatible,
    unet_patches,
)
from ..samplers.mixofshow.control_weights import install_control_weights
from ..samplers.mixofshow.encoding import concept_clip, encode, layer_contexts
from ..samplers.mixofshow.plan import RegionalPlanError, concepts_in, parse_region_weights, plan_regions
from ..samplers.mixofshow.sampling import (
    REGIONAL_KEY,
    RegionalLayout,
    RegionalSamplingError,
    RegionalSide,
    install_regional_attention,
)
from ..samplers.regions.preview import draw_regions
from ..samplers.scoped_lora.adapters import ResolvedConcept, ScopedLoRAError, resolve_concept
from ..samplers.scoped_lora.runtime import Scope, ScopedConcept, install_scoped_lora
from .common import CATEGORY_METHODS, TOKENIZER_ERRORS, ConceptStackType, NodeError, checked_inputs, encoding_error
from .inputs import prompt_input
from .regions import RegionsType

log = logging.getLogger("multiconcept")

ADAPTER_MODES = ("scoped", "merged", "already applied")
# What a box with an empty negative prompt reads on the negative side. Official Mix-of-Show encodes the box's
# negative as written, "" when empty (TencentARC/Mix-of-Show, mixofshow/pipelines/
# pipeline_regionally_t2iadapter.py:286-295; LoRA-Composer's region sampler does the same).
EMPTY_BOX_NEGATIVES = ("empty, as the official code", "the global negative")
# Which of a concept's UNet LoRA layers act inside its box (scoped mode). Every layer (Mix-of-Show, whose official
# sampler runs a fused model: every layer carries every concept), or only the box's cross-attention: keys and
# values of the box prompt and the output projection of the box's result, with the base model's queries, as
# official LoRA-Composer does (Young98CN/LoRA_Composer region_lora/multi_lora_sample.py:315 base to_q, :343-347
# the concept's to_k/to_v, :299 the concept's to_out; the optimized_version branch the same).
LORA_SCOPES = ("every layer", "cross-attention k, v and out")
_ATTN2_OUT = re.compile(r"\.attn2\.to_out\.0$")
_ATTN2_KV = re.compile(r"\.attn2\.to_[kv]$")


# The inputs build_regional reads, as the regional nodes (Mix-of-Show, LoRA-Composer) declare them; each node words
# its own tooltips.


def regional_inputs(model_tooltip: str, regions_tooltip: str, prompt_tooltip: str, negative_tooltip: str) -> list:
    """The model, CLIP, boxes and global prompts: a regional node's first inputs."""
    return [
        io.Model.Input("model", tooltip=model_tooltip),
        io.Clip.Input("clip", tooltip="The checkpoint's CLIP; each box's prompt is encoded with it."),
        RegionsType.Input("regions", tooltip=regions_tooltip),
        prompt_input("global_prompt", prompt_tooltip),
        prompt_input("global_negative", negative_tooltip),
    ]


def regional_concept_inputs(concepts_tooltip: str, adapters_tooltip: str) -> list:
    """The optional concept stack and how its adapters act (ADAPTER_MODES)."""
    return [
        ConceptStackType.Input("concepts", optional=True, tooltip=concepts_tooltip),
        io.Combo.Input(
            "adapters", options=list(ADAPTER_MODES), default="scoped", optional=True, tooltip=adapters_tooltip
        ),
    ]


class MixOfShowRegional(io.ComfyNode):
    NAME = "Mix-of-Show Regional"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptMixOfShowRegional",
            display_name="Mix-of-Show Regional Sampling",
            category=CATEGORY_METHODS,
            description="Several concepts in one picture, each in its own box (Mix-of-Show regionally controllable "
            "sampling). The global prompt describes the scene; in every cross-attention layer the positions inside "
            "a box attend to that box's own prompt, encoded with only that box's concept. Connect MODEL, positive "
            "and negative to a stock KSampler (or SamplerCustomAdvanced); one UNet pass per step.",
            inputs=[
                *regional_inputs(
                    "The checkpoint's MODEL (SD1.x, SD2.x or SDXL). LoRA loaders may come before this node; "
                    "apply ControlNets to this node's positive/negative outputs.",
                    "From the Regions node (or SAM Masks, for object masks): each box's prompt, negative and "
                    "label. Draw them at the size you sample.",
                    "The whole scene, e.g. 'a man and a dog sitting on a sofa, living room'. Class words are "
                    "safest; concept words are allowed. It governs everything outside the boxes.",
                    "Negative prompt for the whole image (outside the boxes). A box reads its own negative; "
                    "for boxes whose negative is empty see empty_box_negative.",
                ),
                *regional_concept_inputs(
                    "Optional: the concepts (ED-LoRAs, LoRAs) from the Concept Stack nodes. A concept goes "
                    "to the box with its region label (or, without a label, to the box whose prompt names its "
                    "words). Without concepts this is plain regional prompting.",
                    "scoped: each concept's UNet LoRA acts only inside its box (no bleeding). merged: every "
                    "concept's LoRA on the whole image (the original with several LoRAs). already applied: the "
                    "MODEL/CLIP already carry the concepts (e.g. a fused model); only their words are used.",
                ),
                io.String.Input(
                    "region_weights",
                    default="",
                    optional=True,
                    tooltip="Optional weights where boxes overlap: numbers in box order ('1, 1.5') or by label "
                    "('cat=1.5, dog=1'). Empty: overlaps are plain averages.",
                ),
                io.Combo.Input(
                    "empty_box_negative",
                    options=list(EMPTY_BOX_NEGATIVES),
                    default=EMPTY_BOX_NEGATIVES[0],
                    optional=True,
                    tooltip="What a box whose negative prompt is empty reads on the negative side. Official "
                    "Mix-of-Show encodes it as the empty prompt (with the box's concept); 'the global negative' "
                    "gives such boxes the global negative, as the official example scripts do by writing it into "
                    "every box.",
                ),
                io.String.Input(
                    "control_weights",
                    default="",
                    optional=True,
                    tooltip="Optional: how strongly a ControlNet / T2I-Adapter applied to this node's outputs acts "
                    "inside each box, by label ('cat=0.5, dog=1') or in box order ('0.5, 1'); 0 turns it off there "
                    "(official Mix-of-Show's region_*_adaptor_weight). Empty: the same everywhere.",
                ),
                io.Float.Input(
                    "control_weight_outside",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    optional=True,
                    tooltip="The ControlNet's weight outside the boxes control_weights names (official "
                    "*_adaptor_weight, 1.0).",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with regional cross-attention."),
                io.Conditioning.Output(
                    display_name="positive", tooltip="The global prompt, carrying the boxes' prompts."
                ),
                io.Conditioning.Output(
                    display_name="negative", tooltip="The global negative, carrying the boxes' negatives."
                ),
                io.Image.Output(display_name="preview", tooltip="Which box holds which prompt and concept."),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(
        cls,
        model,
        clip,
        regions,
        global_prompt,
        global_negative,
        concepts=None,
        adapters="scoped",
        region_weights="",
        empty_box_negative=EMPTY_BOX_NEGATIVES[0],
        control_weights="",
        control_weight_outside=1.0,
    ) -> io.NodeOutput:
        try:
            per_box = parse_region_weights(control_weights, regions, "control_weights", zero_ok=True, unset=None)
        except RegionalPlanError as e:
            raise NodeError(cls.NAME, str(e)) from None
        built = build_regional(cls.NAME, model, clip, regions, global_prompt, global_negative, concepts, adapters,
                               region_weights, empty_box_negative)  # fmt: skip
        if any(w is not None for w in per_box) or float(control_weight_outside) != 1.0:
            install_control_weights(built.model, built.layout.masks, per_box, float(control_weight_outside))
        return io.NodeOutput(built.model, built.positive, built.negative, built.preview)


@dataclass(frozen=True)
class RegionalBuild:
    """What the regional nodes share (Mix-of-Show, LoRA-Composer): the patched clone, the conditionings that
    carry the regions, the preview, and per region its plan and the CLIP its prompt was encoded with."""

    model: object
    positive: list
    negative: list
    preview: torch.Tensor
    plans: list
    region_clips: list
    layout: RegionalLayout
    stack: ConceptStack


def build_regional(node, model, clip, regions, global_prompt, global_negative, concepts=None, adapters="scoped",
                   region_weights="", empty_box_negative=EMPTY_BOX_NEGATIVES[0],
                   lora_scope=LORA_SCOPES[0]) -> RegionalBuild:  # fmt: skip
    """Mix-of-Show regional sampling on a clone of ``model``: adapters, encodings, the regional attention."""
    stack = concepts if concepts is not None else ConceptStack()
    if adapters not in ADAPTER_MODES:
        raise NodeError(node, f"adapters is {adapters!r}; choose one of {', '.join(ADAPTER_MODES)}.")
    if lora_scope not in LORA_SCOPES:
        raise NodeError(node, f"the LoRA scope is {lora_scope!r}; choose one of {', '.join(LORA_SCOPES)}.")
    if empty_box_negative not in EMPTY_BOX_NEGATIVES:
        raise NodeError(
            node, f"empty_box_negative is {empty_box_negative!r}; choose one of {', '.join(EMPTY_BOX_NEGATIVES)}."
        )
    try:
        weights = parse_region_weights(region_weights, regions)
        plans = plan_regions(stack, regions, global_prompt, global_negative, weights)
    except RegionalPlanError as e:
        raise NodeError(node, str(e)) from None
    masks = regions.masks()
    clone = model.clone()
    try:
        for concept in stack:  # SD1.5 vs SDXL: refused by name before anything is applied
            if concept.kind == "edlora" and adapters != "already applied" and not concept.fused:
                check_compatible(model, clip, concept.adapter, concept.source)
        kv_factors = _apply_unet_adapters(node, clone, stack, plans, masks, adapters, lora_scope == LORA_SCOPES[1])
        pos_side, neg_side, positive, negative, region_clips = _encode_all(
            clip, stack, plans, global_prompt, global_negative, adapters, empty_box_negative == EMPTY_BOX_NEGATIVES[1]
        )
        install_regional_attention(clone, node)
    except (RegionalPlanError, RegionalSamplingError, ScopedLoRAError, EDLoRAApplyError, LoRAFitError) as e:
        raise NodeError(node, str(e)) from None
    except TOKENIZER_ERRORS as e:
        raise encoding_error(node, e, "the prompts") from None
    if any(LAYERWISE_KEY in d for _, d in positive):
        add_layerwise_routing(clone)
    layout = RegionalLayout(
        node=node,
        width=regions.width,
        height=regions.height,
        masks=masks.float().cpu(),
        weights=torch.tensor([p.weight for p in plans], dtype=torch.float32),
        labels=tuple(p.label or f"box {p.index + 1}" for p in plans),
        kv_factors=kv_factors,
    )
    positive = [[c, {**d, REGIONAL_KEY: RegionalSide(layout, pos_side)}] for c, d in positive]
    negative = [[c, {**d, REGIONAL_KEY: RegionalSide(layout, neg_side)}] for c, d in negative]
    preview = draw_regions(_labelled(regions, plans, stack))
    return RegionalBuild(clone, positive, negative, preview, plans, region_clips, layout, stack)


def _apply_unet_adapters(node, clone, stack, plans, masks, mode, cross_attention_only=False) -> tuple[dict, ...]:
    """Put the concepts' UNet adapters on ``clone``; return each region's cross-attention k/v factors (scoped).

    ``cross_attention_only``: in scoped mode only the cross-attention's k/v (on the box prompt) and output
    projection act; every other layer of the LoRA is left out (LORA_SCOPES)."""
    kv_factors: list[dict] = [{} for _ in plans]
    if mode == "already applied" or not len(stack):
        return tuple(kv_factors)
    merged = set(clone.model_options.get("transformer_options", {}).get(MERGED_KEY, ()))
    fused = set(clone.model_options.get("transformer_options", {}).get(FUSED_KEY, ()))
    scoped_items = []
    for ci, concept in enumerate(stack):
        if concept.fused:  # its LoRA is part of the fused weights
            if concept.fused not in fused:
                raise RegionalPlanError(
                    f"{concept.name} is a fused concept, but this MODEL does not carry that fusion: connect the MODEL "
                    "and CLIP of the Fuse Concepts / Load Fused Concepts node that made the stack."
                )
            continue
        if concept.loader_uid and concept.loader_uid in merged:
            raise RegionalPlanError(
                f"the MODEL already has {concept.source} merged everywhere (it comes from that ED-LoRA Loader). "
                "Connect the checkpoint's MODEL, or set adapters to 'already applied'."
            )
        if not concept.strength_unet:
            continue
        if mode == "merged":
            if concept.kind == "edlora":
                clone.add_patches(unet_patches(clone, concept.adapter, concept.source), concept.strength_unet)
            else:
                fitted = lora_patches(concept.adapter.tensors, concept.source, clone)
                clone.add_patches(fitted.unet, concept.strength_unet)
            continue
        resolved = resolve_concept(clone, concept)
        kv = {p: f for p, f in resolved.factors.items() if _ATTN2_KV.search(p)}
        rest = {p: f for p, f in resolved.factors.items() if p not in kv}
        if cross_attention_only:
            rest = {p: f for p, f in rest.items() if _ATTN2_OUT.search(p)}
        owned = [p.index for p in plans if ci in p.concepts]
        for r in owned:
            for path, f in kv.items():
                attn, which = path.rsplit(".", 1)
                slot = kv_factors[r].setdefault(attn, {})
                slot[which] = slot.get(which, ()) + (f,)
        if rest:
            mask = masks[owned].amax(dim=0)
            scoped_items.append(
                ScopedConcept(ResolvedConcept(concept, rest, resolved.ignored_text_keys), Scope(mask=mask))
            )
    if scoped_items:
        install_scoped_lora(clone, scoped_items, node)
    return tuple(kv_factors)


def _encode_all(clip, stack, plans, global_prompt, global_negative, mode, global_for_empty=False):
    """Encode the global prompts and every box's prompts; each box with only its own concepts.

    ``global_for_empty``: a box with an empty negative reads the global negative (else "" with its concepts).
    """
    known_ok = mode == "already applied"
    everything = [c for c in stack if c.kind == "edlora"]
    named = [stack[i] for i in concepts_in(global_prompt, stack)]
    global_clip = concept_clip(clip, everything, [] if known_ok else named, known_ok=known_ok)
    plain_clip = concept_clip(clip, everything, [], known_ok=known_ok) if named and not known_ok else global_clip
    positive = encode(global_clip, global_prompt)
    negative = encode(plain_clip, global_negative or "")
    negative_layers = layer_contexts(negative)
    clips: dict[tuple, object] = {}
    pos_side, neg_side, region_clips = [], [], []
    for plan in plans:
        own = [stack[i] for i in plan.concepts]
        if plan.concepts not in clips:
            clips[plan.concepts] = concept_clip(clip, own, [] if known_ok else own, known_ok=known_ok)
        region_clip = clips[plan.concepts]
        region_clips.append(region_clip)
        pos_side.append(layer_contexts(encode(region_clip, plan.prompt)))
        if global_for_empty and not plan.negative.strip():
            neg_side.append(negative_layers)
        else:
            neg_side.append(layer_contexts(encode(region_clip, plan.negative)))
    return tuple(pos_side), tuple(neg_side), positive, negative, region_clips


def _labelled(regions, plans, stack):
    new = []
    for r, plan in zip(regions.regions, plans, strict=True):
        words = ", ".join(stack[i].prompt_words or stack[i].source for i in plan.concepts)
        head = r.label or f"box {plan.index + 1}"
        new.append(replace(r, label=f"{head}: {words}" if words else head))
    return replace(regions, regions=tuple(new))
