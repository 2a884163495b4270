"""What every node file shares: the category root, custom socket types, model-file lookup, errors."""

from __future__ import annotations

from comfy_api.latest import io

# The shared checks live in validation.py; re-exported here because every node file imports from common.
from .validation import (  # noqa: F401
    NodeError,
    check_model_file,
    checked_inputs,
    guarded_validation,
    missing_file_message,
    resolve_model_file,
)

CATEGORY_ROOT = "multi-concept"
CATEGORY_EDLORA = f"{CATEGORY_ROOT}/ED-LoRA"
CATEGORY_REGIONS = f"{CATEGORY_ROOT}/regions"

# A loaded concept: its prompt words, class word and source file (samplers.edlora.vocabulary.EDLoRAConcept).
EDLoRAConceptType = io.Custom("EDLORA_CONCEPT")

# The concepts of one picture (samplers.concept_stack.ConceptStack), read by every composition method.
ConceptStackType = io.Custom("CONCEPT_STACK")
CATEGORY_CONCEPTS = f"{CATEGORY_ROOT}/concepts"

EDLORA_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".sft")
LORA_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


def model_folder_paths(folder: str) -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths(folder))


def list_model_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    import folder_paths

    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(suffixes)]
