"""ED-LoRA Loader: applies one Mix-of-Show concept (token embeddings + LoRA) to a MODEL and CLIP (SD1.5 or SDXL)."""

from __future__ import annotations

from comfy_api.latest import io

from ..formats.edlora import EDLoRAFileError
from ..samplers.concept_stack.files import load_edlora  # parsed once per file version: chained loaders reuse it
from ..samplers.edlora.model import EDLoRAApplyError, apply_edlora
from .common import CATEGORY_EDLORA, EDLoRAConceptType, NodeError, checked_inputs, guarded_validation
from .inputs import EDLORA_FILES, strength_input

NODE_NAME = "ED-LoRA Loader"


class EDLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptEDLoRALoader",
            display_name="ED-LoRA Loader (Mix-of-Show)",
            category=CATEGORY_EDLORA,
            description=(
                "Adds one personalized concept (an ED-LoRA from Mix-of-Show for SD1.5, from Concept Conductor's "
                "trainer for SDXL, or one made by this pack) to the MODEL and CLIP. Type the concept words (e.g. "
                "<cat1> <cat2>) into an ordinary CLIP Text Encode fed by this CLIP and sample with any stock sampler: "
                "each cross-attention layer then sees the concept's own token for that layer. Chain several loaders "
                "for several concepts."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The diffusion model to add the concept's UNet LoRA to: SD1.5-family for an SD1.5 "
                    "ED-LoRA (16 layer tokens), SDXL for an SDXL ED-LoRA (70 layer tokens).",
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The CLIP of the same checkpoint (SDXL: CLIP-L and CLIP-G); it learns the concept words.",
                ),
                EDLORA_FILES.input(
                    "edlora_name",
                    "ED-LoRA file from models/loras: an official Mix-of-Show .pth (SD1.5), a Concept "
                    "Conductor SDXL .pth (both loaded safely, tensors only) or a .safetensors made by this pack.",
                ),
                strength_input(
                    "strength_unet",
                    0.7,
                    "Scale of the UNet LoRA (Mix-of-Show's inference alpha; 0.6-0.7 is typical). "
                    "0 leaves the UNet weights untouched.",
                ),
                strength_input(
                    "strength_text",
                    0.7,
                    "Scale of the text-encoder LoRA (Mix-of-Show's inference alpha; on SDXL both CLIP-L "
                    "and CLIP-G). 0 leaves the text encoder weights untouched; the concept words still work.",
                ),
                io.String.Input(
                    "concept_words",
                    default="",
                    optional=True,
                    tooltip="Optional: new prompt words for this concept, as many as the file has, separated by "
                    "spaces (e.g. '<alice1> <alice2>'). Empty keeps the file's words; words already used by an "
                    "earlier loader are renamed automatically (see the 'words' output).",
                ),
                io.String.Input(
                    "class_word",
                    default="",
                    optional=True,
                    tooltip="Optional: the concept's class ('cat', 'man', 'chair'), used by region and OMG nodes "
                    "when they need a class-only prompt. Empty uses the file's metadata, if any.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL", tooltip="The model with the concept's UNet LoRA and layer-wise routing."
                ),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP that understands the concept words."),
                EDLoRAConceptType.Output(
                    display_name="concept", tooltip="The concept: its words, class word and file, for region/OMG nodes."
                ),
                io.String.Output(display_name="words", tooltip="The words to type in prompts for this concept."),
            ],
        )

    @classmethod
    @guarded_validation(NODE_NAME, "edlora_name", "Pick an ED-LoRA file from models/loras.")
    def validate_inputs(cls, edlora_name):
        return EDLORA_FILES.check(NODE_NAME, edlora_name)

    @classmethod
    @checked_inputs(NODE_NAME)
    def execute(
        cls, model, clip, edlora_name, strength_unet, strength_text, concept_words="", class_word=""
    ) -> io.NodeOutput:
        path = EDLORA_FILES.path(NODE_NAME, edlora_name)
        try:
            weights = load_edlora(path)
            words = tuple(concept_words.split()) if concept_words and concept_words.strip() else None
            new_model, new_clip, concept = apply_edlora(
                model,
                clip,
                weights,
                edlora_name,
                strength_unet,
                strength_text,
                words=words,
                class_word=class_word.strip(),
            )
        except (EDLoRAFileError, EDLoRAApplyError) as e:
            raise NodeError(NODE_NAME, str(e)) from None
        return io.NodeOutput(new_model, new_clip, concept, concept.prompt_words)
