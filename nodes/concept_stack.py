"""Concept stack nodes: each appends one concept (ED-LoRA or ordinary LoRA) to an optional incoming stack."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..formats.edlora import EDLoRAFileError, validate_concept_words
from ..formats.weights import CheckpointFileError
from ..samplers.concept_stack import Concept, ConceptStack
from ..samplers.concept_stack.files import load_edlora, load_lora
from ..samplers.concept_stack.stack import DEFAULT_STRENGTHS
from .common import (
    CATEGORY_CONCEPTS,
    ConceptStackType,
    EDLoRAConceptType,
    NodeError,
    checked_inputs,
    guarded_validation,
)
from .inputs import EDLORA_FILES, LORA_FILES, strength_input

log = logging.getLogger("multiconcept")

STACK_TOOLTIP = "Optional: the concepts added so far. Chain these nodes to build the concepts of one picture."
LABEL_TOOLTIP = (
    "The label of the region this concept belongs to (the 'label' of a box in the Regions node). Method nodes "
    "place the concept in the region with this label. Empty: the concept is not placed in a region."
)
CLASS_TOOLTIP = "The concept's class ('man', 'dog', 'chair'), used where a method needs a class-only prompt."


def _stack_outputs():
    return [
        ConceptStackType.Output(display_name="concepts", tooltip="The incoming concepts plus this one."),
        io.String.Output(display_name="words", tooltip="What to type in prompts for this concept (may be empty)."),
    ]


def _file_inputs(file_input, strength: float, unet_tooltip: str, text_tooltip: str, words_input) -> list:
    """The inputs of a node that adds a concept from a file, in the order saved workflows rely on: the file, the
    strengths of its UNet and text-encoder parts, its region label, the incoming stack, its words, its class word."""
    return [
        file_input,
        strength_input("strength_unet", strength, unet_tooltip),
        strength_input("strength_text", strength, text_tooltip),
        io.String.Input("region_label", default="", tooltip=LABEL_TOOLTIP),
        ConceptStackType.Input("concepts", optional=True, tooltip=STACK_TOOLTIP),
        words_input,
        io.String.Input("class_word", default="", optional=True, tooltip=CLASS_TOOLTIP),
    ]


def _stacked(stack, concept: Concept) -> io.NodeOutput:
    """The node's outputs: the incoming stack plus ``concept``, and the words it got (renamed if an earlier concept
    of the stack uses them)."""
    new = (stack if stack is not None else ConceptStack()).with_concept(concept)
    return io.NodeOutput(new, new.concepts[-1].prompt_words)


class ConceptStackEDLoRA(io.ComfyNode):
    NAME = "Concept Stack: ED-LoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptStackEDLoRA",
            display_name="Concept Stack: ED-LoRA",
            category=CATEGORY_CONCEPTS,
            description="Adds one ED-LoRA concept (SD1.5: Mix-of-Show .pth; SDXL: Concept Conductor's .pth; or this "
            "pack's .safetensors) to a concept stack, with its region label. Nothing is applied to a model here: the "
            "method node that reads the stack decides where and how the concept acts.",
            inputs=_file_inputs(
                EDLORA_FILES.input("edlora_name", "ED-LoRA file from models/loras (read safely: tensors only)."),
                DEFAULT_STRENGTHS["edlora"],
                "Scale of the concept's UNet LoRA (Mix-of-Show's alpha; 0.6-0.7 is typical).",
                "Scale of the concept's text-encoder LoRA, used when its region prompt is encoded.",
                io.String.Input(
                    "concept_words", default="", optional=True,
                    tooltip="Optional new prompt words for the concept (as many as the file has, e.g. '<alice1> "
                    "<alice2>'). Words an earlier concept of the stack uses are renamed (see 'words').",
                ),
            ),
            outputs=_stack_outputs(),
        )  # fmt: skip

    @classmethod
    @guarded_validation(NAME, "edlora_name", "Pick an ED-LoRA file from models/loras.")
    def validate_inputs(cls, edlora_name):
        return EDLORA_FILES.check(cls.NAME, edlora_name)

    @classmethod
    @checked_inputs(NAME)
    def execute(
        cls, edlora_name, strength_unet, strength_text, region_label, concepts=None, concept_words="", class_word=""
    ) -> io.NodeOutput:
        path = EDLORA_FILES.path(cls.NAME, edlora_name)
        try:
            weights = load_edlora(path)
            if concept_words.strip():
                weights = weights.with_words(tuple(concept_words.split()))
        except EDLoRAFileError as e:
            raise NodeError(cls.NAME, str(e)) from None
        concept = Concept(
            uid="",
            kind="edlora",
            source=edlora_name,
            words=weights.words,
            class_word=class_word.strip() or weights.class_word,
            label=region_label.strip(),
            strength_unet=float(strength_unet),
            strength_text=float(strength_text),
            adapter=weights,
        )
        return _stacked(concepts, concept)


class ConceptStackLoRA(io.ComfyNode):
    NAME = "Concept Stack: LoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptStackLoRA",
            display_name="Concept Stack: LoRA",
            category=CATEGORY_CONCEPTS,
            description="Adds one ordinary LoRA (kohya, diffusers, peft or LoCon naming: whatever ComfyUI's Load "
            "LoRA reads) to a concept stack, with its trigger words and region label. Nothing is applied to a "
            "model here: the method node that reads the stack decides where the LoRA acts.",
            inputs=_file_inputs(
                LORA_FILES.input(
                    "lora_name", "LoRA file from models/loras (.safetensors, or .pt/.pth read safely: tensors only)."
                ),
                DEFAULT_STRENGTHS["lora"],
                "Scale of the LoRA's UNet part (as strength_model in Load LoRA).",
                "Scale of the LoRA's text-encoder part (as strength_clip in Load LoRA), used when "
                "its region prompt is encoded.",
                io.String.Input(
                    "trigger_words", default="", optional=True,
                    tooltip="Optional: the LoRA's trigger words, separated by spaces (what its trainer used).",
                ),
            ),
            outputs=_stack_outputs(),
        )  # fmt: skip

    @classmethod
    @guarded_validation(NAME, "lora_name", "Pick a LoRA file from models/loras.")
    def validate_inputs(cls, lora_name):
        return LORA_FILES.check(cls.NAME, lora_name)

    @classmethod
    @checked_inputs(NAME)
    def execute(
        cls, lora_name, strength_unet, strength_text, region_label, concepts=None, trigger_words="", class_word=""
    ) -> io.NodeOutput:
        path = LORA_FILES.path(cls.NAME, lora_name)
        try:
            lora = load_lora(path)
        except CheckpointFileError as e:
            raise NodeError(cls.NAME, str(e)) from None
        words = tuple(trigger_words.split())
        concept = Concept(
            uid="",
            kind="lora",
            source=lora_name,
            words=words,
            class_word=class_word.strip(),
            label=region_label.strip(),
            strength_unet=float(strength_unet),
            strength_text=float(strength_text),
            adapter=lora,
        )
        return _stacked(concepts, concept)


class ConceptStackLoaded(io.ComfyNode):
    NAME = "Concept Stack: Loaded ED-LoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptStackLoaded",
            display_name="Concept Stack: Loaded ED-LoRA",
            category=CATEGORY_CONCEPTS,
            description="Adds the concept of an ED-LoRA Loader (its 'concept' output) to a concept stack, under "
            "the words the loader gave it. Feed method nodes the checkpoint's MODEL, not the loader's: the "
            "loader merged the concept's UNet LoRA into its MODEL everywhere.",
            inputs=[
                EDLoRAConceptType.Input("concept", tooltip="The 'concept' output of an ED-LoRA Loader."),
                io.String.Input("region_label", default="", tooltip=LABEL_TOOLTIP),
                ConceptStackType.Input("concepts", optional=True, tooltip=STACK_TOOLTIP),
            ],
            outputs=_stack_outputs(),
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, concept, region_label, concepts=None) -> io.NodeOutput:
        weights = getattr(concept, "weights", None)
        if weights is None:
            raise NodeError(
                cls.NAME, "this concept carries no weights; connect the 'concept' output of ED-LoRA Loader."
            )
        try:
            validate_concept_words(concept.words)
        except EDLoRAFileError as e:
            raise NodeError(cls.NAME, str(e)) from None
        item = Concept(
            uid="",
            kind="edlora",
            source=concept.file,
            words=tuple(concept.words),
            class_word=concept.class_word,
            label=region_label.strip(),
            strength_unet=float(concept.strength_unet),
            strength_text=float(concept.strength_text),
            adapter=weights,
            renamed_from=tuple(concept.renamed_from),
            loader_uid=concept.uid,
        )
        return _stacked(concepts, item)
