"""ED-LoRA Convert: turns an official Mix-of-Show .pth into this pack's .safetensors, next to it."""

from __future__ import annotations

import os
from dataclasses import replace

from comfy_api.latest import io, ui

from ..formats.edlora import EDLoRAFileError, default_safetensors_name, read_edlora, write_edlora_safetensors
from .common import CATEGORY_EDLORA, PICKLE_SUFFIXES, NodeError, checked_inputs, guarded_validation
from .inputs import ModelFiles
from .validation import check_output_name

NODE_NAME = "ED-LoRA Convert"
PICKLED_EDLORA_FILES = ModelFiles("loras", PICKLE_SUFFIXES, "ED-LoRA file")


class EDLoRAConvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptEDLoRAConvert",
            display_name="ED-LoRA Convert to safetensors",
            category=CATEGORY_EDLORA,
            description=(
                "Reads an official Mix-of-Show ED-LoRA .pth safely (tensors only; files that need pickle code are "
                "refused) and writes the same concept as .safetensors in the same models/loras folder. Existing "
                "files are never overwritten. Same as: python -m formats.convert_edlora <file>."
            ),
            inputs=[
                PICKLED_EDLORA_FILES.input("edlora_name", "The .pth/.pt/.bin ED-LoRA in models/loras to convert."),
                io.String.Input(
                    "output_name",
                    default="",
                    tooltip="File name for the result (.safetensors is added). Empty: the source name with "
                    ".safetensors. Conversion stops with an error rather than replace an existing file.",
                ),
                io.String.Input(
                    "concept_words",
                    default="",
                    optional=True,
                    tooltip="Optional: store the concept under new prompt words, e.g. '<alice1> <alice2>'.",
                ),
                io.String.Input(
                    "class_word",
                    default="",
                    optional=True,
                    tooltip="Optional: the concept's class ('cat', 'woman'), stored in the file's metadata.",
                ),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the .safetensors file was written.")],
            is_output_node=True,
        )

    @classmethod
    @guarded_validation(NODE_NAME, "edlora_name", "Pick a .pth ED-LoRA file from models/loras.")
    def validate_inputs(cls, edlora_name):
        return PICKLED_EDLORA_FILES.check(NODE_NAME, edlora_name)

    @classmethod
    @checked_inputs(NODE_NAME)
    def execute(cls, edlora_name, output_name, concept_words="", class_word="") -> io.NodeOutput:
        src = PICKLED_EDLORA_FILES.path(NODE_NAME, edlora_name)
        name = output_name.strip() or default_safetensors_name(src)
        name = check_output_name(NODE_NAME, "output_name", name)
        if not name.lower().endswith(".safetensors"):
            name += ".safetensors"
        dst = os.path.join(os.path.dirname(src), name)
        try:
            weights = read_edlora(src)
            if concept_words.strip():
                weights = weights.with_words(concept_words.split())
            if class_word.strip():
                weights = replace(weights, class_word=class_word.strip())
            write_edlora_safetensors(weights, dst)
        except EDLoRAFileError as e:
            raise NodeError(NODE_NAME, str(e)) from None
        except OSError as e:
            raise NodeError(
                NODE_NAME, f"could not write {dst}: {e.strerror or e}. Check the folder's free space and permissions."
            ) from None
        text = f"Wrote {dst}\nwords: {' '.join(weights.words)}"
        return io.NodeOutput(dst, ui=ui.PreviewText(text))
