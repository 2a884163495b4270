"""Concept fusion nodes: fuse a concept stack into one MODEL and CLIP (Mix-of-Show gradient fusion), and load a
fused file back."""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io, ui

from ..formats.fused import FusedFileError, read_fused, write_fused
from ..samplers.edlora.model import EDLoRAApplyError
from ..samplers.fusion.fuse import (
    DEFAULT_TEMPLATES,
    FUSION_STRENGTHS,
    SAVE_DTYPES,
    FusionError,
    FusionSettings,
    apply_fused,
    base_mismatch,
    fuse_stack,
)
from ..samplers.fusion.report import residual_plot, residual_table, summary
from ..samplers.fusion.solvers import SOLVERS
from ..samplers.mixofshow.plan import RegionalPlanError
from ..samplers.scoped_lora.adapters import ScopedLoRAError
from .common import (
    CATEGORY_CONCEPTS,
    ConceptStackType,
    NodeError,
    NodeProgress,
    checked_inputs,
    free_path,
    guarded_validation,
    loras_dir,
)
from .inputs import ModelFiles
from .validation import check_output_name

log = logging.getLogger("multiconcept")

FUSE_NAME = "Fuse Concepts"
LOAD_NAME = "Load Fused Concepts"
FUSED_SUFFIXES = (".safetensors", ".sft")
FUSED_FILES = ModelFiles("loras", FUSED_SUFFIXES, "fused-concepts file")
DEFAULT_TEMPLATE_TEXT = "\n".join(DEFAULT_TEMPLATES)


def _outputs():
    return [
        io.Model.Output(display_name="MODEL", tooltip="The MODEL with every concept fused into its weights."),
        io.Clip.Output(
            display_name="CLIP", tooltip="The CLIP with the fused text encoder; it knows every concept's words."
        ),
        ConceptStackType.Output(
            display_name="concepts",
            tooltip="The fused concepts (words, class words, region labels) for Mix-of-Show Regional or "
            "LoRA-Composer with this MODEL and CLIP; their LoRA is already in the weights.",
        ),
    ]


class FuseConcepts(io.ComfyNode):
    NAME = FUSE_NAME

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptFuseConcepts",
            display_name="Fuse Concepts (gradient fusion)",
            category=CATEGORY_CONCEPTS,
            description="Mix-of-Show gradient fusion: one MODEL and CLIP whose every layer reproduces each concept's "
            "LoRA on that concept's own activations, instead of summing LoRAs that interfere. Records each concept's "
            "layer inputs (prompts, then a short sampling run), solves every layer, saves the result under "
            "models/loras and reports per-layer residuals. Feed the outputs to Mix-of-Show Regional Sampling.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.5 or SDXL) the concepts were trained for."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP."),
                ConceptStackType.Input(
                    "concepts",
                    tooltip="Two or more concepts from the Concept Stack nodes (ED-LoRAs or LoRAs); their words must "
                    "differ. Region labels are kept for the regional nodes.",
                ),
                io.Combo.Input(
                    "solver",
                    options=list(SOLVERS),
                    default=SOLVERS[0],
                    tooltip="closed form: each layer's least-squares optimum in one solve (fast, exact). L-BFGS: the "
                    "original iterative procedure (500 / 50 iterations per layer), for reproducing the paper.",
                ),
                io.String.Input(
                    "save_name",
                    default="fused_concepts",
                    tooltip="File name for the fused result under models/loras (.safetensors is added; an existing "
                    "file is never replaced: a number is appended). Load it again with Load Fused Concepts.",
                ),
                io.Int.Input(
                    "sample_steps", default=20, min=1, max=200,
                    tooltip="Steps of each concept's recording run (the UNet layers' inputs); the original uses 20.",
                ),
                io.Int.Input(
                    "sample_size", default=512, min=64, max=2048, step=64,
                    tooltip="Width and height of the recording runs: the checkpoint's usual size (512 for SD1.5, "
                    "1024 for SDXL).",
                ),
                io.Int.Input(
                    "record_seed", default=0, min=0, max=2**31 - 1,
                    tooltip="Noise seed of the recording runs (fixed, so the fusion is cached and repeatable).",
                ),
                io.String.Input(
                    "prompt_templates", multiline=True, default=DEFAULT_TEMPLATE_TEXT, optional=True,
                    tooltip="One prompt per line, {} standing for the concept's words: the prompts each concept's "
                    "text-encoder and cross-attention inputs are recorded from (the first also drives the sampling "
                    "run). The original: 'photo of a {}' and '{}'.",
                ),
                io.Combo.Input(
                    "save_precision", options=list(SAVE_DTYPES), default="fp16", optional=True,
                    tooltip="Precision of the saved weight differences (fp16 halves the file; the MODEL output uses "
                    "exactly what is saved).",
                ),
                io.Combo.Input(
                    "strengths", options=list(FUSION_STRENGTHS), default=FUSION_STRENGTHS[0], optional=True,
                    tooltip="How strongly each concept counts. 1.0, as the official fusion: its whole LoRA, as the "
                    "official Mix-of-Show fusion merges every concept, wherever a Concept Stack node's strength is "
                    "left at its default (a strength you changed is kept). The stack's strengths: each concept's "
                    "strength_unet / strength_text as set.",
                ),
            ],
            outputs=_outputs() + [
                io.Image.Output(display_name="residuals", tooltip="Per-layer relative error of each concept, fused "
                                "(solid) vs the plain sum of LoRAs (faint)."),  # fmt: skip
                io.String.Output(display_name="report", tooltip="The per-layer residual table and the saved file."),
            ],
            is_output_node=True,
        )  # fmt: skip

    @classmethod
    @checked_inputs(FUSE_NAME)
    def execute(cls, model, clip, concepts, solver, save_name, sample_steps, sample_size, record_seed,
                prompt_templates=DEFAULT_TEMPLATE_TEXT, save_precision="fp16",
                strengths=FUSION_STRENGTHS[0]) -> io.NodeOutput:  # fmt: skip
        stem = check_output_name(FUSE_NAME, "save_name", save_name)
        if stem.lower().endswith(FUSED_SUFFIXES):
            stem = os.path.splitext(stem)[0]
        templates = tuple(line.strip() for line in (prompt_templates or "").splitlines() if line.strip())
        if not templates:
            raise NodeError(FUSE_NAME, "prompt_templates is empty; give at least one prompt such as 'photo of a {}'.")
        if not all("{}" in t for t in templates):
            bad = next(t for t in templates if "{}" not in t)
            raise NodeError(FUSE_NAME, f"prompt template '{bad[:60]}' has no {{}} where the concept's words go.")
        if solver not in SOLVERS:
            raise NodeError(FUSE_NAME, f"solver is {solver!r}; choose one of {', '.join(SOLVERS)}.")
        if save_precision not in SAVE_DTYPES:
            raise NodeError(FUSE_NAME, f"save_precision is {save_precision!r}; choose one of {', '.join(SAVE_DTYPES)}.")
        if sample_size % 8:
            raise NodeError(FUSE_NAME, f"sample_size {sample_size} is not a multiple of 8.")
        settings = FusionSettings(solver=solver, templates=templates, steps=sample_steps, width=sample_size,
                                  height=sample_size, seed=record_seed, save_dtype=save_precision,
                                  strengths=strengths)  # fmt: skip
        bar = NodeProgress(1)

        def progress(done, total, text):
            bar.update(done, total, f"{text} ({done}/{total})")

        try:
            run = fuse_stack(model, clip, concepts, settings, progress)
            new_model, new_clip, stack = apply_fused(model, clip, run.fused)
        except (FusionError, EDLoRAApplyError, RegionalPlanError, ScopedLoRAError) as e:
            raise NodeError(FUSE_NAME, str(e)) from None
        target = free_path(loras_dir(), stem, ".safetensors")
        try:
            write_fused(run.fused, target)
        except (FusedFileError, OSError) as e:
            raise NodeError(FUSE_NAME, f"could not save {target}: {e}") from None
        names = [c.name for c in concepts]
        file_name = os.path.basename(target)
        table = residual_table(run.fused.residuals, names)
        head = (f"Saved models/loras/{file_name} ({len(run.fused.unet)} UNet + {len(run.fused.clip)} text-encoder "
                f"layers, {solver}); words: {'; '.join(c.prompt_words or c.name for c in stack)}")  # fmt: skip
        plot = residual_plot(run.fused.residuals, names, title=f"{FUSE_NAME}: relative error per layer ({solver})")
        return io.NodeOutput(new_model, new_clip, stack, plot, head + "\n" + table,
                             ui=ui.PreviewText(head + "\n" + summary(run.fused.residuals, names)))  # fmt: skip


class LoadFusedConcepts(io.ComfyNode):
    NAME = LOAD_NAME

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptLoadFusedConcepts",
            display_name="Load Fused Concepts",
            category=CATEGORY_CONCEPTS,
            description="Loads a file saved by Fuse Concepts onto the checkpoint it was fused on: the fused MODEL and "
            "CLIP (every concept's words known) and the concepts for Mix-of-Show Regional Sampling.",
            inputs=[
                FUSED_FILES.input("fused_name", "A fused-concepts file from models/loras (saved by Fuse Concepts)."),
                io.Model.Input("model", tooltip="The MODEL of the checkpoint the concepts were fused on."),
                io.Clip.Input("clip", tooltip="That checkpoint's CLIP."),
            ],
            outputs=_outputs() + [io.String.Output(display_name="info", tooltip="The concepts and their words.")],
        )

    @classmethod
    @guarded_validation(LOAD_NAME, "fused_name", "Pick a fused-concepts file from models/loras.")
    def validate_inputs(cls, fused_name):
        return FUSED_FILES.check(cls.NAME, fused_name)

    @classmethod
    @checked_inputs(LOAD_NAME)
    def execute(cls, fused_name, model, clip) -> io.NodeOutput:
        path = FUSED_FILES.path(cls.NAME, fused_name)
        try:
            fused = read_fused(path)
            new_model, new_clip, stack = apply_fused(model, clip, fused)
        except (FusedFileError, FusionError, RegionalPlanError) as e:
            raise NodeError(LOAD_NAME, str(e)) from None
        other = base_mismatch(model, fused)
        if other:
            log.warning("[multi-concept] %s: %s was fused on another checkpoint (base weights differ at %s); the "
                        "concepts may look wrong on this one.", LOAD_NAME, fused_name, other[0])  # fmt: skip
        info = "\n".join(f"{i + 1}. {c.prompt_words or c.source} ({c.class_word or 'no class'}, region "
                         f"{c.label!r})" for i, c in enumerate(stack))  # fmt: skip
        return io.NodeOutput(new_model, new_clip, stack, info)


__all__ = ["FuseConcepts", "LoadFusedConcepts"]
