"""What every node file shares: the category root, custom socket types, model-file lookup, errors."""

from __future__ import annotations

import os

from comfy_api.latest import io

CATEGORY_ROOT = "multi-concept"
CATEGORY_EDLORA = f"{CATEGORY_ROOT}/ED-LoRA"
CATEGORY_REGIONS = f"{CATEGORY_ROOT}/regions"

# A loaded concept: its prompt words, class word and source file (samplers.concepts.EDLoRAConcept).
EDLoRAConceptType = io.Custom("EDLORA_CONCEPT")

EDLORA_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


class NodeError(ValueError):
    """An error shown to the user: '<Node name>: what is wrong. What to do.'"""

    def __init__(self, node: str, message: str):
        super().__init__(f"{node}: {message}")


def model_folder_paths(folder: str) -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths(folder))


def list_model_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    import folder_paths

    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(suffixes)]


def missing_file_message(name: str, folder: str, what: str) -> str:
    places = ", ".join(model_folder_paths(folder)) or f"models/{folder}"
    return (
        f"{what} '{name}' was not found in models/{folder} (searched: {places}). "
        f"Put the file in that folder, then refresh the node list (press R) and pick it."
    )


def check_model_file(node: str, folder: str, name: str, what: str) -> bool | str:
    """For ``validate_inputs``: True, or ComfyUI's bare "value not in list" replaced by where the file goes."""
    import folder_paths

    if not name or folder_paths.get_full_path(folder, name) is None:
        return f"{node}: " + missing_file_message(name, folder, what)
    return True


def resolve_model_file(node: str, folder: str, name: str, what: str) -> str:
    import folder_paths

    if not name:
        raise NodeError(node, f"no {what} selected. Put one in models/{folder} and pick it.")
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        raise NodeError(node, missing_file_message(name, folder, what))
    return path
