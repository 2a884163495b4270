"""Evaluation: load an open_clip model from models/open_clip; score generated images against each concept's
references (CLIP-I, CLIP-T, SID's SA / NSD) as a table, JSON and a chart. The work is in evaluation/."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..evaluation.open_clip_model import AUTO, list_architectures, load_open_clip
from ..evaluation.report import chart_image, markdown_table, scores_json
from ..evaluation.scores import (
    ConceptReference,
    EvaluationError,
    boxes_for_images,
    checked_reference,
    score_images,
)
from ..formats.open_clip import OpenClipFileError
from .common import (
    CATEGORY_ROOT,
    ConceptStackType,
    NodeError,
    checked_inputs,
    guarded_validation,
    register_model_folder,
)
from .inputs import ModelFiles, prompt_input
from .regions import RegionsType

log = logging.getLogger("multiconcept")

CATEGORY_EVALUATION = f"{CATEGORY_ROOT}/evaluation"
OPEN_CLIP_FILES = ModelFiles("open_clip", (".safetensors", ".sft", ".bin", ".pt", ".pth"), "open_clip model")
LOADER_NAME = "Load open_clip Model"
REFERENCES_NAME = "Evaluation References"
SCORE_NAME = "Score Concepts"

OpenClipType = io.Custom("OPEN_CLIP_MODEL")
ReferencesType = io.Custom("EVAL_REFERENCES")
ScoresType = io.Custom("EVAL_SCORES")


register_model_folder(OPEN_CLIP_FILES.folder)


def _architecture_problem(architecture) -> str | None:
    if not isinstance(architecture, str) or architecture not in list_architectures():
        return f"architecture {str(architecture)[:60]!r} is not one of the listed architectures; pick one (or auto)."
    return None


class OpenClipLoader(io.ComfyNode):
    NAME = LOADER_NAME

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptOpenCLIPLoader",
            display_name=LOADER_NAME,
            category=CATEGORY_EVALUATION,
            description="Loads an open_clip model (both towers: images and text) from models/open_clip for the "
            "Score Concepts node. Nothing is downloaded: put the weights there yourself (e.g. open_clip's "
            "open_clip_model.safetensors of ViT-B-32 or ViT-L-14, renamed as you like).",
            inputs=[
                OPEN_CLIP_FILES.input(
                    "clip_name",
                    "open_clip weights in models/open_clip: .safetensors, or .bin/.pt/.pth state dicts and "
                    "training checkpoints (read safely, tensors only). OpenAI's own .pt download is TorchScript "
                    "and is refused; use the plain weights of the same model.",
                ),
                io.Combo.Input(
                    "architecture",
                    options=list_architectures(),
                    default=AUTO,
                    tooltip="The architecture the weights were trained as (ViT-B-32, ViT-L-14, ...; '-quickgelu' for "
                    "OpenAI's weights). 'auto': from a config JSON beside the file (<file name>.json, or the Hub's "
                    "open_clip_config.json in the same folder), else read from OpenAI-layout weights.",
                ),
            ],
            outputs=[OpenClipType.Output(display_name="open_clip", tooltip="The loaded open_clip model.")],
        )

    @classmethod
    @guarded_validation(LOADER_NAME, "clip_name", "Pick an open_clip file from models/open_clip.")
    def validate_inputs(cls, clip_name):
        # only clip_name: an input named here loses ComfyUI's own checks (the architecture combo keeps them)
        return OPEN_CLIP_FILES.check(cls.NAME, clip_name)

    @classmethod
    @checked_inputs(LOADER_NAME)
    def execute(cls, clip_name, architecture) -> io.NodeOutput:
        problem = _architecture_problem(architecture)
        if problem:
            raise NodeError(cls.NAME, problem)
        path = OPEN_CLIP_FILES.path(cls.NAME, clip_name)
        try:
            clip = load_open_clip(path, architecture)
        except OpenClipFileError as e:
            raise NodeError(cls.NAME, f"{e}. open_clip files go in models/open_clip.") from None
        log.info("%s: %s loaded as %s", LOADER_NAME, clip_name, clip.architecture)
        return io.NodeOutput(clip)


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in (text or "").replace(",", " ").split() if w)


class EvaluationReferences(io.ComfyNode):
    NAME = REFERENCES_NAME

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptEvalReferences",
            display_name=REFERENCES_NAME,
            category=CATEGORY_EVALUATION,
            description="One concept's reference pictures for Score Concepts (add one node per concept, chained). "
            "The label ties them to the concept's box in the regions and to its concept in the stack.",
            inputs=[
                io.String.Input(
                    "label",
                    default="",
                    tooltip="The concept's label: the label of its box in the Regions node (its crop is scored) and "
                    "of its concept in the concept stack.",
                ),
                io.Image.Input(
                    "images", tooltip="The concept's reference pictures (a batch: e.g. Load Image + Batch)."
                ),
                io.Mask.Input(
                    "masks",
                    optional=True,
                    tooltip="Optional subject masks of the reference pictures (e.g. SAM Masks on them), one per "
                    "picture: enables SID's subject alignment (SA) and non-subject disentanglement (NSD).",
                ),
                io.String.Input(
                    "class_word",
                    default="",
                    optional=True,
                    tooltip="The concept's class word (man, dog, ...): replaces its words for CLIP-T. Empty: taken "
                    "from the concept stack when one is connected.",
                ),
                io.String.Input(
                    "concept_words",
                    default="",
                    optional=True,
                    tooltip="The words that name the concept in prompts (e.g. <cat1> <cat2>), replaced by the class "
                    "word for CLIP-T. Empty: taken from the concept stack.",
                ),
                prompt_input(
                    "prompt",
                    "The concept's own prompt, for its per-concept CLIP-T on its crop. Empty: its box's "
                    "prompt in the regions, else 'a photo of a <class word>'.",
                    optional=True,
                ),
                ReferencesType.Input("references", optional=True, tooltip="References of the other concepts (chain)."),
            ],
            outputs=[ReferencesType.Output(display_name="references", tooltip="These and the incoming references.")],
        )

    @classmethod
    @checked_inputs(REFERENCES_NAME)
    def execute(cls, label, images, masks=None, class_word="", concept_words="", prompt="", references=None):
        label = (label or "").strip()
        if not label:
            raise NodeError(cls.NAME, "label is empty: give the concept's label (its box's label in the regions).")
        previous = list(references or [])
        if any(r.label == label for r in previous):
            raise NodeError(
                cls.NAME, f"the label '{label}' is already used by another reference node: one per concept."
            )
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            raise NodeError(cls.NAME, f"'{label}': images is not an IMAGE batch.")
        ref = ConceptReference(label, images, masks, (class_word or "").strip(), _words(concept_words), prompt or "")
        try:  # the same checks the scoring will make, here, where the fix is
            checked_reference(ref)
        except EvaluationError as e:
            raise NodeError(cls.NAME, str(e)) from None
        return io.NodeOutput([*previous, ref])


def _with_stack(references: list[ConceptReference], stack) -> list[ConceptReference]:
    """Class words and words from the concept stack; every concept must have references."""
    by_label = {r.label: r for r in references}
    out = dict(by_label)
    for concept in stack:
        ref = by_label.get(concept.label) or by_label.get(concept.name)
        if ref is None:
            raise NodeError(
                SCORE_NAME,
                f"the concept '{concept.name}' has no references: add an Evaluation References node labelled "
                f"'{concept.label or concept.name}' with its reference pictures (have: {', '.join(by_label) or 'none'}).",
            )
        out[ref.label] = ConceptReference(ref.label, ref.references, ref.masks, ref.class_word or concept.class_word,
                                          ref.words or tuple(concept.words), ref.prompt)  # fmt: skip
    return [out[r.label] for r in references]


def _with_regions(references: list[ConceptReference], regions, image_size) -> tuple[list, dict]:
    labelled = {r.label: r for r in regions.regions if r.label}
    known = {r.label for r in references}
    stray = [label for label in labelled if label not in known]
    if stray:
        raise NodeError(
            SCORE_NAME,
            f"the region '{stray[0]}' has no matching concept references: add an Evaluation References node labelled "
            f"'{stray[0]}', or clear the box's label (references: {', '.join(sorted(known)) or 'none'}).",
        )
    try:
        boxes = boxes_for_images({k: r.box for k, r in labelled.items()}, (regions.width, regions.height), image_size)
    except EvaluationError as e:
        raise NodeError(SCORE_NAME, str(e)) from None
    out = []
    for ref in references:
        region = labelled.get(ref.label)
        prompt = ref.prompt or (region.prompt if region is not None else "")
        out.append(ConceptReference(ref.label, ref.references, ref.masks, ref.class_word, ref.words, prompt))
    return out, boxes


class ScoreConcepts(io.ComfyNode):
    NAME = SCORE_NAME

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptScoreConcepts",
            display_name=SCORE_NAME + " (CLIP-I / CLIP-T / SID)",
            category=CATEGORY_EVALUATION,
            description="Scores generated images against each concept's references with an open_clip model: "
            "CLIP-I (image-image cosine, on each concept's box crop when regions are given), CLIP-T (image-prompt "
            "cosine, concept words replaced by class words), and SID's SA / NSD when reference masks are given. "
            "Chain several (previous_scores) to compare methods or settings in one table and chart.",
            inputs=[
                OpenClipType.Input("open_clip", tooltip="From Load open_clip Model."),
                io.Image.Input(
                    "images", tooltip="The generated images (a batch: every image is scored, then averaged)."
                ),
                prompt_input(
                    "prompt",
                    "The prompt the images were made from; concept words are replaced by class words before "
                    "CLIP-T. Empty: CLIP-T is not measured.",
                ),
                ReferencesType.Input("references", tooltip="Each concept's references (Evaluation References nodes)."),
                io.String.Input(
                    "run_name",
                    default="",
                    optional=True,
                    tooltip="This run's name in the table and chart (e.g. the method: Mix-of-Show, OMG ...).",
                ),
                RegionsType.Input(
                    "regions",
                    optional=True,
                    tooltip="The boxes the images were made with: each concept is scored on its box's crop "
                    "(LoRA-Composer's protocol). Every labelled box needs references with its label.",
                ),
                ConceptStackType.Input(
                    "concepts",
                    optional=True,
                    tooltip="The concept stack the images were made with: supplies class words and words, and every "
                    "concept must have references.",
                ),
                ScoresType.Input("previous_scores", optional=True, tooltip="Scores of other runs, shown beside these."),
            ],
            outputs=[
                ScoresType.Output(display_name="scores", tooltip="These scores after the previous ones (chain on)."),
                io.String.Output(display_name="table", tooltip="Every run's scores as a Markdown table (x100)."),
                io.String.Output(display_name="json", tooltip="Every run's scores as JSON (cosines)."),
                io.Image.Output(display_name="chart", tooltip="Bar chart of every run's scores per concept."),
            ],
            is_output_node=True,
        )

    @classmethod
    @checked_inputs(SCORE_NAME)
    def execute(cls, open_clip, images, prompt, references, run_name="", regions=None, concepts=None,
                previous_scores=None) -> io.NodeOutput:  # fmt: skip
        import comfy.model_management
        import comfy.utils

        if not references:
            raise NodeError(cls.NAME, "no references: connect Evaluation References nodes (one per concept).")
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            raise NodeError(cls.NAME, "images is not an IMAGE batch.")
        refs = list(references)
        if concepts is not None and len(concepts):
            refs = _with_stack(refs, concepts)
        boxes = None
        if regions is not None:
            refs, boxes = _with_regions(refs, regions, (int(images.shape[2]), int(images.shape[1])))
        previous = list(previous_scores or [])
        name = (run_name or "").strip() or f"run {len(previous) + 1}"
        device = comfy.model_management.get_torch_device()
        model = open_clip.model
        original = next(model.parameters()).device
        bar = comfy.utils.ProgressBar(2)
        try:
            model.to(device)
            bar.update_absolute(1, 2)
            result = score_images(open_clip, images, prompt or "", refs, boxes, run=name)
        except EvaluationError as e:
            raise NodeError(cls.NAME, str(e)) from None
        finally:
            model.to(original)
        bar.update_absolute(2, 2)
        runs = [*previous, result]
        table = markdown_table(runs)
        return io.NodeOutput(runs, table, scores_json(runs), chart_image(runs), ui=ui.PreviewText(table))
