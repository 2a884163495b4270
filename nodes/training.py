"""Train ED-LoRA: a concept from 5–20 pictures, saved in the pack's format and applied to MODEL and CLIP."""

from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io, ui

from ..formats.edlora import EDLoRAFileError, write_edlora_safetensors
from ..samplers.edlora.model import EDLoRAApplyError, apply_edlora
from ..training.augment import CAPTION_MODES, IMAGE_MODES
from ..training.captions import PLACEHOLDER, CaptionError, prepare_captions
from ..training.dataset import DatasetError
from ..training.edlora_trainer import (
    ATTENTION_REGULARISERS,
    ORTHOGONAL_MODES,
    EDLoRATrainer,
    TrainingError,
    TrainSettings,
)
from ..training.loop import train
from ..training.plots import loss_curve_image
from ..training.recipe import (
    ATTENTION_WEIGHT,
    AUTO_RATE,
    EMBEDDING_RULES,
    LR_SCHEDULES,
    NOISE_OFFSET,
    NORM_THRESHOLD,
    RECIPES,
    SAMPLES_PER_PICTURE,
    WEIGHT_DECAY,
)
from ..training.state import STATE_SUFFIX, StateError
from .common import (
    CATEGORY_EDLORA,
    ConceptStackType,
    EDLoRAConceptType,
    NodeError,
    NodeProgress,
    checked_inputs,
    free_path,
    loras_dir,
)
from .inputs import seed_input
from .validation import check_output_name, plain_name_problem

log = logging.getLogger("multiconcept")

NAME = "Train ED-LoRA"
STATES_FOLDER = "edlora_training"  # under ComfyUI's output folder: resumable states, not models
NO_RESUME = "none"


def states_dir() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), STATES_FOLDER)


def list_states() -> list[str]:
    d = states_dir()
    try:
        return sorted(f for f in os.listdir(d) if f.endswith(STATE_SUFFIX))
    except OSError:
        return []


def _learning_rate(name: str, step: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=AUTO_RATE, min=AUTO_RATE, max=1.0, step=step, tooltip=tooltip)


class TrainEDLoRA(io.ComfyNode):
    NAME = NAME

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptTrainEDLoRA",
            display_name=NAME,
            category=CATEGORY_EDLORA,
            description=(
                "Learns a concept (a person, pet, object) from 5–20 pictures as an ED-LoRA: layer-wise token "
                "embeddings for its words plus LoRA on the text encoder and the UNet's attention, with Mix-of-Show's "
                "recipe by default (its step count, learning rates and decay, augmentations, regulariser and "
                "embedding rule; the help page cites each official value). Saves it under models/loras (never over an existing file) and outputs MODEL and CLIP "
                "with it applied, the concept for a concept stack, and the loss curve. Cancel the prompt to stop: "
                "the run is saved and can be resumed."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The SD1.5- or SDXL-family checkpoint's MODEL to train the concept for (SDXL: Concept "
                    "Conductor's recipe, CLIP-L and CLIP-G embeddings and LoRAs).",
                ),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP."),
                io.Vae.Input(
                    "vae", tooltip="The checkpoint's VAE: encodes each step's pictures (a fresh posterior sample)."
                ),
                io.Image.Input(
                    "images",
                    tooltip="The training pictures (a batch). Scaled so the shorter side is the resolution; then, by "
                    "default, half the time cropped (tall pictures from the top, keeping heads) and placed whole "
                    "on a black square (Mix-of-Show's augmentation).",
                ),
                io.String.Input(
                    "captions",
                    multiline=True,
                    default=PLACEHOLDER,
                    tooltip=f"One line per picture, in order (or one line for all). {PLACEHOLDER} stands for the "
                    "concept words. Describe everything that is NOT the subject, in comma-separated parts after "
                    f"{PLACEHOLDER}, so it does not leak into the concept: '{PLACEHOLDER}, on a red sofa, by a "
                    "window'. By default the parts after the first are shuffled and the caption is put in a "
                    "template ('a photo of a …') each step, as Mix-of-Show.",
                ),
                io.String.Input(
                    "concept_words",
                    default="<concept1> <concept2>",
                    tooltip="The new words that will name the concept in prompts, e.g. <cat1> <cat2> (two words, "
                    "as Mix-of-Show). The last starts from the class word, the others from noise.",
                ),
                io.String.Input(
                    "class_word",
                    default="",
                    tooltip="What the concept is, in one common word: man, woman, dog, cat, chair. Starts the "
                    "concept's last word and lets methods write class-only prompts.",
                ),
                io.String.Input(
                    "output_name",
                    default="my_concept",
                    tooltip="File name under models/loras (.safetensors is added). If it exists, _2, _3... is "
                    "appended: nothing is overwritten.",
                ),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Optimiser steps. 0 = the official count: pictures × samples per picture / batch_size "
                    f"(SD1.5, Mix-of-Show: {SAMPLES_PER_PICTURE} samples, 10 pictures at batch 4 = 1250 steps; "
                    f"SDXL, Concept Conductor: {RECIPES['sdxl'].samples_per_picture} samples at batch 1).",
                ),
                _learning_rate(
                    "lr_embedding",
                    1e-5,
                    "Learning rate of the concept's token embeddings. -1 = official (SD1.5: 1e-3; SDXL: CLIP-L 1e-3, "
                    "CLIP-G 5e-4). A number you set applies to every text encoder. Must not be 0.",
                ),
                _learning_rate(
                    "lr_text",
                    1e-6,
                    "Learning rate of the text-encoder LoRA. -1 = official (SD1.5: 1e-5; SDXL: CLIP-L 1e-5, CLIP-G "
                    "2e-6). 0 trains and saves none.",
                ),
                _learning_rate(
                    "lr_unet",
                    1e-5,
                    "Learning rate of the UNet attention LoRA. -1 = official (SD1.5: 1e-4; SDXL: 5e-5). 0 trains and "
                    "saves none.",
                ),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=128,
                    tooltip="LoRA rank. 0 = official (SD1.5: 4; SDXL: 32 for the UNet and CLIP-G, 4 for CLIP-L). A "
                    "number you set applies to every LoRA.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=0,
                    min=0,
                    max=64,
                    tooltip="Pictures per step. 0 = official (SD1.5: 4, two on each of Mix-of-Show's two GPUs; SDXL: "
                    "1). Lower it, or raise accumulation, if memory runs out; with steps 0 the run still sees each "
                    "picture as often.",
                ),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=2048,
                    step=64,
                    tooltip="Training size in pixels (square). 0 = official (SD1.5: 512; SDXL: 1024).",
                ),  # fmt: skip
                seed_input(
                    "seed",
                    "Seeds the initial weights and every step's noise: same seed, same result.",
                    control_after_generate=False,
                ),
                io.Mask.Input(
                    "masks",
                    optional=True,
                    tooltip="Optional subject masks, one per picture (e.g. from the SAM Masks node): the loss counts "
                    "only the subject, so backgrounds are not learned.",
                ),  # fmt: skip
                io.Boolean.Input(
                    "masked_loss",
                    default=True,
                    optional=True,
                    tooltip="With masks: average the loss inside the subject only (Mix-of-Show: on). Without masks "
                    "the loss counts the picture, not the black border the augmentation adds.",
                ),  # fmt: skip
                io.Float.Input(
                    "attention_weight",
                    default=ATTENTION_WEIGHT,
                    min=0.0,
                    max=10.0,
                    step=0.001,
                    optional=True,
                    tooltip="Weight of the attention regulariser that keeps the concept words' cross-attention "
                    "inside the subject mask (or, without masks, off the black border) (Mix-of-Show: 0.01; 0 = off).",
                ),  # fmt: skip
                io.Combo.Input(
                    "attention_regulariser",
                    options=list(ATTENTION_REGULARISERS),
                    default=ATTENTION_REGULARISERS[0],
                    optional=True,
                    tooltip="'mix-of-show': the official loss (every cross-attention layer by resolution, each word's "
                    "map over its batch maximum, its mean outside the mask). 'share outside': this pack's earlier "
                    "loss (the share of each word's attention outside the mask, 16×16 layers only).",
                ),  # fmt: skip
                io.Combo.Input(
                    "orthogonal",
                    options=list(ORTHOGONAL_MODES),
                    default="off",
                    optional=True,
                    tooltip="Keep this concept's UNet LoRA out of the way of the concepts in 'orthogonal_to': "
                    "'penalty' penalises overlap of their input subspaces; 'frozen basis' fixes this concept's "
                    "LoRA inputs to directions no earlier concept uses, so the LoRAs can simply be added.",
                ),  # fmt: skip
                ConceptStackType.Input(
                    "orthogonal_to",
                    optional=True,
                    tooltip="Existing ED-LoRA concepts to keep orthogonal to (a concept stack).",
                ),  # fmt: skip
                io.Float.Input(
                    "orthogonality_weight",
                    default=1e-3,
                    min=0.0,
                    max=100.0,
                    step=1e-4,
                    optional=True,
                    tooltip="Weight of the orthogonality penalty (orthogonal = penalty).",
                ),  # fmt: skip
                io.Combo.Input(
                    "embedding_rule",
                    options=list(EMBEDDING_RULES),
                    default=EMBEDDING_RULES[0],
                    optional=True,
                    tooltip="'freeze at mean norm' (Mix-of-Show): once the concept embeddings' mean norm reaches "
                    "norm_cap they stop changing for the rest of the run and only the LoRAs learn. 'cap each row': "
                    "after each step, rows longer than norm_cap are scaled back to it. 'off': neither.",
                ),  # fmt: skip
                io.Float.Input(
                    "norm_cap",
                    default=AUTO_RATE,
                    min=AUTO_RATE,
                    max=10.0,
                    step=0.01,
                    optional=True,
                    tooltip=f"The embedding rule's norm for CLIP-L. -1 = official ({NORM_THRESHOLD}; CLIP's own tokens "
                    "are about 0.4); SDXL's CLIP-G embeddings have their own, 1.5 (Concept Conductor). 0 = no rule.",
                ),  # fmt: skip
                io.Combo.Input(
                    "lr_schedule",
                    options=list(LR_SCHEDULES),
                    default=LR_SCHEDULES[0],
                    optional=True,
                    tooltip="'linear to 0' (Mix-of-Show): every learning rate falls linearly to 0 over the run, no "
                    "warm-up. 'constant': the rates as given throughout.",
                ),  # fmt: skip
                io.Float.Input(
                    "weight_decay",
                    default=WEIGHT_DECAY,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    tooltip="AdamW weight decay of every part, embeddings included (Mix-of-Show: 0.01).",
                ),  # fmt: skip
                io.Float.Input(
                    "noise_offset",
                    default=NOISE_OFFSET,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    tooltip="Per-channel offset added to the training noise (Mix-of-Show: 0.01).",
                ),  # fmt: skip
                io.Combo.Input(
                    "image_augmentation",
                    options=list(IMAGE_MODES),
                    default=IMAGE_MODES[0],
                    optional=True,
                    tooltip="'crop and place (official)': each step, half the time a crop (tall pictures from the "
                    "top), then the whole picture placed at a random spot on a black square. 'centre crop': every "
                    "picture centre-cropped square, the same each step.",
                ),  # fmt: skip
                io.Combo.Input(
                    "caption_augmentation",
                    options=list(CAPTION_MODES),
                    default=CAPTION_MODES[0],
                    optional=True,
                    tooltip="Each step: shuffle the comma-separated parts after the first, then put the caption in "
                    "a random template ('a photo of a …'). Mix-of-Show uses the human templates in every config.",
                ),  # fmt: skip
                io.Boolean.Input(
                    "sample_posterior",
                    default=True,
                    optional=True,
                    tooltip="Draw a fresh sample of the VAE's posterior each step (Mix-of-Show) instead of always "
                    "its mean.",
                ),  # fmt: skip
                io.Int.Input(
                    "preview_every",
                    default=0,
                    min=0,
                    max=100_000,
                    optional=True,
                    tooltip="Show a sample of the preview prompt on the node every this many steps (0 = never). "
                    "Each preview costs about 16 sampling steps.",
                ),  # fmt: skip
                io.String.Input(
                    "preview_prompt",
                    default=f"a photo of {PLACEHOLDER}",
                    optional=True,
                    tooltip=f"The prompt of the previews; {PLACEHOLDER} = the concept words.",
                ),  # fmt: skip
                io.String.Input(
                    "preview_strengths",
                    default="0, 0.7, 1.0",
                    optional=True,
                    tooltip="Each preview shows the concept with its LoRAs at these strengths, side by side (0 = the "
                    "word embeddings alone), as Mix-of-Show's validation (alpha_list 0, 0.7, 1.0).",
                ),  # fmt: skip
                io.Combo.Input(
                    "resume",
                    options=[NO_RESUME] + list_states(),
                    default=NO_RESUME,
                    optional=True,
                    tooltip=f"Continue a cancelled or finished run from its state (output/{STATES_FOLDER}). Use the "
                    "same pictures, model and settings; raise 'steps' to train a finished run further.",
                ),  # fmt: skip
                # (new widgets go last: a saved workflow's widget values are positional)
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=False,
                    optional=True,
                    tooltip="Recompute each UNet block's and text-encoder layer's activations in the backward pass "
                    "instead of keeping them: much less memory (an SDXL concept on a 12 GB card), each step about "
                    "a third slower. Off in both official recipes.",
                ),  # fmt: skip
                io.Int.Input(
                    "accumulation",
                    default=1,
                    min=1,
                    max=64,
                    optional=True,
                    tooltip="Split each step's batch into this many micro-batches, one after the other, and add up "
                    "their gradients: the memory of a smaller batch, the update of the whole one. Must divide "
                    "batch_size.",
                ),  # fmt: skip
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The MODEL with the trained concept applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP that understands the concept words."),
                EDLoRAConceptType.Output(
                    display_name="concept", tooltip="The trained concept: connect to Concept Stack: Loaded ED-LoRA."
                ),
                io.Image.Output(display_name="loss curve", tooltip="The loss per step and its moving average."),
                io.String.Output(display_name="words", tooltip="What to type in prompts for the concept."),
            ],
            is_output_node=True,
        )

    @classmethod
    @checked_inputs(NAME)
    def execute(cls, model, clip, vae, images, captions, concept_words, class_word, output_name, steps, lr_embedding,
                lr_text, lr_unet, rank, batch_size, resolution, seed, masks=None, masked_loss=True,
                attention_weight=ATTENTION_WEIGHT, attention_regulariser=ATTENTION_REGULARISERS[0], orthogonal="off",
                orthogonal_to=None, orthogonality_weight=1e-3, embedding_rule=EMBEDDING_RULES[0],
                norm_cap=AUTO_RATE, lr_schedule=LR_SCHEDULES[0], weight_decay=WEIGHT_DECAY,
                noise_offset=NOISE_OFFSET, image_augmentation=IMAGE_MODES[0], caption_augmentation=CAPTION_MODES[0],
                sample_posterior=True, gradient_checkpointing=False, accumulation=1, preview_every=0, preview_prompt=f"a photo of {PLACEHOLDER}",
                preview_strengths="0, 0.7, 1.0", resume=NO_RESUME) -> io.NodeOutput:  # fmt: skip
        import comfy.model_management

        stem = check_output_name(NAME, "output_name", output_name)
        if stem.lower().endswith(".safetensors"):
            stem = stem[: -len(".safetensors")]
        words = tuple(concept_words.split())
        n_images = int(images.shape[0]) if hasattr(images, "shape") and images.ndim == 4 else 0
        try:
            templated = str(caption_augmentation).startswith("shuffle + ")  # (an unknown mode is refused below)
            prepared = prepare_captions(captions, n_images, " ".join(words),
                                        default=PLACEHOLDER if templated else f"a photo of {PLACEHOLDER}")  # fmt: skip
        except CaptionError as e:
            raise NodeError(NAME, str(e)) from None
        for w in prepared.warnings:
            log.warning("[multi-concept] %s: %s", NAME, w)
        if orthogonal != "off" and not orthogonal_to:
            raise NodeError(NAME, f"orthogonal is '{orthogonal}' but nothing is connected to orthogonal_to: connect a "
                            "concept stack of the ED-LoRAs to keep apart from, or set orthogonal to off.")  # fmt: skip
        existing = tuple(c.adapter for c in (orthogonal_to or ()) if c.kind == "edlora")
        if orthogonal != "off" and not existing:
            raise NodeError(NAME, f"orthogonal is '{orthogonal}' but the concept stack in orthogonal_to holds no ED-LoRA "
                            "(only ED-LoRAs have the LoRA layers to keep apart from): add the ED-LoRAs, or set "
                            "orthogonal to off.")  # fmt: skip
        settings = TrainSettings(
            concept_words=words, class_word=class_word.strip(), steps=steps, lr_embedding=lr_embedding,
            lr_text=lr_text, lr_unet=lr_unet, rank=rank, batch_size=batch_size, seed=seed, resolution=resolution,
            masked_loss=masked_loss, attention_weight=attention_weight, attention_regulariser=attention_regulariser,
            orthogonal=orthogonal, orthogonality_weight=orthogonality_weight, embedding_rule=embedding_rule,
            norm_cap=norm_cap, lr_schedule=lr_schedule, weight_decay=weight_decay, noise_offset=noise_offset,
            image_augmentation=image_augmentation, caption_augmentation=caption_augmentation,
            sample_posterior=sample_posterior, gradient_checkpointing=gradient_checkpointing,
            accumulation=accumulation,
        )  # fmt: skip
        resume_path = None
        if resume and resume != NO_RESUME:
            problem = plain_name_problem(resume, allow_subfolders=False)
            resume_path = os.path.join(states_dir(), resume) if not problem else None
            if resume_path is None or not os.path.isfile(resume_path):
                raise NodeError(
                    NAME, f"resume state {resume!r} is not in output/{STATES_FOLDER}; pick one from the list."
                )
        try:
            trainer = EDLoRATrainer(model, clip, vae, images, list(prepared.texts), settings, masks, existing)
        except (TrainingError, DatasetError, EDLoRAApplyError) as e:
            raise NodeError(NAME, str(e)) from None

        os.makedirs(states_dir(), exist_ok=True)
        state_path = resume_path or free_path(states_dir(), stem, STATE_SUFFIX)
        total = trainer.settings.steps  # steps 0 resolved to Mix-of-Show's count
        progress = NodeProgress(total)

        def report(step, loss, parts):
            progress.update(step, total, f"step {step}/{total}  loss {loss:.4f}")

        strengths = _strengths(preview_strengths) if preview_every else (1.0,)

        def preview(step):
            imgs = trainer.preview(preview_prompt, seed, strengths=strengths)
            strip = torch.cat(list(imgs), dim=1)  # side by side, in the order given
            progress.update(step, total, preview=("JPEG", _pil(strip), trainer.settings.resolution * len(strengths)))

        try:
            result = train(trainer, state_path=state_path, resume=resume_path, report=report,
                           cancelled=comfy.model_management.processing_interrupted, preview=preview,
                           preview_every=preview_every)  # fmt: skip
        except (TrainingError, StateError) as e:
            raise NodeError(NAME, str(e)) from None
        state_name = os.path.basename(result.state_path) if result.state_path else ""
        if result.status == "cancelled":
            log.warning("[multi-concept] %s: %s; resume from %s", NAME, result.message, state_name)
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise NodeError(NAME, f"{result.message}; resume from {state_name}")
        if result.status == "nan":
            raise NodeError(NAME, f"{result.message} The state was saved as output/{STATES_FOLDER}/{state_name}.")

        weights = trainer.weights()
        target = free_path(loras_dir(), stem, ".safetensors")
        try:
            write_edlora_safetensors(weights, target)
        except (EDLoRAFileError, OSError) as e:
            raise NodeError(NAME, f"could not save {target}: {e}") from None
        file_name = os.path.basename(target)
        try:
            new_model, new_clip, concept = apply_edlora(model, clip, weights, file_name, 1.0, 1.0,
                                                        class_word=settings.class_word)  # fmt: skip
        except EDLoRAApplyError as e:
            raise NodeError(NAME, str(e)) from None
        renamed = "" if file_name == stem + ".safetensors" else f" ({stem}.safetensors exists, so a new name was used)"
        lines = [f"Saved models/loras/{file_name}{renamed}", f"words: {concept.prompt_words}",
                 f"resume state: output/{STATES_FOLDER}/{state_name}", f"final loss {result.losses[-1]:.4f}"
                 if result.losses else "no steps run"] + list(prepared.warnings)  # fmt: skip
        curve = loss_curve_image(result.losses, title=f"{NAME}: {concept.prompt_words} ({settings.class_word})")
        return io.NodeOutput(
            new_model, new_clip, concept, curve, concept.prompt_words, ui=ui.PreviewText("\n".join(lines))
        )


def _strengths(text) -> tuple[float, ...]:
    """The preview strengths: comma-separated numbers from 0 to 2 (at most 6)."""
    import math

    try:
        values = tuple(float(v) for v in str(text).replace(";", ",").split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or len(values) > 6 or not all(math.isfinite(v) and 0 <= v <= 2 for v in values):
        raise NodeError(NAME, f"preview_strengths is {str(text)[:60]!r}; give 1 to 6 comma-separated strengths from 0 "
                        "to 2, e.g. 0, 0.7, 1.0.")  # fmt: skip
    return values


def _pil(image):
    import numpy as np
    from PIL import Image

    return Image.fromarray((image.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8))


__all__ = ["TrainEDLoRA"]
