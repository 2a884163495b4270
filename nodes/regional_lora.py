"""Regional LoRA: each concept's UNet LoRA acts only inside its region, all in the one UNet pass of a step."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..samplers.concept_stack import ConceptStackError
from ..samplers.concept_stack.placement import concept_masks, labelled_for_preview
from ..samplers.edlora.model import MERGED_KEY
from ..samplers.regions.preview import draw_regions
from ..samplers.scoped_lora.adapters import ScopedLoRAError, resolve_concept
from ..samplers.scoped_lora.runtime import Scope, ScopedConcept, install_scoped_lora
from .common import CATEGORY_CONCEPTS, ConceptStackType, NodeError, checked_inputs
from .regions import RegionsType

log = logging.getLogger("multiconcept")


class RegionalLoRA(io.ComfyNode):
    NAME = "Regional LoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptRegionalLoRA",
            display_name="Regional LoRA",
            category=CATEGORY_CONCEPTS,
            description="LoRA A on the left, LoRA B on the right: each concept's UNet LoRA acts only inside the "
            "region with its label, unmerged, in the same single UNet pass per step (no extra pass per LoRA). "
            "Prompts stay global; connect the output MODEL to any sampler.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The checkpoint's MODEL (SD1.x, SD2.x or SDXL). Not an ED-LoRA Loader's MODEL: that one "
                    "already has its concept merged everywhere.",
                ),
                ConceptStackType.Input(
                    "concepts", tooltip="From the Concept Stack nodes; each concept's region_label names its box."
                ),
                RegionsType.Input(
                    "regions",
                    tooltip="From the Regions node (or SAM Masks from Regions, for object masks). Draw the regions "
                    "at the size you sample (same aspect ratio).",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with every concept scoped to its region."),
                io.Image.Output(display_name="preview", tooltip="Which concept goes where."),
            ],
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, concepts, regions) -> io.NodeOutput:
        try:
            placed = concept_masks(concepts, regions)
        except ConceptStackError as e:
            raise NodeError(cls.NAME, str(e)) from None
        merged = set(model.model_options.get("transformer_options", {}).get(MERGED_KEY, ()))
        clone = model.clone()
        items = []
        for concept, mask in placed:
            if concept.loader_uid and concept.loader_uid in merged:
                raise NodeError(
                    cls.NAME,
                    f"the MODEL already has {concept.source} merged everywhere (it comes from that ED-LoRA Loader). "
                    "Connect the checkpoint's MODEL instead, or set the loader's strength_unet to 0.",
                )
            try:
                resolved = resolve_concept(clone, concept)
            except ScopedLoRAError as e:
                raise NodeError(cls.NAME, str(e)) from None
            if resolved.ignored_text_keys:
                log.info(
                    "[multi-concept] %s: %s also has %d text-encoder LoRA layers; prompts are global here, so "
                    "they are not applied.",
                    cls.NAME,
                    concept.source,
                    resolved.ignored_text_keys,
                )
            if not resolved.factors:
                log.warning("[multi-concept] %s: %s changes no UNet layer (strength 0?)", cls.NAME, concept.source)
            items.append(ScopedConcept(resolved, Scope(mask=mask)))
        try:
            install_scoped_lora(clone, items, cls.NAME)
        except ScopedLoRAError as e:
            raise NodeError(cls.NAME, str(e)) from None
        preview = draw_regions(labelled_for_preview(concepts, regions))
        return io.NodeOutput(clone, preview)
