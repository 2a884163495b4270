"""Concept Conductor: one sampling branch per concept beside the base branch, batched into one model call per
step; the base branch's layout kept close to a reference; each concept's features injected into the base
branch inside its (shape-aware) mask.

Two nodes: the all-in-one **Concept Conductor Sampler** for KSampler users, and **Concept Conductor Guider**
for SamplerCustomAdvanced graphs."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..samplers.concept_conductor.guider import ConductorError
from ..samplers.concept_conductor.settings import ConductorSettings
from ..samplers.concept_conductor.setup import build_guider, check_masks, mask_preview, parse_prompts
from ..samplers.concept_stack.placement import concept_masks
from ..samplers.concept_stack.stack import ConceptStackError
from ..samplers.edlora.model import EDLoRAApplyError
from ..samplers.mixofshow.plan import RegionalPlanError
from ..samplers.scoped_lora.adapters import ScopedLoRAError
from .common import CATEGORY_ROOT, ConceptStackType, NodeError, checked_inputs
from .regions import RegionsType

CATEGORY_METHODS = f"{CATEGORY_ROOT}/methods"
_ERRORS = (ConductorError, ScopedLoRAError, EDLoRAApplyError, RegionalPlanError, ConceptStackError)
_D = ConductorSettings()


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
        io.String.Input("negative", multiline=True, default="", tooltip="The negative prompt of every branch."),
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
        io.String.Input(
            "concept_prompts",
            multiline=True,
            default="",
            optional=True,
            tooltip="Optional: a branch's own prompt, one line per concept ('label: prompt', or plain lines in stack "
            "order). Empty: the concept's box prompt if it has one, else the scene prompt with every class word replaced "
            "by the concept.",
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
            "reference's (official: 10 on SD1.5, 30 on SDXL). 0 = no alignment (no reference run either).",
        ),
        io.Float.Input(
            "alignment_end",
            default=_D.alignment_end,
            min=0.0,
            max=1.0,
            step=0.01,
            optional=True,
            tooltip="Align during this first share of the steps (official: 60 of 200 on SD1.5 = 0.3, 50 of 200 on SDXL).",
        ),
        io.Int.Input(
            "alignment_every",
            default=_D.alignment_every,
            min=1,
            max=100,
            optional=True,
            tooltip="Align every n-th step of that stretch (official: 1 on SD1.5, 5 of 200 steps on SDXL).",
        ),
        io.Boolean.Input(
            "shape_masks",
            default=_D.shape_masks,
            optional=True,
            tooltip="On: the masks are re-fitted to each concept's shape from k-means clusters of self-attention "
            "during the middle steps (refine_start..refine_end). Off: the boxes/masks are used as given.",
        ),
        io.Float.Input(
            "refine_start",
            default=_D.refine_start,
            min=0.0,
            max=1.0,
            step=0.01,
            optional=True,
            tooltip="Shape-aware masks: first refinement, as a share of the steps (official: 50 of 200 = 0.25).",
        ),  # fmt: skip
        io.Float.Input(
            "refine_end",
            default=_D.refine_end,
            min=0.0,
            max=1.0,
            step=0.01,
            optional=True,
            tooltip="Shape-aware masks: last refinement, as a share of the steps (official: 80 of 200 = 0.4).",
        ),  # fmt: skip
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
            "the old mask's bounding box is kept.",
        ),  # fmt: skip
    ]


def _settings(alignment_weight, alignment_end, alignment_every, shape_masks, refine_start, refine_end,
              kmeans_restarts, overlap_threshold) -> ConductorSettings:  # fmt: skip
    return ConductorSettings(
        alignment_weight=float(alignment_weight), alignment_end=float(alignment_end),
        alignment_every=int(alignment_every), shape_masks=bool(shape_masks), refine_start=float(refine_start),
        refine_end=float(refine_end), kmeans_restarts=int(kmeans_restarts), overlap_threshold=float(overlap_threshold),
    )  # fmt: skip


def _masks(node: str, stack, regions, masks, width: int, height: int) -> torch.Tensor:
    if len(stack) == 0:
        raise NodeError(node, "the concept stack is empty: add concepts with the Concept Stack nodes.")
    if masks is not None:
        return check_masks(masks, len(stack), width, height)
    if regions is None:
        raise NodeError(
            node,
            "connect regions (a box per concept, matched by the concepts' region labels) or masks (one per concept).",
        )
    sx, sy = width / regions.width, height / regions.height
    if abs(sx - sy) > 8 / min(width, height):
        raise ConductorError(
            f"the regions were drawn on a {regions.width}x{regions.height} image, the latent is {width}x{height} "
            "(another shape). Set the Regions node's size to the latent's."
        )
    return check_masks(torch.stack([m for _, m in concept_masks(stack, regions)]), len(stack), width, height)


def _guider(node, model, clip, concepts, scene_prompt, negative, cfg, regions, masks, concept_prompts, settings,
            width, height, reference_latent=None):  # fmt: skip
    stack = concepts
    m = _masks(node, stack, regions, masks, width, height)
    prompts = parse_prompts(concept_prompts, stack, scene_prompt, regions)
    guider = build_guider(node, model, clip, stack, scene_prompt, negative, cfg, m, settings, prompts, reference_latent)
    return guider, m


def _labels(stack) -> list[str]:
    return [c.label or c.prompt_words or c.class_word or f"concept {i + 1}" for i, c in enumerate(stack)]


class ConceptConductor(io.ComfyNode):
    NAME = "Concept Conductor Sampler"

    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="MultiConceptConceptConductor",
            display_name="Concept Conductor Sampler",
            category=CATEGORY_METHODS,
            description="The most identity-preserving way to put several concepts in one picture: each concept is "
            "sampled in a branch of its own (only its adapter), beside the scene's base branch, all in one batched model "
            "call per step; each concept's attention features replace the base branch's inside its mask, and the base "
            "branch's layout is kept close to a reference (the plain scene, or your reference image). Costs a few times "
            "plain sampling. Works like a KSampler: connect an Empty Latent Image and decode the output.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL, without the concepts."),
                io.Clip.Input(
                    "clip", tooltip="The checkpoint's CLIP; each branch's prompt is encoded with its concept."
                ),
                io.Vae.Input("vae", tooltip="Encodes a reference image and decodes the preview."),
                io.Latent.Input("latent_image", tooltip="An Empty Latent Image of the size to sample."),
                io.Int.Input(
                    "noise_seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="The noise seed.",
                ),  # fmt: skip
                io.Int.Input("steps", default=30, min=1, max=1000, tooltip="Sampling steps."),
                io.Float.Input(
                    "cfg",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance of every branch (official: 7.5).",
                ),  # fmt: skip
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="euler",
                    tooltip="With alignment on: one that takes latent steps between steps (euler, ddim, dpmpp_2m, lms, "
                    "euler_ancestral, ...); others are refused by name.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="normal",
                    tooltip="The noise schedule.",
                ),  # fmt: skip
                *_inputs_where(),
                io.Image.Input(
                    "reference_image",
                    optional=True,
                    tooltip="Optional layout reference (e.g. a picture with people and pets where you want them), the "
                    "sampled size. Without it the reference is the plain scene prompt from the same seed.",
                ),
                *_inputs_settings(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The picture's latent (decode it)."),
                io.Mask.Output(
                    display_name="masks", tooltip="Each concept's final mask, in stack order, at image size."
                ),
                io.Image.Output(display_name="preview", tooltip="The final masks over the picture, labelled."),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, vae, latent_image, noise_seed, steps, cfg, sampler_name, scheduler, concepts,
                scene_prompt, negative, regions=None, masks=None, concept_prompts="", reference_image=None,
                alignment_weight=_D.alignment_weight, alignment_end=_D.alignment_end,
                alignment_every=_D.alignment_every, shape_masks=_D.shape_masks, refine_start=_D.refine_start,
                refine_end=_D.refine_end, kmeans_restarts=_D.kmeans_restarts,
                overlap_threshold=_D.overlap_threshold) -> io.NodeOutput:  # fmt: skip
        import comfy.sample
        import comfy.samplers
        import comfy.utils

        for name, value, options in (
            ("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
            ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS),
        ):
            if value not in options:
                raise NodeError(cls.NAME, f"{name} is {str(value)[:40]!r}; pick one from the list (e.g. {options[0]}).")
        samples = latent_image["samples"]
        height, width = int(samples.shape[-2]) * 8, int(samples.shape[-1]) * 8
        settings = _settings(alignment_weight, alignment_end, alignment_every, shape_masks, refine_start, refine_end,
                             kmeans_restarts, overlap_threshold)  # fmt: skip
        try:
            reference = None
            if reference_image is not None:
                if tuple(reference_image.shape[1:3]) != (height, width):
                    raise ConductorError(
                        f"reference_image is {reference_image.shape[2]}x{reference_image.shape[1]} px, the latent "
                        f"{width}x{height}. Scale the reference (Upscale Image) or the latent to match."
                    )
                reference = vae.encode(reference_image[:1, :, :, :3])
            guider, _ = _guider(cls.NAME, model, clip, concepts, scene_prompt, negative, cfg, regions, masks,
                                concept_prompts, settings, width, height, reference)  # fmt: skip
            sigmas = comfy.samplers.calculate_sigmas(
                model.get_model_object("model_sampling"), scheduler, int(steps)
            ).to(torch.float32)  # fmt: skip
            noise = comfy.sample.prepare_noise(samples, noise_seed, latent_image.get("batch_index"))
            bar = comfy.utils.ProgressBar(int(steps))
            out = guider.sample(noise, samples, comfy.samplers.sampler_object(sampler_name), sigmas,
                                callback=lambda step, x0, x, total: bar.update_absolute(step + 1, total),
                                disable_pbar=True, seed=noise_seed)  # fmt: skip
        except _ERRORS as e:
            raise NodeError(cls.NAME, str(e)) from None
        except ValueError as e:
            if "do not fit" in str(e):
                raise NodeError(cls.NAME, str(e)) from None
            raise
        final = guider.state.image_masks(height, width)
        image = vae.decode(out[:1].to(samples.device))
        preview = mask_preview(image, final, _labels(concepts))
        result = dict(latent_image)
        result["samples"] = out.to(samples.device)
        result.pop("noise_mask", None)
        return io.NodeOutput(result, final, preview)


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
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL, without the concepts."),
                io.Clip.Input(
                    "clip", tooltip="The checkpoint's CLIP; each branch's prompt is encoded with its concept."
                ),
                io.Float.Input(
                    "cfg",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance of every branch (official: 7.5).",
                ),  # fmt: skip
                io.Int.Input(
                    "width",
                    default=512,
                    min=64,
                    max=8192,
                    step=8,
                    tooltip="The width of the latent you will sample (the masks are checked against it).",
                ),  # fmt: skip
                io.Int.Input(
                    "height", default=512, min=64, max=8192, step=8, tooltip="The height of the latent you will sample."
                ),  # fmt: skip
                *_inputs_where(),
                io.Latent.Input(
                    "reference_latent",
                    optional=True,
                    tooltip="Optional layout reference: a VAE Encode of your picture (the sampled size). Without it the "
                    "reference is the plain scene prompt sampled from the same noise.",
                ),
                *_inputs_settings(),
            ],
            outputs=[
                io.Guider.Output(display_name="GUIDER", tooltip="For SamplerCustomAdvanced."),
                io.Mask.Output(
                    display_name="masks", tooltip="Each concept's starting mask, in stack order, image size."
                ),
                io.Image.Output(display_name="preview", tooltip="The starting masks, labelled."),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, cfg, width, height, concepts, scene_prompt, negative, regions=None, masks=None,
                concept_prompts="", reference_latent=None, alignment_weight=_D.alignment_weight,
                alignment_end=_D.alignment_end, alignment_every=_D.alignment_every, shape_masks=_D.shape_masks,
                refine_start=_D.refine_start, refine_end=_D.refine_end, kmeans_restarts=_D.kmeans_restarts,
                overlap_threshold=_D.overlap_threshold) -> io.NodeOutput:  # fmt: skip
        settings = _settings(alignment_weight, alignment_end, alignment_every, shape_masks, refine_start, refine_end,
                             kmeans_restarts, overlap_threshold)  # fmt: skip
        reference = None if reference_latent is None else reference_latent["samples"]
        try:
            guider, m = _guider(cls.NAME, model, clip, concepts, scene_prompt, negative, cfg, regions, masks,
                                concept_prompts, settings, int(width), int(height), reference)  # fmt: skip
        except _ERRORS as e:
            raise NodeError(cls.NAME, str(e)) from None
        image_masks = torch.nn.functional.interpolate(m[:, None], size=(int(height), int(width)), mode="nearest")[:, 0]
        return io.NodeOutput(guider, image_masks, mask_preview(None, image_masks, _labels(concepts)))
