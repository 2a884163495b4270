"""Node classes: schema, tooltips, validation; the work happens in samplers/ and training/."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .concept_conductor import ConceptConductor, ConceptConductorGuider
from .concept_stack import ConceptStackEDLoRA, ConceptStackLoaded, ConceptStackLoRA
from .edlora_convert import EDLoRAConvert
from .edlora_loader import EDLoRALoader
from .evaluation import EvaluationReferences, OpenClipLoader, ScoreConcepts
from .fusion import FuseConcepts, LoadFusedConcepts
from .lora_composer import LoRAComposer, LoRAComposerAttention
from .mixofshow_regional import MixOfShowRegional
from .omg import OMG, OMGGuiderNode, OMGModelConcept, OMGStage1
from .regional_lora import RegionalLoRA
from .regions import Regions
from .response_mix import ResponseWeightedMix
from .sam import SAMLoader, SAMMasks
from .training import TrainEDLoRA

NODE_CLASSES: list[type[io.ComfyNode]] = [
    EDLoRALoader,
    EDLoRAConvert,
    Regions,
    SAMLoader,
    SAMMasks,
    ConceptStackEDLoRA,
    ConceptStackLoRA,
    ConceptStackLoaded,
    RegionalLoRA,
    MixOfShowRegional,
    LoRAComposer,
    LoRAComposerAttention,
    OMG,
    OMGStage1,
    OMGGuiderNode,
    OMGModelConcept,
    TrainEDLoRA,
    FuseConcepts,
    LoadFusedConcepts,
    ResponseWeightedMix,
    ConceptConductor,
    ConceptConductorGuider,
    OpenClipLoader,
    EvaluationReferences,
    ScoreConcepts,
]


class MultiConceptExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
