"""Concept Conductor: one sampling branch per concept beside the base branch, batched into one model call per
step; the base branch's layout kept close to a reference; each concept's features injected into the base
branch inside its (shape-aware) mask.

Two nodes: the all-in-one **Concept Conductor Sampler** for KSampler users, and **Concept Conductor Guider**
for SamplerCustomAdvanced graphs."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..samplers.concept_conductor.guider import ConductorError
from ..samplers.concept_conductor.reference_masks import reference_masks
from ..samplers.concept_conductor.settings import OFFICIAL_STEPS, ConductorSettings, for_family
from ..samplers.concept_conductor.setup import build_guider, check_masks, mask_preview, parse_prompts
from ..samplers.concept_stack.placement import concept_masks
from ..samplers.concept_stack.stack import ConceptStackError
from ..samplers.edlora.model import EDLoRAApplyError, model_family
from ..samplers.mixofshow.encoding import encode
from ..samplers.mixofshow.plan import RegionalPlanError
from ..samplers.omg.layout import LayoutError
from ..samplers.omg.stages import OMGError
from ..samplers.scene_conditioning import SceneConditioningError
from ..samplers.scoped_lora.adapters import ScopedLoRAError
from .common import CATEGORY_METHODS, ConceptStackType, NodeError, checked_inputs, show_text
from .inputs import (
    cfg_input,
    image_size_input,
    prompt_input,
    sampler_name_input,
    sampling_steps_input,
    scene_conditioning_inputs,
    schedule_share_input,
    scheduler_input,
    seed_input,
)
from .regions import RegionsType
from .sam import SamModelType
from .sampling import check_sampler_names, latent_output, sample_guider, scene_conds

_ERRORS = (ConductorError, ScopedLoRAError, EDLoRAApplyError, RegionalPlanError, ConceptStackError,
           SceneConditioningError, OMGError, LayoutError)  # fmt: skip
CONDITIONING_WHERE = ("the base branch and the reference run; its ControlNet / T2I-Adapter acts on the concepts' "
                      "branches too (all branches are one batched call); they keep their own prompts")  # fmt: skip
log = logging.getLogger("multiconcept")
_D = ConductorSettings()
SETTINGS_FOR = ("the model's family (official)", "as set here")
ALIGNMENT_SCALES = ("repeat to the official 200 steps", "weight scaled to 200 steps", "per step")


def _inputs_model() -> list:
    """The model and its CLIP, as the Sampler and the Guider take them."""
    return [
        io.Model.Input("model", tooltip="The checkpoint's MODEL, without the concepts."),
        io.Clip.Input("clip", tooltip="The checkpoint's CLIP; each branch's prompt is encoded with its concept."),
    ]


def _input_cfg():
    """The guidance, as the Sampler and the Guider take it."""
    return cfg_input(7.5, "Classifier-free guidance of every branch (official: 7.5).")


def _inputs_where() -> list:
    return [
        ConceptStackType.Input(
            "concepts",
            tooltip="The concepts (ED-LoRAs, LoRAs) from the Concept Stack nodes, each with a class word and the label "
            "of its box. Each gets its own sampling branch with only its own adapter.",
        ),
        io.String.Input(
            "scene_prompt",
            multiline=True,
            default="a photo of a man and a dog in a park",
            tooltip="The scene with class words ('a man and a dog ...'): the base branch samples it. Each concept's "
            "branch gets it with every class word replaced by that concept (its words + class word).",
        ),
        prompt_input("negative", "The negative prompt of every branch."),
        RegionsType.Input(
            "regions",
            optional=True,
            tooltip="Where each concept goes: its box (or SAM mask) is matched by the concept's region label. The "
            "masks start there; with shape_masks on they are then fitted to the concept's shape. A box's own prompt, "
            "if it has one, becomes its concept's branch prompt.",
        ),
        io.Mask.Input(
            "masks",
            optional=True,
            tooltip="Instead of regions: one mask per concept, in stack order, at the image's size.",
        ),
        prompt_input(
            "concept_prompts",
            "Optional: a branch's own prompt, one line per concept ('label: prompt', or plain lines in stack "
            "order). Empty: the concept's box prompt if it has one, else the scene prompt with every class word replaced "
            "by the concept.",
            optional=True,
        ),
    ]


def _inputs_settings() -> list:
    return [
        io.Float.Input(
            "alignment_weight",
            default=_D.alignment_weight,
            min=0.0,
            max=1000.0,
            step=0.5,
            optional=True,
            tooltip="Layout alignment: the step size pulling every branch's self-attention keys toward the "
            "reference's (official: 10 on SD1.5, 40 on SDXL). 0 = no alignment (no reference run either).",
        ),
        schedule_share_input(
            "alignment_end",
            _D.alignment_end,
            "Align during this first share of the steps (official: 60 of 200 on SD1.5 = 0.3, 50 of 200 on SDXL).",
        ),
        io.Int.Input(
            "alignment_every",
            default=_D.alignment_every,
            min=1,
            max=100,
            optional=True,
            tooltip="Align every n-th step of that stretch (official: 1, every step, on SD1.5 and SDXL).",
        ),
        io.Boolean.Input(
            "shape_masks",
            default=_D.shape_masks,
            optional=True,
            tooltip="On: the masks are re-fitted to each concept's shape from k-means clusters of self-attention "
            "during the middle steps (refine_start..refine_end). Off: the boxes/masks are used as given.",
        ),
        schedule_share_input(
            "refine_start",
            _D.refine_start,
            "Shape-aware masks: first refinement, as a share of the steps (official: 50 of 200 = 0.25 on SD1.5, 60 of "
            "200 = 0.3 on SDXL).",
        ),
        schedule_share_input(
            "refine_end",
            _D.refine_end,
            "Shape-aware masks: last refinement, as a share of the steps (official: 80 of 200 = 0.4).",
        ),
        io.Int.Input(
            "kmeans_restarts",
            default=_D.kmeans_restarts,
            min=1,
            max=1000,
            optional=True,
            tooltip="k-means restarts per clustering (official: 100 on SD1.5, 25 on SDXL); fewer is faster.",
        ),  # fmt: skip
        io.Float.Input(
            "overlap_threshold",
            default=_D.overlap_threshold,
            min=0.0,
            max=1.0,
            step=0.05,
            optional=True,
            tooltip="A cluster replaces a concept's mask only if it overlaps the old mask this much (IoU); otherwise "
            "the old mask's bounding box is kept (official: 0 on SD1.5, 0.7 on SDXL).",
        ),  # fmt: skip
        io.Combo.Input(
            "settings_for",
            options=list(SETTINGS_FOR),
            default=SETTINGS_FOR[0],
            optional=True,
            tooltip="The model's family (official): on SDXL, every setting above left at its default (the official "
            "SD1.5 value) takes the official SDXL value instead (alignment weight 40, end 0.25, every step; "
            "refinement 0.3..0.4, overlap threshold 0.7, 25 k-means restarts); a setting you changed keeps your value. "
            "As set here: the values above, whatever the model.",
        ),
    ]


def _inputs_later() -> list:
    """Inputs added after the first release, at the end so saved workflows keep their widget values."""
    return [
        prompt_input(
            "reference_prompt",
            "Optional: what the reference shows, with class words ('a dog and a cat in the street'); the reference "
            "is inverted with it, as the official ref_prompt. Empty: the scene prompt. Needs a reference.",
            optional=True,
        ),
        io.Boolean.Input(
            "use_loss_mask",
            default=False,
            optional=True,
            tooltip="Align only inside the concepts' masks (the reference's subjects), leaving the background free "
            "(official use_loss_mask; off by default, as the official configs).",
        ),
        io.Combo.Input(
            "alignment_scale",
            options=list(ALIGNMENT_SCALES),
            default=ALIGNMENT_SCALES[0],
            optional=True,
            tooltip="The official runs take 200 steps, one alignment step of alignment_weight at each aligned step "
            "(61 on SD1.5). 'repeat': each aligned step of a shorter run takes several steps of alignment_weight, as "
            "many in all as the official run (30 steps: 6 each, 60 in all; each costs a gradient pass). 'weight "
            "scaled': one larger step instead (cheaper; can overshoot at few steps). 'per step': one step of "
            "alignment_weight (weaker with fewer steps). At 200 steps all three are the official run.",
        ),
    ]


def _conductor_inputs(head: list, reference, tail=()) -> list:
    """A Concept Conductor node's inputs, in the order saved workflows rely on: the node's own first inputs, where
    the concepts go, the layout reference, the settings, then what came later."""
    return [
        *head, *_inputs_where(), reference, *_inputs_settings(), *scene_conditioning_inputs(CONDITIONING_WHERE),
        *_inputs_later(), *tail,
    ]  # fmt: skip


def _conductor_outputs(first, masks_tooltip: str, preview_tooltip: str) -> list:
    return [
        first,
        io.Mask.Output(display_name="masks", tooltip=masks_tooltip),
        io.Image.Output(display_name="preview", tooltip=preview_tooltip),
    ]


def _settings(node: str, model, alignment_weight, alignment_end, alignment_every, shape_masks, refine_start,
              refine_end, kmeans_restarts, overlap_threshold, settings_for=SETTINGS_FOR[0], use_loss_mask=False,
              alignment_scale=ALIGNMENT_SCALES[0]) -> ConductorSettings:  # fmt: skip
    if settings_for not in SETTINGS_FOR:
        raise NodeError(node, f"settings_for is {settings_for!r}; choose one of {', '.join(SETTINGS_FOR)}.")
    if alignment_scale not in ALIGNMENT_SCALES:
        raise NodeError(node, f"alignment_scale is {alignment_scale!r}; choose one of {', '.join(ALIGNMENT_SCALES)}.")
    if settings_for == SETTINGS_FOR[0]:
        given = ConductorSettings(alignment_weight=float(alignment_weight), alignment_end=float(alignment_end),
                                  alignment_every=int(alignment_every), refine_start=float(refine_start),
                                  refine_end=float(refine_end), kmeans_restarts=int(kmeans_restarts),
                                  overlap_threshold=float(overlap_threshold))  # fmt: skip
        family = model_family(model)
        official, changed = for_family(given, family)
        if changed:
            log.info("[multi-concept] %s: official %s settings for %s", node, family, ", ".join(changed))
            alignment_weight, alignment_end = official.alignment_weight, official.alignment_end
            alignment_every, refine_start, refine_end = (
                official.alignment_every,
                official.refine_start,
                official.refine_end,
            )
            kmeans_restarts, overlap_threshold = official.kmeans_restarts, official.overlap_threshold
    if shape_masks and float(refine_start) > float(refine_end):
        raise NodeError(node, f"refine_start ({float(refine_start):g}) is after refine_end ({float(refine_end):g}), so "
                        "the masks would never be refined. Make refine_start at most refine_end (the official "
                        "SD1.5 window is 0.25..0.4), or turn shape_masks off.")  # fmt: skip
    return ConductorSettings(
        alignment_weight=float(alignment_weight), alignment_end=float(alignment_end),
        alignment_every=int(alignment_every), shape_masks=bool(shape_masks), refine_start=float(refine_start),
        refine_end=float(refine_end), kmeans_restarts=int(kmeans_restarts), overlap_threshold=float(overlap_threshold),
        use_loss_mask=bool(use_loss_mask), scale_to_steps=None if alignment_scale == ALIGNMENT_SCALES[2] else OFFICIAL_STEPS,
        scale_by="weight" if alignment_scale == ALIGNMENT_SCALES[1] else "repeat",
    )  # fmt: skip


def _masks(node: str, stack, regions, masks, width: int, height: int) -> torch.Tensor:
    if len(stack) == 0:
        raise NodeError(node, "the concept stack is empty: add concepts with the Concept Stack nodes.")
    if masks is not None:
        return check_masks(masks, len(stack), width, height)
    if regions is None:
        raise NodeError(
            node,
            "connect regions (a box per concept, matched by the concepts' region labels) or masks (one per concept). "
            "Without either, Concept Conductor Sampler finds them itself in the plain scene sample (each concept's "
            "class word); with a reference image, give its subjects' masks.",
        )
    sx, sy = width / regions.width, height / regions.height
    if abs(sx - sy) > 8 / min(width, height):
        raise ConductorError(
            f"the regions were drawn on a {regions.width}x{regions.height} image, the latent is {width}x{height} "
            "(another shape). Set the Regions node's size to the latent's."
        )
    return check_masks(torch.stack([m for _, m in concept_masks(stack, regions)]), len(stack), width, height)


def _guider(node, model, clip, concepts, scene_prompt, negative, cfg, regions, masks, concept_prompts, settings,
            width, height, reference_latent=None, conditioning=(None, None), reference_prompt=""):  # fmt: skip
    stack = concepts
    if (reference_prompt or "").strip() and reference_latent is None:
        raise ConductorError(
            "reference_prompt describes a reference, but none is connected: connect the reference image (Sampler: "
            "reference_image; Guider: reference_latent), or clear reference_prompt (without a reference the "
            "reference is the scene prompt sampled from the same noise)."
        )
    m = _masks(node, stack, regions, masks, width, height)
    prompts = parse_prompts(concept_prompts, stack, scene_prompt, regions)
    scene = None
    if any(c is not None for c in conditioning):
        own = encode(clip, scene_prompt or ""), encode(clip, negative or "")
        scene = scene_conds(node, model, conditioning, *own, "the scene prompt")
    guider = build_guider(node, model, clip, stack, scene_prompt, negative, cfg, m, settings, prompts, reference_latent,
                          size=(int(width), int(height)), scene=scene)  # fmt: skip
    if (reference_prompt or "").strip():
        guider.reference_positive = encode(clip, reference_prompt)
    return guider, m


def _reference_masks(node, model, clip, vae, stack, latent_image, seed, steps, cfg, sampler_name, scheduler,
                     scene_prompt, negative, given, sam) -> torch.Tensor:  # fmt: skip
    """Neither boxes nor masks nor a reference image: the masks of the reference's subjects, found in the plain
    scene sample (``reference_masks``); the node says so on its face and in the log."""
    positive, negative_c = scene_conds(node, model, given, encode(clip, scene_prompt or ""), encode(clip, negative or ""),
                                       "the scene prompt")  # fmt: skip
    found = reference_masks(model, clip, vae, stack, latent_image, seed, int(steps), cfg, sampler_name, scheduler,
                            scene_prompt, positive, negative_c, sam)  # fmt: skip
    text = f"{node}: no boxes or masks given, so the masks are {found.how}."
    log.info("[multi-concept] %s", text)
    show_text(text)
    return found.masks


def _labels(stack) -> list[str]:
    return [c.label or c.prompt_words or c.class_word or f"concept {i + 1}" for i, c in enumerate(stack)]


class ConceptConductor(io.ComfyNode):
    NAME = "Concept Conductor Sampler"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptConceptConductor",
            display_name="Concept Conductor Sampler",
            category=CATEGORY_METHODS,
            description="The most identity-preserving way to put several concepts in one picture: each concept is "
            "sampled in a branch of its own (only its adapter), beside the scene's base branch, all in one batched model "
            "call per step; each concept's attention features replace the base branch's inside its mask, and the base "
            "branch's layout is kept close to a reference (the plain scene, or your reference image). Costs a few times "
            "plain sampling. Works like a KSampler: connect an Empty Latent Image and decode the output.",
            inputs=_conductor_inputs(
                [
                    *_inputs_model(),
                    io.Vae.Input("vae", tooltip="Encodes a reference image and decodes the preview."),
                    io.Latent.Input("latent_image", tooltip="An Empty Latent Image of the size to sample."),
                    seed_input("noise_seed", "The noise seed."),
                    sampling_steps_input(30, "Sampling steps."),
                    _input_cfg(),
                    sampler_name_input(
                        "With alignment on: one that takes latent steps between steps (euler, ddim, dpmpp_2m, lms, "
                        "euler_ancestral, ...); others are refused by name."
                    ),
                    scheduler_input(),
                ],
                io.Image.Input(
                    "reference_image",
                    optional=True,
                    tooltip="Optional layout reference (e.g. a picture with people and pets where you want them), the "
                    "sampled size. Without it the reference is the plain scene prompt from the same seed.",
                ),
                [
                    SamModelType.Input(
                        "sam",
                        optional=True,
                        tooltip="Optional SAM model: with neither regions nor masks, the masks found from each class "
                        "word's attention in the plain scene sample are refined to the subjects' outlines.",
                    )
                ],
            ),
            outputs=_conductor_outputs(
                io.Latent.Output(display_name="LATENT", tooltip="The picture's latent (decode it)."),
                "Each concept's final mask, in stack order, at image size.",
                "The final masks over the picture, labelled.",
            ),
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, vae, latent_image, noise_seed, steps, cfg, sampler_name, scheduler, concepts,
                scene_prompt, negative, regions=None, masks=None, concept_prompts="", reference_image=None,
                alignment_weight=_D.alignment_weight, alignment_end=_D.alignment_end,
                alignment_every=_D.alignment_every, shape_masks=_D.shape_masks, refine_start=_D.refine_start,
                refine_end=_D.refine_end, kmeans_restarts=_D.kmeans_restarts,
                overlap_threshold=_D.overlap_threshold, settings_for=SETTINGS_FOR[0], positive_conditioning=None,
                negative_conditioning=None, reference_prompt="", use_loss_mask=False,
                alignment_scale=ALIGNMENT_SCALES[0], sam=None) -> io.NodeOutput:  # fmt: skip
        import comfy.samplers
        import comfy.utils

        check_sampler_names(cls.NAME, sampler_name, scheduler)
        samples = latent_image["samples"]
        height, width = int(samples.shape[-2]) * 8, int(samples.shape[-1]) * 8
        settings = _settings(cls.NAME, model, alignment_weight, alignment_end, alignment_every, shape_masks, refine_start,
                             refine_end, kmeans_restarts, overlap_threshold, settings_for, use_loss_mask,
                             alignment_scale)  # fmt: skip
        try:
            reference = None
            if reference_image is not None:
                if tuple(reference_image.shape[1:3]) != (height, width):
                    raise ConductorError(
                        f"reference_image is {reference_image.shape[2]}x{reference_image.shape[1]} px, the latent "
                        f"{width}x{height}. Scale the reference (Upscale Image) or the latent to match."
                    )
                reference = vae.encode(reference_image[:1, :, :, :3])
            given = (positive_conditioning, negative_conditioning)
            if regions is None and masks is None and reference is None and concepts is not None and len(concepts):
                masks = _reference_masks(cls.NAME, model, clip, vae, concepts, latent_image, noise_seed, steps, cfg,
                                         sampler_name, scheduler, scene_prompt, negative, given, sam)  # fmt: skip
            guider, _ = _guider(cls.NAME, model, clip, concepts, scene_prompt, negative, cfg, regions, masks,
                                concept_prompts, settings, width, height, reference, given, reference_prompt)  # fmt: skip
            sigmas = comfy.samplers.calculate_sigmas(
                model.get_model_object("model_sampling"), scheduler, int(steps)
            ).to(torch.float32)  # fmt: skip
            bar = comfy.utils.ProgressBar(int(steps))
            out = sample_guider(guider, latent_image, noise_seed, sampler_name, sigmas,
                                lambda step, x0, x, total: bar.update_absolute(step + 1, total))  # fmt: skip
        except _ERRORS as e:
            raise NodeError(cls.NAME, str(e)) from None
        except ValueError as e:
            if "do not fit" in str(e):
                raise NodeError(cls.NAME, str(e)) from None
            raise
        final = guider.state.image_masks(height, width)
        image = vae.decode(out[:1].to(samples.device))
        preview = mask_preview(image, final, _labels(concepts))
        return io.NodeOutput(latent_output(latent_image, out.to(samples.device)), final, preview)


class ConceptConductorGuider(io.ComfyNode):
    NAME = "Concept Conductor Guider"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptConceptConductorGuider",
            display_name="Concept Conductor Guider",
            category=CATEGORY_METHODS,
            description="Concept Conductor as a GUIDER for SamplerCustomAdvanced: a branch per concept beside the "
            "scene's base branch, in one batched model call per step; concept features injected in their masks; the "
            "layout aligned to a reference in the early steps. Use a sampler that takes latent steps (euler, ddim, "
            "dpmpp_2m, ...) while alignment is on.",
            inputs=_conductor_inputs(
                [
                    *_inputs_model(),
                    _input_cfg(),
                    image_size_input(
                        "width", "The width of the latent you will sample (the masks are checked against it)."
                    ),
                    image_size_input("height", "The height of the latent you will sample."),
                ],
                io.Latent.Input(
                    "reference_latent",
                    optional=True,
                    tooltip="Optional layout reference: a VAE Encode of your picture (the sampled size). Without it the "
                    "reference is the plain scene prompt sampled from the same noise.",
                ),
            ),
            outputs=_conductor_outputs(
                io.Guider.Output(display_name="GUIDER", tooltip="For SamplerCustomAdvanced."),
                "Each concept's starting mask, in stack order, image size.",
                "The starting masks, labelled.",
            ),
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, cfg, width, height, concepts, scene_prompt, negative, regions=None, masks=None,
                concept_prompts="", reference_latent=None, alignment_weight=_D.alignment_weight,
                alignment_end=_D.alignment_end, alignment_every=_D.alignment_every, shape_masks=_D.shape_masks,
                refine_start=_D.refine_start, refine_end=_D.refine_end, kmeans_restarts=_D.kmeans_restarts,
                overlap_threshold=_D.overlap_threshold, settings_for=SETTINGS_FOR[0], positive_conditioning=None,
                negative_conditioning=None, reference_prompt="", use_loss_mask=False,
                alignment_scale=ALIGNMENT_SCALES[0]) -> io.NodeOutput:  # fmt: skip
        settings = _settings(cls.NAME, model, alignment_weight, alignment_end, alignment_every, shape_masks, refine_start,
                             refine_end, kmeans_restarts, overlap_threshold, settings_for, use_loss_mask,
                             alignment_scale)  # fmt: skip
        reference = None if reference_latent is None else reference_latent["samples"]
        try:
            guider, m = _guider(cls.NAME, model, clip, concepts, scene_prompt, negative, cfg, regions, masks,
                                concept_prompts, settings, int(width), int(height), reference,
                                (positive_conditioning, negative_conditioning), reference_prompt)  # fmt: skip
        except _ERRORS as e:
            raise NodeError(cls.NAME, str(e)) from None
        image_masks = torch.nn.functional.interpolate(m[:, None], size=(int(height), int(width)), mode="nearest")[:, 0]
        return io.NodeOutput(guider, image_masks, mask_preview(None, image_masks, _labels(concepts)))
