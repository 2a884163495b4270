"""What every node file shares: the categories, custom socket types, model-file lookup and model folders, where
new files are saved, errors, progress.

The inputs several nodes declare alike are in inputs.py; what the sampler nodes share at run time is in
sampling.py."""

from __future__ import annotations

import os

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
CATEGORY_METHODS = f"{CATEGORY_ROOT}/methods"

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


def loras_dir() -> str:
    """The first models/loras folder: where the pack saves what it makes (trained and fused concepts)."""
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def free_path(folder: str, stem: str, suffix: str, keep: str | None = None) -> str:
    """``folder/stem+suffix``, or ``stem_2``, ``stem_3``... — never a file that exists (unless it is ``keep``)."""
    candidate, n = os.path.join(folder, stem + suffix), 2
    while os.path.lexists(candidate) and os.path.abspath(candidate) != (os.path.abspath(keep) if keep else None):
        candidate = os.path.join(folder, f"{stem}_{n}{suffix}")
        n += 1
    return candidate


def register_model_folder(folder: str) -> None:
    """Make models/<folder> a model folder ComfyUI lists, unless it is one already (other packs may add it)."""
    import folder_paths

    if folder not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.models_dir, folder))


# What ComfyUI's tokenizer raises on odd prompt text.
TOKENIZER_ERRORS = (ValueError, RecursionError, IndexError, KeyError, TypeError)


def encoding_error(node: str, error: Exception, what: str) -> NodeError:
    """The error for prompt text the tokenizer failed on; ``what`` names it ('the prompt', 'the prompts')."""
    return NodeError(node, f"{what} could not be encoded ({type(error).__name__}: {str(error)[:200]}). Check {what}.")


class NodeProgress:
    """The running node's progress bar, with a line of text on the node where a server shows it."""

    def __init__(self, total: int):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.node_id = _executing_node_id()

    def update(self, done: int, total: int, text: str | None = None, preview=None) -> None:
        self.bar.update_absolute(done, total, preview)
        if text is not None:
            _progress_text(self.node_id, text)


def show_text(text: str) -> None:
    """A line of text on the running node (where a server shows it), e.g. a warning the user should see."""
    _progress_text(_executing_node_id(), text)


def _executing_node_id():
    try:
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        return ctx.node_id if ctx is not None else None
    except Exception:  # noqa: BLE001 - progress text is a nicety
        return None


def _progress_text(node_id, text: str) -> None:
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - no server (tests, CLI): nothing to show it on
        pass
