"""Response-weighted concept mix: every concept's LoRA merged, weighted by how strongly the prompt names it."""

from __future__ import annotations

from comfy_api.latest import io

from ..samplers.edlora.model import EDLoRAApplyError
from ..samplers.fusion.response import DEFAULT_TEMPERATURE, MODES
from ..samplers.fusion.response_mix import ResponseMixError, response_mix
from ..samplers.mixofshow.plan import RegionalPlanError
from .common import CATEGORY_METHODS, TOKENIZER_ERRORS, ConceptStackType, NodeError, checked_inputs, encoding_error
from .inputs import prompt_input


class ResponseWeightedMix(io.ComfyNode):
    NAME = "Response-Weighted Concept Mix"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptResponseWeightedMix",
            display_name="Response-Weighted Concept Mix",
            category=CATEGORY_METHODS,
            description="Merges every concept's LoRA into the MODEL and CLIP, each weighted by the prompt's response "
            "to it: R = the highest cosine similarity between the concept's token embeddings (their mean) and the "
            "prompt's text-encoder outputs. Concepts the prompt names get most of the weight. Connect MODEL and "
            "CONDITIONING to a KSampler (positive); the table says each concept's R and weight.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The checkpoint's MODEL (SD1.x, SD2.x or SDXL; ED-LoRAs of the same family)."
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The checkpoint's CLIP. It measures the responses and, with the weighted text-encoder "
                    "LoRAs and every ED-LoRA's words, encodes the prompt.",
                ),
                ConceptStackType.Input(
                    "concepts",
                    tooltip="The concepts from the Concept Stack nodes (ED-LoRAs, and LoRAs with trigger words). "
                    "Region labels are ignored: every LoRA acts on the whole image.",
                ),
                prompt_input(
                    "prompt",
                    "The prompt. Name the concepts you want with their words (ED-LoRA words or LoRA trigger "
                    "words); it is also encoded for the CONDITIONING output.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default=MODES[0],
                    tooltip="How scores become weights. sum to one: w = max(R, 0) / sum of max(R, 0) (equal weights "
                    "when no score is above 0). softmax: w = softmax(R / temperature).",
                ),
                io.Float.Input(
                    "temperature",
                    default=DEFAULT_TEMPERATURE,
                    min=0.001,
                    max=10.0,
                    step=0.001,
                    tooltip="softmax mode only: small values give nearly all weight to the best-responding concept, "
                    "large values make the weights equal.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The MODEL with every UNet LoRA at strength x weight."),
                io.Clip.Output(
                    display_name="CLIP",
                    tooltip="The CLIP with every text-encoder LoRA at strength x weight and every ED-LoRA's words.",
                ),
                io.Conditioning.Output(
                    display_name="CONDITIONING", tooltip="The prompt encoded with that CLIP: KSampler's positive."
                ),
                io.String.Output(display_name="weights", tooltip="Per concept: its words, its response R and weight."),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, concepts, prompt, mode=MODES[0], temperature=DEFAULT_TEMPERATURE) -> io.NodeOutput:
        if concepts is None or not len(concepts):
            raise NodeError(cls.NAME, "the concept stack is empty. Add concepts with the Concept Stack nodes.")
        if not prompt.strip():
            raise NodeError(cls.NAME, "the prompt is empty. Write the prompt, naming the concepts by their words.")
        if mode not in MODES:
            raise NodeError(cls.NAME, f"mode is {mode!r}; choose one of {', '.join(MODES)}.")
        try:
            mix = response_mix(model, clip, concepts, prompt, mode, float(temperature))
        except (ResponseMixError, EDLoRAApplyError, RegionalPlanError) as e:
            raise NodeError(cls.NAME, str(e)) from None
        except TOKENIZER_ERRORS as e:
            raise encoding_error(cls.NAME, e, "the prompt") from None
        return io.NodeOutput(mix.model, mix.clip, mix.conditioning, mix.table)
