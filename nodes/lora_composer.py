"""LoRA-Composer: Mix-of-Show regional sampling plus attention constraints (concept enhancement by latent
steps, concept isolation in self-attention, latent re-initialisation), as a GUIDER for SamplerCustomAdvanced;
and a picture of each concept's attention map over its box at chosen steps."""

from __future__ import annotations

from comfy_api.latest import io

from ..samplers.lora_composer.concepts import check_box_sizes, composer_concepts
from ..samplers.lora_composer.guider import (
    ComposerError,
    ComposerSettings,
    ComposerState,
    LoRAComposerGuider,
    install_composer,
)
from ..samplers.lora_composer.preview import draw_attention_maps, pick_steps
from ..samplers.mixofshow.sampling import REGIONAL_KEY
from ..samplers.scene_conditioning import SceneConditioningError
from .common import CATEGORY_METHODS, NodeError, checked_inputs
from .inputs import cfg_input, scene_conditioning_inputs, schedule_share_input
from .mixofshow_regional import LORA_SCOPES, build_regional, regional_concept_inputs, regional_inputs
from .sampling import scene_conds

_DEFAULTS = ComposerSettings()


def _setting(name, default, tooltip, maximum=100.0, step=0.1):
    """An optional number setting from 0 (a loss weight unless told)."""
    return io.Float.Input(name, default=default, min=0.0, max=maximum, step=step, optional=True, tooltip=tooltip)


def _switch(name, tooltip):
    """An optional on/off setting, on by default."""
    return io.Boolean.Input(name, default=True, optional=True, tooltip=tooltip)


class LoRAComposer(io.ComfyNode):
    NAME = "LoRA-Composer"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptLoRAComposer",
            display_name="LoRA-Composer Guider",
            category=CATEGORY_METHODS,
            description="Several concepts in their boxes, training-free, fighting the two usual failures: a concept "
            "vanishing (its words' attention is pushed into its box by a small step on the latent in the early "
            "steps) and two concepts merging (positions in one box cannot attend to another box). Built on "
            "Mix-of-Show regional sampling; connect the GUIDER to SamplerCustomAdvanced (euler, dpmpp_2m, ...).",
            inputs=[
                *regional_inputs(
                    "The checkpoint's MODEL (SD1.x, SD2.x or SDXL).",
                    "From the Regions node (or SAM Masks): a box per concept, its prompt naming the "
                    "concept's words (or class word). Draw them at the size you sample.",
                    "The whole scene, e.g. 'a man and a dog in a park'. Governs everything outside the boxes.",
                    "Negative prompt for the image and the boxes.",
                ),
                cfg_input(7.5, "Classifier-free guidance.", rounding=None),
                *regional_concept_inputs(
                    "The concepts (ED-LoRAs, LoRAs) from the Concept Stack nodes; each goes to the box with "
                    "its region label (or whose prompt names its words).",
                    "scoped: each concept's UNet LoRA acts only inside its box. merged: every LoRA everywhere. "
                    "already applied: the MODEL/CLIP carry the concepts (e.g. a fused model).",
                ),
                _setting(
                    "enhancement",
                    _DEFAULTS.enhancement,
                    "Concept enhancement: weight of the top-k loss that pulls each concept's word attention into "
                    "the centre of its box (official 8). 0 turns it off.",
                ),  # fmt: skip
                _setting(
                    "fill",
                    _DEFAULTS.fill,
                    "Weight of the fill loss: every row and column of the box should hold a strong response, so the "
                    "concept fills its box (official 2). 0 turns it off.",
                ),  # fmt: skip
                _setting(
                    "region",
                    _DEFAULTS.region,
                    "Weight of the region loss on self-attention that leaves a concept's box (official 10). "
                    "0 turns it off.",
                ),  # fmt: skip
                _setting(
                    "step_size",
                    _DEFAULTS.step_size,
                    "Size of the latent step per denoising step (official 20, decaying as sqrt(1 -> 0.5) over "
                    "the schedule). 0: no latent steps (no extra passes).",
                    1000.0,
                    0.5,
                ),
                schedule_share_input(
                    "refine_until",
                    _DEFAULTS.refine_until,
                    "Latent steps run until this fraction of the schedule (official: step 25 of 50 = 0.5). "
                    "Each costs about one extra model pass.",
                ),
                _switch(
                    "stop_when_loss_rises",
                    "Stop the latent steps for good at the first step (after the first tenth) where the loss "
                    "rose (the official rule).",
                ),
                _switch(
                    "isolation",
                    "Concept isolation: in every self-attention layer, positions in one box cannot attend "
                    "to another box (the background stays free). Keeps concepts from merging.",
                ),
                _switch(
                    "reinitialise",
                    "Before sampling, move the patch of noise each concept already favours into its box (one "
                    "extra model pass), then restore the noise's statistics.",
                ),
                _setting(
                    "top_k_ratio",
                    _DEFAULTS.top_k_ratio,
                    "Share of the box's cells the top-k losses average (official 0.2).",
                    1.0,
                    0.01,
                ),  # fmt: skip
                _setting(
                    "smoothing",
                    _DEFAULTS.smooth_sigma,
                    "Sigma of the 3x3 Gaussian that smooths the attention maps before the losses (official 0.5; "
                    "0 = none).",
                    5.0,
                    0.05,
                ),  # fmt: skip
                io.Combo.Input(
                    "lora_layers",
                    options=list(LORA_SCOPES),
                    default=LORA_SCOPES[1],
                    optional=True,
                    tooltip="Which of a concept's UNet LoRA layers act inside its box (scoped adapters). Cross-attention "
                    "k, v and out, as the official code: the keys and values of the box prompt and the output "
                    "projection of the box's result, with the base model's queries; its self-attention, query and "
                    "feed-forward layers are not used. Every layer: all of them, inside the box.",
                ),
                *scene_conditioning_inputs(
                    "the global prompt's place (the boxes ride on it), so a ControlNet or T2I-Adapter acts on the "
                    "whole UNet call, as the official code runs its T2I-Adapters"
                ),
            ],
            outputs=[
                io.Guider.Output(display_name="GUIDER", tooltip="For SamplerCustomAdvanced."),
                io.Image.Output(display_name="preview", tooltip="Which box holds which prompt and concept."),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, regions, global_prompt, global_negative, cfg, concepts=None, adapters="scoped",
                enhancement=8.0, fill=2.0, region=10.0, step_size=20.0, refine_until=0.5, stop_when_loss_rises=True,
                isolation=True, reinitialise=True, top_k_ratio=0.2, smoothing=0.5,
                lora_layers=LORA_SCOPES[1], positive_conditioning=None,
                negative_conditioning=None) -> io.NodeOutput:  # fmt: skip
        settings = ComposerSettings(
            enhancement=float(enhancement), fill=float(fill), region=float(region), top_k_ratio=float(top_k_ratio),
            smooth_sigma=float(smoothing), step_size=float(step_size), refine_until=float(refine_until),
            stop_when_loss_rises=bool(stop_when_loss_rises), isolation=bool(isolation),
            reinitialise=bool(reinitialise),
        )  # fmt: skip
        if settings.refines and settings.top_k_ratio <= 0:
            raise NodeError(cls.NAME, "top_k_ratio must be above 0 (official 0.2).")
        built = build_regional(cls.NAME, model, clip, regions, global_prompt, global_negative, concepts, adapters,
                               lora_scope=lora_layers)  # fmt: skip
        side = built.positive[0][1][REGIONAL_KEY]
        prompt_tokens = [int(c.shape[-2]) for c in side.contexts]
        try:
            targets = composer_concepts(cls.NAME, built.stack, built.plans, built.region_clips, prompt_tokens)
            if settings.refines or settings.reinitialise:
                check_box_sizes(cls.NAME, built.layout.masks, targets, regions.width, regions.height,
                                settings.loss_divisor)  # fmt: skip
        except ComposerError as e:
            raise NodeError(cls.NAME, str(e).removeprefix(f"{cls.NAME}: ")) from None
        state = ComposerState(settings, targets, built.layout.masks, cls.NAME, layout=built.layout)
        install_composer(built.model, state)
        guider = LoRAComposerGuider(built.model, state)
        try:
            positive, negative = _with_regions(
                cls.NAME, model, built, (positive_conditioning, negative_conditioning), global_prompt
            )
        except SceneConditioningError as e:
            raise NodeError(cls.NAME, str(e)) from None
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider, built.preview)


def _with_regions(node, model, built, given, global_prompt) -> tuple[list, list]:
    """The guider's conds: the given scene conditionings where connected, each carrying the regions its side of
    ``built`` carries; else ``built``'s own."""
    positive, negative = scene_conds(node, model, given, built.positive, built.negative, "global_prompt")
    out = []
    for chosen, own in ((positive, built.positive), (negative, built.negative)):
        side = own[0][1][REGIONAL_KEY]
        out.append(own if chosen is own else [[c, {**d, REGIONAL_KEY: side}] for c, d in chosen])
    return out[0], out[1]


class LoRAComposerAttention(io.ComfyNode):
    NAME = "LoRA-Composer Attention Maps"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptLoRAComposerAttention",
            display_name="LoRA-Composer Attention Maps",
            category=CATEGORY_METHODS,
            description="Each concept's attention map (its words, at the loss resolution) over its box at chosen "
            "steps of the last sampling with a LoRA-Composer GUIDER, with the loss where a latent step ran: see "
            "why a concept vanished or leaked.",
            inputs=[
                io.Guider.Input("guider", tooltip="The LoRA-Composer GUIDER that sampled."),
                io.Latent.Input(
                    "samples", tooltip="SamplerCustomAdvanced's output (it makes this node run after the sampling)."
                ),
                io.String.Input(
                    "steps",
                    default="",
                    optional=True,
                    tooltip="Steps to show, 1-based ('1, 5, 10'); empty: four spread over the run.",
                ),  # fmt: skip
                io.Image.Input("image", optional=True, tooltip="Optional: the decoded image, to draw the maps on."),
            ],
            outputs=[io.Image.Output(display_name="maps", tooltip="A row per step, a column per concept.")],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, guider, samples, steps="", image=None) -> io.NodeOutput:
        if not isinstance(guider, LoRAComposerGuider):
            raise NodeError(cls.NAME, "guider must come from the LoRA-Composer Guider node.")
        state = guider.state
        recorded = sorted(s for s, r in state.history.items() if r.maps)
        if not recorded:
            raise NodeError(
                cls.NAME,
                "the guider has not sampled yet (or has no concepts). Connect SamplerCustomAdvanced's output to "
                "'samples' so this node runs after it.",
            )
        try:
            chosen = pick_steps(recorded, steps)
        except ValueError as e:
            raise NodeError(cls.NAME, str(e)) from None
        lat = samples["samples"]
        size = (int(lat.shape[-2]) * 8, int(lat.shape[-1]) * 8)
        first = state.history[recorded[0]].maps[0]
        masks = state.concept_masks_at(tuple(first.shape[-2:]))
        maps = draw_attention_maps(state.history, chosen, [c.label for c in state.concepts], masks, size, image)
        return io.NodeOutput(maps)
