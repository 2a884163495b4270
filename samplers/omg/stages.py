"""OMG's two stages in ComfyUI terms (glue): stage 1 with the layout recorded, the concept masks, and the
stage-2 model and prompts the guider samples with. The nodes call these; the maths is in ``blend`` and
``layout``."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from ..concept_stack.stack import Concept, ConceptStack
from ..prompt_tokens import phrase_positions
from ..regions.layout import Region, Regions
from .blend import boxes_from_attention, resize_masks
from .layout import OFF, RECORD, LayoutError, LayoutStore, install_layout_patches

ROW_TAG = "omg:{i}"
log = logging.getLogger("multiconcept")


@dataclass
class OMGLayout:
    """What stage 1 hands to stage 2 (socket type ``OMG_LAYOUT``): the recorded layout and the scene."""

    store: LayoutStore
    scene_prompt: str
    negative_prompt: str
    positive: list  # the scene's encoded conditioning (stage 2's global prediction uses it again)
    negative: list
    image: torch.Tensor  # the decoded stage-1 image [B, H, W, 3]
    cfg: float

    def __deepcopy__(self, memo):
        return self


PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


# Official OMG samples every concept with its LoRA at scale 0.8, UNet and text encoder alike
# (kongzhecn/OMG inference_lora.py:64 cross_attention_kwargs={"scale": 0.8}, which lora_pipeline.py:306-307 also
# takes as the text encoder's lora_scale; lora_pipeline.py:596 in stage 2).
OFFICIAL_STRENGTH = 0.8
STRENGTHS = ("0.8, as the official OMG", "the stack's strengths")


class OMGError(ValueError):
    """Bad OMG input; the message says what to change."""


def omg_strengths(stack: ConceptStack, choice: str) -> ConceptStack:
    """The stack at the strengths OMG samples with: 0.8 (official) for every strength left at its Concept Stack
    node's default (a changed one is kept), or the stack's own."""
    if choice not in STRENGTHS:
        raise OMGError(f"strengths is {choice!r}; choose one of {', '.join(STRENGTHS)}")
    return stack if choice == STRENGTHS[1] else stack.at_strength(OFFICIAL_STRENGTH)


# ------------------------------------------------------------------------------------------- words


def word_positions(clip, prompt: str, word: str) -> list[int]:
    """Token positions (into the prompt's 77-token chunks) of each occurrence of ``word``: its last token."""
    return [found[-1] for found in phrase_positions(clip, prompt, word)]


def class_word_tokens(clip, prompt: str, stack: ConceptStack) -> list[int]:
    """One token position per concept: the k-th occurrence of its class word for the k-th concept of that
    class (so two concepts of one class take the two mentions in prompt order, left to right in the text)."""
    taken: dict[str, int] = {}
    out = []
    for i, c in enumerate(stack):
        word = c.class_word.strip()
        if not word:
            raise OMGError(
                f"concept {i + 1} ({c.name}) has no class word, so its mask cannot be found from the prompt. Set "
                "its class_word in the Concept Stack node, or give boxes (regions) for the masks."
            )
        found = word_positions(clip, prompt, word)
        k = taken.get(word, 0)
        if k >= len(found):
            times = "once more" if found else "at all"
            raise OMGError(
                f"the scene prompt must name each concept's class word: '{word}' (concept {i + 1}, {c.name}) is not "
                f"in it {times}. Write e.g. 'a {word} and ...' with one mention per concept of that class."
            )
        taken[word] = k + 1
        out.append(found[k])
    return out


def concept_prompt(prompt: str, concept: Concept, occurrence: int) -> str:
    """The scene prompt with the ``occurrence``-th mention of the concept's class word preceded by its words
    ("a man and a dog" -> "a man and a <dog1> <dog2> dog"); unchanged when it has no words."""
    words = concept.prompt_words
    word = concept.class_word.strip()
    if not words:
        return prompt
    if not word:
        return f"{words}, {prompt}"
    found = list(re.finditer(rf"\b{re.escape(word)}\b", prompt))
    if occurrence >= len(found):
        return f"{words} {word}, {prompt}"
    m = found[occurrence]
    return prompt[: m.start()] + f"{words} {word}" + prompt[m.end() :]


def parse_concept_prompts(text: str, stack: ConceptStack) -> dict[int, str]:
    """``label: prompt`` lines (or plain lines in concept order) -> {concept index: prompt}."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    labels = {c.label: i for i, c in enumerate(stack) if c.label}
    out: dict[int, str] = {}
    for n, line in enumerate(lines):
        head, sep, rest = line.partition(":")
        if sep and head.strip() in labels:
            out[labels[head.strip()]] = rest.strip()
        elif n < len(stack):
            out[n] = line
        else:
            raise OMGError(
                f"concept_prompts line {n + 1} ('{line[:40]}') names no concept: start it with a concept's region "
                f"label and a colon ({', '.join(labels) or 'no concept has a label'}), or give one line per concept."
            )
    return out


# ------------------------------------------------------------------------------------------- stage 1


def run_stage1(model, positive, negative, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, store: LayoutStore, callback=None, disable_pbar: bool = False) -> torch.Tensor:  # fmt: skip
    """Sample the scene with the layout recorded into ``store``; return stage 1's final latent."""
    import comfy.sample

    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    clone = model.clone()
    install_layout_patches(clone, store)

    def on_step(step, x0, x, total):
        if step == store.start:
            store.x_start = x.detach().clone()
        if callback is not None:
            callback(step, x0, x, total)

    store.mode = RECORD
    try:
        out = comfy.sample.sample(
            clone, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
            noise_mask=latent.get("noise_mask"), callback=on_step, disable_pbar=disable_pbar, seed=seed,
        )  # fmt: skip
    finally:
        store.mode = OFF
    if store.sigmas is None or store.x_start is None:
        raise LayoutError("stage 1 did not reach the start step (a sampler that skips steps?)")
    store.final = out.detach().clone()
    if store.cut_message():
        log.warning(store.cut_message())
    return out


# ------------------------------------------------------------------------------------------- masks


def boxes_for_concepts(stack: ConceptStack, regions: Regions) -> list[tuple[float, float, float, float]]:
    """Each concept's box from the regions (matched by label; several boxes with one label are joined)."""
    out = []
    labels = [r.label for r in regions.regions]
    for i, c in enumerate(stack):
        picked = [r for r in regions.regions if c.label and r.label == c.label]
        if not picked:
            shown = ", ".join(f"'{x}'" for x in labels if x) or "no box has a label"
            raise OMGError(
                f"concept {i + 1} ({c.name}) has no box: its region label is '{c.label}', the boxes are {shown}. "
                "Give each concept the label of its box, or leave regions unconnected for automatic masks."
            )
        xs0, ys0, xs1, ys1 = zip(*(r.box for r in picked), strict=True)
        out.append((min(xs0), min(ys0), max(xs1), max(ys1)))
    return out


def region_boxes(stack: ConceptStack, regions: Regions, width: int, height: int) -> list:
    """Each concept's box from the regions, in pixels of the ``width`` x ``height`` image sampled; the regions
    must have been drawn at its aspect ratio."""
    sx, sy = width / regions.width, height / regions.height
    if abs(sx - sy) > 8 / min(width, height):
        raise OMGError(
            f"the regions were drawn on a {regions.width}x{regions.height} image, the latent is {width}x{height} "
            "(another shape). Set the Regions node's size to the latent's."
        )
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes_for_concepts(stack, regions)]


def checked_masks(masks: torch.Tensor, count: int, latent_hw) -> torch.Tensor:
    """The masks given for ``count`` concepts as ``[N, H, W]`` floats on the CPU: one per concept, of the
    latent's aspect ratio."""
    masks = masks.float().cpu()
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.ndim != 3 or masks.shape[0] != count:
        raise OMGError(
            f"masks holds {masks.shape[0] if masks.ndim == 3 else 'no'} mask(s) for {count} concept(s): "
            "give one mask per concept, in stack order."
        )
    fits_latent(masks, latent_hw)
    return masks


def fits_latent(masks: torch.Tensor, latent_hw) -> None:
    """Masks of another aspect ratio than the latent ``(h, w)`` are refused, naming both sizes."""
    lat_h, lat_w = (int(s) for s in latent_hw)
    try:
        resize_masks(masks, (lat_h, lat_w))
    except ValueError as e:
        raise OMGError(f"{e}. Give masks of the sampled image's size ({lat_w * 8}x{lat_h * 8}).") from None


def check_mask_inputs(stack: ConceptStack, regions: Regions | None, masks: torch.Tensor | None, latent_hw) -> None:
    """Before stage 1 samples: the masks given (one per concept, the latent's aspect ratio) or else the regions
    (the latent's aspect ratio, a box for every concept) are refused as stage 2 would refuse them."""
    lat_h, lat_w = (int(s) for s in latent_hw)
    if masks is not None:
        checked_masks(masks, len(stack), (lat_h, lat_w))
    elif regions is not None:
        region_boxes(stack, regions, lat_w * 8, lat_h * 8)


def attention_boxes(store: LayoutStore, width: int, height: int, threshold: float) -> list:
    maps = store.word_maps()
    if maps is None:
        raise OMGError("stage 1 kept no attention maps for the class words (the prompt had none?)")
    fractions = boxes_from_attention(maps[0], threshold=threshold)
    return [(x0 * width, y0 * height, x1 * width, y1 * height) for x0, y0, x1, y1 in fractions]


def masks_from_boxes(boxes, width: int, height: int, image: torch.Tensor | None, sam,
                     keep_in_box: bool = True) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """``[N, H, W]``: SAM masks on ``image`` for each box when a SAM model is given, else the boxes.

    ``keep_in_box``: cut each SAM mask at its box (boxes the user drew). Off for boxes found automatically: the
    official code keeps the SAM mask whole (kongzhecn/OMG inference_lora.py:91-126, the detector's box only prompts
    SAM), so a box that caught only a head still gives the whole person."""
    from ..regions.layout import box_mask
    from ..regions.sam import keep_inside_box, masks_for_boxes

    if sam is not None and image is not None:
        model = sam.load() if hasattr(sam, "load") else sam
        masks, _ = masks_for_boxes(model, image[0], [list(b) for b in boxes])
        if keep_in_box:
            masks = torch.stack([keep_inside_box(m, b) for m, b in zip(masks, boxes, strict=True)])
        empty = [i for i, m in enumerate(masks) if float(m.max()) <= 0]
        for i in empty:  # SAM found nothing in this box: the box itself
            masks[i] = box_mask(boxes[i], height, width)
        return masks, True
    return torch.stack([box_mask(b, height, width) for b in boxes]), False


def mask_preview(image: torch.Tensor | None, masks: torch.Tensor, boxes, labels, width: int, height: int):
    """The masks tinted over the stage-1 image, each box outlined and labelled."""
    from ..regions.preview import draw_regions

    regions = Regions(
        width=width,
        height=height,
        regions=tuple(
            Region(box=tuple(float(v) for v in b), label=label, color=PALETTE[i % len(PALETTE)], mask=m)
            for i, (b, label, m) in enumerate(zip(boxes, labels, masks, strict=True))
        ),
    )
    return draw_regions(regions, image, fill_alpha=0.45)


# ------------------------------------------------------------------------------------------- stage 2


def tag_rows(conditioning: list, i: int) -> list:
    """``conditioning`` with its rows owned by concept ``i`` (the scoped runtime's row scope)."""
    from ..scoped_lora.runtime import ROW_TAGS_KEY

    return [[c, {**d, ROW_TAGS_KEY: (ROW_TAG.format(i=i),)}] for c, d in conditioning]


def stage2_model(model, stack: ConceptStack, store: LayoutStore, node: str):
    """A clone of ``model`` with each concept's UNet adapter scoped to its own rows and the layout replay."""
    from ..scoped_lora.adapters import resolve_concept
    from ..scoped_lora.runtime import Scope, ScopedConcept, install_scoped_lora

    clone = model.clone()
    items = []
    for i, concept in enumerate(stack):
        if not concept.strength_unet:
            continue
        resolved = resolve_concept(clone, concept)
        if resolved.factors:
            items.append(ScopedConcept(resolved, Scope(row_tags=frozenset({ROW_TAG.format(i=i)}), cond_kinds=None)))
    if items:
        install_scoped_lora(clone, items, node)
    install_layout_patches(clone, store)
    return clone


def with_labels(stack: ConceptStack) -> list[str]:
    return [c.label or c.prompt_words or c.class_word or f"concept {i + 1}" for i, c in enumerate(stack)]


@dataclass(frozen=True)
class ModelConcept:
    """A concept that is a whole MODEL with its own prompts (e.g. the base model with an IP-Adapter or
    InstantID patch on it, seed ``002``): predicted in a pass of its own and blended like the others."""

    model: object = field(compare=False, repr=False)
    positive: list = field(compare=False, repr=False)
    negative: list = field(compare=False, repr=False)
    class_word: str = ""
    label: str = ""
    kind: str = "model"
    prompt_words: str = ""

    @property
    def name(self) -> str:
        return self.label or self.class_word or "model concept"
