"""OMG: the scene sampled once from class words, then each concept's own prediction blended inside its mask
(occlusion-friendly: concepts may overlap, hug, hold each other).

Three nodes: the all-in-one **OMG Sampler** for KSampler users, and **OMG Stage 1** + **OMG Guider** for
SamplerCustomAdvanced graphs (the same two stages, with the stage-1 image and layout in between)."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..samplers.edlora.clip import LAYERWISE_KEY
from ..samplers.edlora.model import EDLoRAApplyError, add_layerwise_routing, check_compatible
from ..samplers.mixofshow.encoding import concept_clip, encode
from ..samplers.mixofshow.plan import RegionalPlanError
from ..samplers.omg.blend import POLICIES
from ..samplers.omg.guider import OMGGuider, is_memoryless
from ..samplers.omg.layout import DEFAULT_BUDGET_MB, LayoutError, LayoutStore
from ..samplers.omg.stages import (
    STRENGTHS,
    ModelConcept,
    OMGError,
    OMGLayout,
    attention_boxes,
    check_mask_inputs,
    checked_masks,
    class_word_tokens,
    concept_prompt,
    fits_latent,
    mask_preview,
    masks_from_boxes,
    omg_strengths,
    parse_concept_prompts,
    region_boxes,
    run_stage1,
    stage2_model,
    tag_rows,
    with_labels,
)
from ..samplers.scene_conditioning import SceneConditioningError
from ..samplers.scoped_lora.adapters import ScopedLoRAError
from .common import CATEGORY_METHODS, ConceptStackType, NodeError, checked_inputs, show_text
from .inputs import (
    cfg_input,
    prompt_input,
    sampler_name_input,
    sampling_steps_input,
    scene_conditioning_inputs,
    scheduler_input,
    seed_input,
)
from .regions import RegionsType
from .sam import SamModelType
from .sampling import check_sampler_names, latent_output, sample_guider, scene_conds

log = logging.getLogger("multiconcept")

OMGLayoutType = io.Custom("OMG_LAYOUT")
# whole-MODEL concepts (a tuple of samplers.omg.stages.ModelConcept), from OMG Model Concept nodes
ModelConceptsType = io.Custom("OMG_MODEL_CONCEPTS")
_ERRORS = (OMGError, LayoutError, ScopedLoRAError, EDLoRAApplyError, RegionalPlanError, SceneConditioningError)
CONDITIONING_WHERE = "stage 1 and the scene's branch of stage 2 (as the official OMG runs its ControlNet there; the concepts' branches keep their own prompts)"
CROP_MARGIN = 4  # latent cells (32 px) around a concept's mask when concepts are cropped


# ------------------------------------------------------------------------------------ shared inputs


def _stage1_inputs(with_concepts_required: bool) -> list:
    concepts = ConceptStackType.Input(
        "concepts",
        optional=not with_concepts_required,
        tooltip="The concepts (ED-LoRAs, LoRAs) from the Concept Stack nodes. Each needs a class word (for "
        "automatic masks) or a region label matching a box."
        + ("" if with_concepts_required else " Here only their class words are read, to keep their attention maps."),
    )
    return [
        io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.x, SD2.x or SDXL), without the concepts."),
        io.Clip.Input(
            "clip", tooltip="The checkpoint's CLIP; the scene and each concept's prompt are encoded with it."
        ),
        io.Vae.Input("vae", tooltip="Decodes the stage-1 image for SAM and the mask preview."),
        concepts,
        io.Latent.Input("latent_image", tooltip="An Empty Latent Image of the size to sample."),
        seed_input("seed", "Noise seed; both stages use it."),
        sampling_steps_input(
            50, "Sampling steps of the whole schedule (official: 50; fewer are cheaper).", minimum=2, maximum=10000
        ),
        cfg_input(7.5, "Classifier-free guidance, for the scene and every concept (official: 7.5)."),
        sampler_name_input("Deterministic samplers (euler, dpmpp_2m, ...) continue stage 1 exactly."),
        scheduler_input(),
        prompt_input(
            "scene_prompt",
            "The scene with class words only, one mention per concept: 'a man and a woman hugging in a "
            "park'. Stage 1 samples it; automatic masks look for each concept's class word here.",
        ),
        prompt_input("negative", "Negative prompt for the scene and every concept."),
        io.Float.Input(
            "start",
            default=0.32,
            min=0.05,
            max=0.95,
            step=0.01,
            tooltip="Where blending starts, as a fraction of the steps (0.32 = step 16 of 50, the official setting; "
            "the paper counts the same point down as timestep 35). Earlier: more of each concept's own shape; "
            "later: more of stage 1's layout. The steps before are stage 1's, not sampled again.",
        ),
    ]


def _layout_memory_input():
    return io.Int.Input(
        "layout_memory_mb",
        default=DEFAULT_BUDGET_MB,
        min=0,
        max=262144,
        optional=True,
        tooltip="Memory for stage 1's attention replay, kept in host memory (not the GPU's). Per blended step in "
        "fp16: SD1.5 at 512 px about 22 MB; SDXL at 1024 px about 210 MB, 525 MB in the first few. The official SDXL "
        "run (50 steps) needs about 8.4 GB, which the default holds; it takes only what the run needs. Past the "
        "budget (or when host memory runs low) the last steps are not replayed and the node says so, with what a "
        "full replay needs. 0: no replay.",
    )


def _strengths_input():
    return io.Combo.Input(
        "strengths",
        options=list(STRENGTHS),
        default=STRENGTHS[0],
        optional=True,
        tooltip="How strongly each concept's LoRA acts (UNet and text encoder). 0.8, as the official OMG: the "
        "official OMG samples every concept at 0.8; used wherever a Concept Stack node's strength is left at its "
        "default (a strength you changed, 0 included, is kept). The stack's strengths: as set in the stack.",
    )


def _model_concepts_input():
    return ModelConceptsType.Input(
        "model_concepts",
        optional=True,
        tooltip="Optional concepts that are a whole MODEL with their own prompts (OMG Model Concept nodes), e.g. "
        "the base model with an IP-Adapter or InstantID patch. Each runs as a pass of its own; their masks come "
        "after the stack's.",
    )


def _stage2_inputs() -> list:
    return [
        io.Combo.Input(
            "overlap",
            options=list(POLICIES),
            default="front_to_back",
            optional=True,
            tooltip="Where masks overlap. front_to_back: the first concept in the stack is in front and covers the "
            "others (occlusion). normalised: each gets its share.",
        ),
        RegionsType.Input(
            "regions",
            optional=True,
            tooltip="Optional boxes (Regions node), one per concept by label, at the latent's size. Without them "
            "each concept's box comes from its class word's attention in stage 1.",
        ),
        SamModelType.Input(
            "sam",
            optional=True,
            tooltip="Optional SAM model (SAM Loader): refines each box to the object's outline in the stage-1 "
            "image. Without it the boxes are the masks.",
        ),
        io.Mask.Input(
            "masks",
            optional=True,
            tooltip="Optional: the concepts' masks themselves (one per concept, in stack order, at the image's "
            "size, e.g. from SAM Masks on the stage-1 image). Used instead of regions and automatic masks.",
        ),
        prompt_input(
            "concept_prompts",
            "Optional: each concept's own prompt, one line per concept ('label: prompt', or in stack "
            "order). Empty: the scene prompt with the concept's words before its class word.",
            optional=True,
        ),
        io.Boolean.Input(
            "crop_concepts",
            default=False,
            optional=True,
            tooltip="Predict each concept only on its mask's bounding box plus a 32 px margin: cheaper when "
            "concepts are small; the concept then sees less of the scene around it.",
        ),
        io.Float.Input(
            "mask_threshold",
            default=0.4,
            min=0.05,
            max=0.95,
            step=0.05,
            optional=True,
            tooltip="Automatic masks: the share of a class word's peak attention that counts as the object.",
        ),
    ]


def _mask_outputs() -> list:
    """The masks and their preview, as the OMG Sampler and the OMG Guider output them."""
    return [
        io.Mask.Output(display_name="masks", tooltip="Each concept's mask, in stack order, at image size."),
        io.Image.Output(display_name="preview", tooltip="The masks over the stage-1 image, labelled."),
    ]


# ------------------------------------------------------------------------------------------ stages


def _stage1(node, model, clip, vae, stack, latent_image, seed, steps, cfg, sampler_name, scheduler, scene_prompt,
            negative, start, layout_memory_mb, need_words, progress=None, conditioning=(None, None)) -> OMGLayout:  # fmt: skip
    if not (scene_prompt or "").strip():
        raise NodeError(node, "scene_prompt is empty: describe the scene with class words ('a man and a dog').")
    check_sampler_names(node, sampler_name, scheduler)
    samples = latent_image["samples"]
    lat_h, lat_w = int(samples.shape[-2]), int(samples.shape[-1])
    start_step = min(max(1, round(start * steps)), steps - 1)
    word_tokens = class_word_tokens(clip, scene_prompt, list(stack)) if need_words else []
    positive = encode(clip, scene_prompt)
    negative_c = encode(clip, negative or "")
    positive, negative_c = scene_conds(node, model, conditioning, positive, negative_c, "the scene prompt")
    import comfy.model_management

    keep_on = comfy.model_management.intermediate_device()  # host memory: the replay never takes GPU memory
    store = LayoutStore(start_step, steps, (lat_h, lat_w), seed, int(layout_memory_mb) * 2**20, word_tokens, keep_on)
    run_stage1(model, positive, negative_c, latent_image, seed, steps, cfg, sampler_name, scheduler, store,
               callback=progress, disable_pbar=progress is not None)  # fmt: skip
    if store.cut_message():
        show_text(store.cut_message())
    image = vae.decode(store.final[:1])
    return OMGLayout(store, scene_prompt, negative or "", positive, negative_c, image, float(cfg))


def _guider(node, model, clip, stack, layout: OMGLayout, overlap, regions, sam, concept_prompts, crop_concepts,
            mask_threshold, model_concepts=(), given_masks=None):  # fmt: skip
    """``(guider, masks [N, H, W], preview)`` for stage 2; masks in the order of ``stack`` + ``model_concepts``."""
    store = layout.store
    everyone = list(stack) + list(model_concepts)
    lat_h, lat_w = store.latent_hw
    width, height = lat_w * 8, lat_h * 8
    if overlap not in POLICIES:
        raise NodeError(node, f"overlap is {overlap!r}; choose one of {', '.join(POLICIES)}.")
    for concept in stack:
        if concept.kind == "edlora":
            check_compatible(model, clip, concept.adapter, concept.source)
    if given_masks is not None:
        masks = checked_masks(given_masks, len(everyone), (lat_h, lat_w))
        masks = torch.nn.functional.interpolate(masks[:, None], size=(height, width), mode="bilinear")[:, 0]
        masks = masks.clamp(0, 1)
        boxes = [_mask_box(m, width, height) for m in masks]
        refined = False
    elif regions is not None:
        boxes = region_boxes(everyone, regions, width, height)
    else:
        wanted = class_word_tokens(clip, layout.scene_prompt, everyone)
        if wanted != store.word_tokens:
            raise OMGError(
                "stage 1 kept the attention of other words than these concepts' class words: connect the same concept "
                "stack to OMG Stage 1 (or give boxes in regions)."
            )
        boxes = attention_boxes(store, width, height, mask_threshold)
    if given_masks is None:
        # the user's boxes bound their masks; boxes found from attention only prompt SAM (official)
        masks, refined = masks_from_boxes(boxes, width, height, layout.image, sam, keep_in_box=regions is not None)
    preview = mask_preview(layout.image, masks, boxes, with_labels(everyone), width, height)
    fits_latent(masks, (lat_h, lat_w))

    prompts = _concept_prompts(stack, regions, layout.scene_prompt, concept_prompts)
    negatives = _concept_negatives(stack, regions, layout.negative_prompt)
    concept_conds = []
    for i, concept in enumerate(stack):
        own = concept_clip(clip, [concept], [concept])
        concept_conds.append((tag_rows(encode(own, prompts[i]), i), tag_rows(encode(own, negatives[i]), i)))
    model2 = stage2_model(model, stack, store, node)
    if any(LAYERWISE_KEY in d for pos, neg in concept_conds for _, d in pos + neg):
        add_layerwise_routing(model2)
    guider = OMGGuider(model2, store, masks, overlap, node, crop_margin=CROP_MARGIN if crop_concepts else None)
    guider.set_cfg(layout.cfg)
    guider.set_omg_conds(
        layout.positive, layout.negative, concept_conds, [(m.model, m.positive, m.negative) for m in model_concepts]
    )
    how = (
        "the masks input"
        if given_masks is not None
        else (("SAM in " if refined else "") + ("boxes" if regions is not None else "class-word attention boxes"))
    )
    log.info("[multi-concept] %s: %s; masks from %s", node, store.describe(), how)
    return guider, masks, preview


def _mask_box(mask, width, height) -> tuple:
    """The pixel bounding box of a mask (the whole image if it is empty), for the preview."""
    on = mask > 0
    if not bool(on.any()):
        return (0.0, 0.0, float(width), float(height))
    rows, cols = on.any(dim=1).nonzero().flatten(), on.any(dim=0).nonzero().flatten()
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _concept_prompts(stack, regions, scene_prompt, text) -> list[str]:
    given = parse_concept_prompts(text, stack)
    by_label = {}
    if regions is not None:
        for r in regions.regions:
            if r.label and r.prompt.strip():
                by_label.setdefault(r.label, r.prompt.strip())
    seen: dict[str, int] = {}
    out = []
    for i, c in enumerate(stack):
        k = seen.get(c.class_word, 0)
        seen[c.class_word] = k + 1
        out.append(given.get(i) or by_label.get(c.label) or concept_prompt(scene_prompt, c, k))
    return out


def _concept_negatives(stack, regions, negative: str) -> list[str]:
    """Each concept's negative prompt: its box's own negative when it has one (the official code takes a
    negative per region: kongzhecn/OMG src/pipelines/lora_pipeline.py:313 and :343-344), else the node's."""
    by_label = {}
    for r in getattr(regions, "regions", ()) or ():
        if r.label and r.negative.strip():
            by_label.setdefault(r.label, r.negative.strip())
    return [by_label.get(c.label) or negative or "" for c in stack]


def _need_concepts(node, stack, model_concepts, strengths=STRENGTHS[0]):
    """``(stack at the strengths OMG samples with, model concepts)``; the stack must not be empty."""
    from ..samplers.concept_stack import ConceptStack

    stack = stack if stack is not None else ConceptStack()
    if len(stack) == 0 and not model_concepts:
        raise NodeError(node, "the concept stack is empty: add concepts with the Concept Stack nodes.")
    try:
        stack = omg_strengths(stack, strengths)
    except OMGError as e:
        raise NodeError(node, str(e)) from None
    return stack, tuple(model_concepts or ())


def _check_model_concepts(node, model, model_concepts) -> None:
    """Before any sampling: a model concept must be this MODEL's weights with patches of its own on top."""
    for j, m in enumerate(model_concepts):
        if getattr(m.model, "model", None) is not model.model or m.model.patches_uuid != model.patches_uuid:
            raise NodeError(
                node,
                f"model concept {j + 1} ({m.name}) is not this MODEL with patches of its own on top (its weights "
                "differ: a LoRA loader or merge before it?). A model concept may carry attention/model patches "
                "(IP-Adapter, InstantID); give LoRAs as Concept Stack entries instead.",
            )


# -------------------------------------------------------------------------------------------- nodes


class OMG(io.ComfyNode):
    NAME = "OMG Sampler"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptOMG",
            display_name="OMG Sampler (occlusion-friendly)",
            category=CATEGORY_METHODS,
            description="Several concepts that may overlap or occlude each other (a person holding a pet, two people "
            "hugging). Stage 1 samples the scene from a prompt of class words with no concept; then, from the start "
            "point on, every step blends each concept's own prediction (its LoRA, its prompt) inside its mask and "
            "the scene's prediction outside, in one batched model call per step. Works like a KSampler: connect an "
            "Empty Latent Image and decode the output.",
            inputs=_stage1_inputs(True)
            + _stage2_inputs()
            + [_model_concepts_input(), _layout_memory_input(), _strengths_input()]
            + scene_conditioning_inputs(CONDITIONING_WHERE),
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The final image's latent (decode it)."),
                io.Latent.Output(display_name="stage 1", tooltip="Stage 1's latent: the scene without concepts."),
                *_mask_outputs(),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, vae, concepts, latent_image, seed, steps, cfg, sampler_name, scheduler,
                scene_prompt, negative, start=0.32, overlap="front_to_back", regions=None, sam=None,
                concept_prompts="", crop_concepts=False, mask_threshold=0.4, model_concepts=None,
                layout_memory_mb=DEFAULT_BUDGET_MB, masks=None, strengths=STRENGTHS[0], positive_conditioning=None,
                negative_conditioning=None) -> io.NodeOutput:  # fmt: skip
        import comfy.utils

        stack, extra = _need_concepts(cls.NAME, concepts, model_concepts, strengths)
        _check_model_concepts(cls.NAME, model, extra)
        samples = latent_image["samples"]
        layout = None
        try:
            # refused before stage 1 samples, as stage 2 would refuse them
            check_mask_inputs(list(stack) + list(extra), regions, masks, samples.shape[-2:])
            start_step = min(max(1, round(start * steps)), steps - 1)
            # stage 2 runs from the start step, or the whole schedule for a sampler that keeps a history
            skipped = start_step if is_memoryless(sampler_name) else 0
            total = steps + (steps - skipped)
            bar = comfy.utils.ProgressBar(total)
            layout = _stage1(cls.NAME, model, clip, vae, list(stack) + list(extra), latent_image, seed, steps, cfg, sampler_name,
                             scheduler, scene_prompt, negative, start, layout_memory_mb,
                             need_words=regions is None and masks is None,
                             progress=lambda step, x0, x, t: bar.update_absolute(step + 1, total),
                             conditioning=(positive_conditioning, negative_conditioning))  # fmt: skip
            guider, masks, preview = _guider(cls.NAME, model, clip, stack, layout, overlap, regions, sam,
                                             concept_prompts, crop_concepts, mask_threshold, extra, masks)  # fmt: skip
            out = sample_guider(guider, latent_image, seed, sampler_name, layout.store.sigmas.to(torch.float32),
                                lambda step, x0, x, t: bar.update_absolute(steps + step - skipped + 1, total))  # fmt: skip
            stage1 = layout.store.final
        except _ERRORS as e:
            raise NodeError(cls.NAME, str(e)) from None
        finally:
            if layout is not None:
                layout.store.free()  # the replay is done: nothing of stage 1 is kept past this node
        return io.NodeOutput(
            latent_output(latent_image, out.to(samples.device)), latent_output(latent_image, stage1), masks, preview
        )


class OMGStage1(io.ComfyNode):
    NAME = "OMG Stage 1"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptOMGStage1",
            display_name="OMG Stage 1 (scene layout)",
            category=CATEGORY_METHODS,
            description="OMG's first stage for SamplerCustomAdvanced graphs: samples the scene from class words with "
            "no concept and keeps what stage 2 replays (attention) and what automatic masks need. Connect the "
            "layout to OMG Guider, and sample stage 2 with the same seed, steps and scheduler.",
            inputs=_stage1_inputs(False)
            + [_model_concepts_input(), _layout_memory_input()]
            + scene_conditioning_inputs(CONDITIONING_WHERE),
            outputs=[
                OMGLayoutType.Output(display_name="layout", tooltip="The stage-1 layout, for OMG Guider."),
                io.Latent.Output(display_name="stage 1", tooltip="Stage 1's latent: the scene without concepts."),
                io.Image.Output(display_name="image", tooltip="The stage-1 image (e.g. for SAM Masks or a preview)."),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, vae, latent_image, seed, steps, cfg, sampler_name, scheduler, scene_prompt,
                negative, start=0.32, concepts=None, model_concepts=None, layout_memory_mb=DEFAULT_BUDGET_MB,
                positive_conditioning=None, negative_conditioning=None) -> io.NodeOutput:  # fmt: skip
        try:
            stack = list(concepts or ()) + list(model_concepts or ()) or None
            if stack is not None and not all(c.class_word.strip() for c in stack):
                stack = None  # a concept without a class word: its mask must come from a box, so keep no maps
            layout = _stage1(cls.NAME, model, clip, vae, stack or [], latent_image, seed, steps, cfg, sampler_name,
                             scheduler, scene_prompt, negative, start, layout_memory_mb, need_words=stack is not None,
                             conditioning=(positive_conditioning, negative_conditioning))  # fmt: skip
        except _ERRORS as e:
            raise NodeError(cls.NAME, str(e)) from None
        return io.NodeOutput(layout, latent_output(latent_image, layout.store.final), layout.image)


class OMGGuiderNode(io.ComfyNode):
    NAME = "OMG Guider"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptOMGGuider",
            display_name="OMG Guider (stage 2)",
            category=CATEGORY_METHODS,
            description="OMG's second stage as a GUIDER for SamplerCustomAdvanced: from the layout's start point, "
            "each concept's prediction blended inside its mask. Sample with the same noise seed, steps and "
            "scheduler as OMG Stage 1 (the steps before the start are taken from stage 1, not sampled again).",
            inputs=[
                io.Model.Input("model", tooltip="The same MODEL as OMG Stage 1's, without the concepts."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP; each concept's prompt is encoded with it."),
                ConceptStackType.Input("concepts", tooltip="The concepts, as given to OMG Stage 1."),
                OMGLayoutType.Input("layout", tooltip="From OMG Stage 1."),
                *_stage2_inputs(),
                _model_concepts_input(),
                _strengths_input(),
            ],
            outputs=[
                io.Guider.Output(display_name="GUIDER", tooltip="For SamplerCustomAdvanced."),
                *_mask_outputs(),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, concepts, layout, overlap="front_to_back", regions=None, sam=None,
                concept_prompts="", crop_concepts=False, mask_threshold=0.4, model_concepts=None,
                masks=None, strengths=STRENGTHS[0]) -> io.NodeOutput:  # fmt: skip
        stack, extra = _need_concepts(cls.NAME, concepts, model_concepts, strengths)
        _check_model_concepts(cls.NAME, model, extra)
        if not isinstance(layout, OMGLayout):
            raise NodeError(cls.NAME, "layout must come from OMG Stage 1.")
        try:
            guider, masks, preview = _guider(cls.NAME, model, clip, stack, layout, overlap, regions, sam,
                                             concept_prompts, crop_concepts, mask_threshold, extra, masks)  # fmt: skip
        except _ERRORS as e:
            raise NodeError(cls.NAME, str(e)) from None
        return io.NodeOutput(guider, masks, preview)


class OMGModelConcept(io.ComfyNode):
    NAME = "OMG Model Concept"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptOMGModelConcept",
            display_name="OMG Model Concept",
            category=CATEGORY_METHODS,
            description="A concept for OMG that is a whole MODEL with its own prompts: the base model with a "
            "training-free identity patch on it (IP-Adapter, InstantID, ... from the packs you have). OMG predicts it "
            "in a pass of its own and blends it inside its mask like any concept.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The base MODEL with the concept's patches on it (attention/model patches; no LoRA: give "
                    "LoRAs as Concept Stack entries).",
                ),
                io.Conditioning.Input("positive", tooltip="The concept's own prompt (and any conditioning it needs)."),
                io.Conditioning.Input("negative", tooltip="The concept's negative prompt."),
                io.String.Input(
                    "class_word",
                    default="",
                    tooltip="Its class word in the scene prompt ('woman'), for automatic masks.",
                ),  # fmt: skip
                io.String.Input(
                    "region_label", default="", optional=True, tooltip="Its box's label, when masks come from regions."
                ),  # fmt: skip
                ModelConceptsType.Input("model_concepts", optional=True, tooltip="Model concepts to add this one to."),
            ],
            outputs=[ModelConceptsType.Output(display_name="model_concepts", tooltip="For OMG Sampler / Guider.")],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, positive, negative, class_word, region_label="", model_concepts=None) -> io.NodeOutput:
        if not class_word.strip() and not region_label.strip():
            raise NodeError(cls.NAME, "give a class_word (automatic masks) or a region_label (boxes).")
        entry = ModelConcept(model, positive, negative, class_word.strip(), region_label.strip())
        return io.NodeOutput(tuple(model_concepts or ()) + (entry,))
