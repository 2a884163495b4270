"""Inputs that several nodes declare alike: seed, steps, cfg, sampler and scheduler, image size, prompt boxes,
adapter strengths, and model files picked from a models/ folder.

Each factory makes one input with its name, type, range and options written here once; the caller gives what
differs between nodes (the tooltip, a default), word for word. Saved workflows store widget values by input
order and read defaults, ranges and options from the schema, so a change here changes every node using it.
"""

from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from .common import EDLORA_SUFFIXES, LORA_SUFFIXES, list_model_files
from .validation import check_model_file, resolve_model_file

SEED_MAX = 0xFFFFFFFFFFFFFFFF


# ------------------------------------------------------------------------------------------ sampling


def seed_input(name: str, tooltip: str, control_after_generate: bool = True) -> io.Int.Input:
    """A noise seed with KSampler's range (0 to 2^64 - 1); the widget's after-run control is on by default."""
    return io.Int.Input(
        name, default=0, min=0, max=SEED_MAX, control_after_generate=control_after_generate, tooltip=tooltip
    )


def sampling_steps_input(default: int, tooltip: str, minimum: int = 1, maximum: int = 1000) -> io.Int.Input:
    """The number of sampling steps (input ``steps``)."""
    return io.Int.Input("steps", default=default, min=minimum, max=maximum, tooltip=tooltip)


def cfg_input(default: float, tooltip: str, rounding: float | None = 0.01) -> io.Float.Input:
    """Classifier-free guidance (input ``cfg``): 0 to 100 in steps of 0.1, rounded as KSampler's unless
    ``rounding`` is None. ``default`` is the method's official value; the tooltip says so where it has one."""
    return io.Float.Input("cfg", default=default, min=0.0, max=100.0, step=0.1, round=rounding, tooltip=tooltip)


def sampler_name_input(tooltip: str) -> io.Combo.Input:
    """ComfyUI's samplers (input ``sampler_name``), euler by default."""
    import comfy.samplers

    return io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip=tooltip)


def scheduler_input(tooltip: str = "The noise schedule.") -> io.Combo.Input:
    """ComfyUI's noise schedules (input ``scheduler``), normal by default."""
    import comfy.samplers

    return io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip=tooltip)


def schedule_share_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    """An optional point of the schedule, as a share of the steps: 0 to 1 in steps of 0.01."""
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, optional=True, tooltip=tooltip)


def image_size_input(name: str, tooltip: str) -> io.Int.Input:
    """An image width or height in pixels: 64 to 8192 in steps of 8, 512 by default."""
    return io.Int.Input(name, default=512, min=64, max=8192, step=8, tooltip=tooltip)


# ------------------------------------------------------------------------------------------- prompts


def prompt_input(name: str, tooltip: str, optional: bool = False) -> io.String.Input:
    """A multi-line prompt box, empty by default."""
    return io.String.Input(name, multiline=True, default="", optional=optional, tooltip=tooltip)


# ------------------------------------------------------------------------------------------ adapters


def scene_conditioning_inputs(where: str) -> list[io.Conditioning.Input]:
    """The optional ``positive_conditioning`` / ``negative_conditioning`` pair a method node samples its scene with
    instead of encoding its prompt strings, so ControlNet, T2I-Adapter and any other stock conditioning node can
    reach it; ``where`` says where the method reads it ('stage 1 and the scene's branch of stage 2')."""
    how = (
        "Made with stock nodes from this checkpoint's CLIP (CLIP Text Encode, then Apply ControlNet, T2I-Adapter, "
        "GLIGEN, style model ...): used instead of encoding the text, in "
    )
    return [
        io.Conditioning.Input(
            "positive_conditioning",
            optional=True,
            tooltip=f"Optional: the scene prompt's conditioning. {how}{where}. The text widget is still read for "
            "the words (class words, each concept's prompt); the node warns when the two differ.",
        ),
        io.Conditioning.Input(
            "negative_conditioning",
            optional=True,
            tooltip=f"Optional: the negative prompt's conditioning. {how}{where}.",
        ),
    ]


def strength_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    """The scale of an adapter's UNet or text-encoder part: -4 to 4 in steps of 0.01."""
    return io.Float.Input(name, default=default, min=-4.0, max=4.0, step=0.01, tooltip=tooltip)


# --------------------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class ModelFiles:
    """One kind of file in one models/ folder, picked in a combo: the combo input, the check for
    ``validate_inputs`` and the file's full path at run time, whose messages name the kind and the folder."""

    folder: str  # the folder_paths name, e.g. "loras"
    suffixes: tuple[str, ...]  # the file name endings listed in the combo
    what: str  # how messages name one file, e.g. "ED-LoRA file"

    def input(self, name: str, tooltip: str) -> io.Combo.Input:
        """The combo of the folder's files with these suffixes (listed when the node list is built)."""
        return io.Combo.Input(name, options=list_model_files(self.folder, self.suffixes), tooltip=tooltip)

    def check(self, node: str, name) -> bool | str:
        """For ``validate_inputs``: True, or a message naming the file and the folder it belongs in."""
        return check_model_file(node, self.folder, name, self.what)

    def path(self, node: str, name) -> str:
        """The picked file's full path, or a NodeError naming the file and the folder."""
        return resolve_model_file(node, self.folder, name, self.what)


EDLORA_FILES = ModelFiles("loras", EDLORA_SUFFIXES, "ED-LoRA file")
LORA_FILES = ModelFiles("loras", LORA_SUFFIXES, "LoRA file")
