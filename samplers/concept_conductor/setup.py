"""Concept Conductor from a concept stack (ComfyUI glue): the branches' prompts, the model with each
concept's adapter scoped to its branch's rows, the masks, and the guider."""

from __future__ import annotations

import re

import torch

from ..concept_stack.stack import Concept, ConceptStack
from .guider import (
    ConductorError,
    ConductorGuider,
    ConductorState,
    conductor_layers,
    install_conductor,
)
from .settings import ConductorSettings

ROW_TAG = "conductor:{i}"


def branch_prompt(scene_prompt: str, concept: Concept, class_words: list[str]) -> str:
    """A concept branch's prompt, as the official prompts are written: every mention of the stack's class
    words in the scene prompt becomes this concept ("a man and a dog" -> "a <dog1> <dog2> dog and a <dog1>
    <dog2> dog" for the dog), so the branch draws its concept wherever the base draws a subject. A concept
    without words leaves the prompt as it is; one whose class word is not in the prompt gets its words first."""
    words = concept.prompt_words
    if not words:
        return scene_prompt
    own = concept.class_word.strip() or "subject"
    wanted = sorted({w.strip() for w in class_words if w.strip()}, key=len, reverse=True)
    if not wanted:
        return f"{words}, {scene_prompt}"
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in wanted) + r")\b")
    out, n = pattern.subn(f"{words} {own}", scene_prompt)
    return out if n else f"{words} {own}, {scene_prompt}"


def check_masks(
    masks: torch.Tensor, n_concepts: int, width: int | None = None, height: int | None = None
) -> torch.Tensor:
    """``[N, H, W]`` float masks, one per concept; refused when the count or the aspect ratio is wrong."""
    m = masks.float()
    m = m[None] if m.ndim == 2 else m
    if m.ndim != 3:
        raise ConductorError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    if m.shape[0] != n_concepts:
        raise ConductorError(
            f"{m.shape[0]} mask(s) for {n_concepts} concept(s): give exactly one mask (or labelled box) per concept, "
            "in stack order."
        )
    if width is not None and height is not None:
        from .masks import masks_at

        try:
            masks_at(m, (height // 8, width // 8))
        except ValueError as e:
            raise ConductorError(f"{e}. Give masks of the sampled image's size ({width}x{height}).") from None
    empty = [i + 1 for i in range(m.shape[0]) if float(m[i].max()) <= 0]
    if empty:
        raise ConductorError(
            f"the mask of concept {', '.join(map(str, empty))} is empty: draw its box inside the image."
        )
    return m.clamp(0, 1)


def conductor_model(model, stack: ConceptStack, node: str):
    """A clone of ``model`` with each concept's UNet adapter scoped to its own branch's rows."""
    from ..scoped_lora.adapters import resolve_concept
    from ..scoped_lora.runtime import Scope, ScopedConcept, install_scoped_lora

    clone = model.clone()
    items = []
    for i, concept in enumerate(stack):
        resolved = resolve_concept(clone, concept)
        if not resolved.factors and not concept.words:
            raise ConductorError(
                f"concept {i + 1} ({concept.name}) brings nothing to its branch: no UNet layers at strength "
                f"{concept.strength_unet:g} and no prompt words. Give it an ED-LoRA or a LoRA with UNet layers "
                "(and a non-zero strength)."
            )
        if resolved.factors:
            items.append(ScopedConcept(resolved, Scope(row_tags=frozenset({ROW_TAG.format(i=i)}), cond_kinds=None)))
    if items:
        install_scoped_lora(clone, items, node)
    return clone


def tag_rows(conditioning: list, i: int) -> list:
    from ..scoped_lora.runtime import ROW_TAGS_KEY

    return [[c, {**d, ROW_TAGS_KEY: (ROW_TAG.format(i=i),)}] for c, d in conditioning]


def build_guider(node: str, model, clip, stack: ConceptStack, scene_prompt: str, negative: str, cfg: float,
                 masks: torch.Tensor, settings: ConductorSettings, prompts: list[str] | None = None,
                 reference_latent: torch.Tensor | None = None,
                 size: tuple[int, int] | None = None, scene: tuple[list, list] | None = None) -> ConductorGuider:  # fmt: skip
    """The guider: base branch on ``scene_prompt``, one branch per concept (``prompts`` or ``branch_prompt``).

    ``size``: ``(width, height)`` in pixels of the image it is built for; sampling another size is refused.
    ``scene``: the base branch's ``(positive, negative)`` conditionings (e.g. carrying a ControlNet) instead of
    ``scene_prompt`` and ``negative`` encoded; the reference run reads them too.
    """
    from ..edlora.clip import LAYERWISE_KEY
    from ..edlora.model import add_layerwise_routing, check_compatible
    from ..mixofshow.encoding import concept_clip, encode
    from ..scene_conditioning import with_control_of

    if not (scene_prompt or "").strip():
        raise ConductorError("scene_prompt is empty: describe the scene with class words ('a man and a dog').")
    concepts = list(stack)
    masks = check_masks(masks, len(concepts))
    for concept in concepts:
        if concept.kind == "edlora":
            check_compatible(model, clip, concept.adapter, concept.source)
    class_words = [c.class_word for c in concepts]
    prompts = prompts or [branch_prompt(scene_prompt, c, class_words) for c in concepts]
    branch_conds = []
    for i, concept in enumerate(concepts):
        own = concept_clip(clip, [concept], [concept])
        branch_conds.append((tag_rows(encode(own, prompts[i]), i), tag_rows(encode(own, negative or ""), i)))
    clone = conductor_model(model, stack, node)
    if any(LAYERWISE_KEY in d for pos, neg in branch_conds for _, d in pos + neg):
        add_layerwise_routing(clone)
    state = ConductorState(conductor_layers(clone.model.diffusion_model), masks, settings, node)
    install_conductor(clone, state)
    guider = ConductorGuider(clone, state, reference_latent, size)
    guider.set_cfg(cfg)
    positive, negative_c = scene if scene is not None else (encode(clip, scene_prompt), encode(clip, negative or ""))
    # the scene's control acts on every branch: they must share one batched call, which only equal controls allow
    branch_conds = [(with_control_of(p, positive), with_control_of(n, negative_c)) for p, n in branch_conds]
    (positive, negative_c), *branch_conds = equal_token_lengths([(positive, negative_c)] + branch_conds, node)
    guider.set_conductor_conds(positive, negative_c, branch_conds)
    guider.prompts = prompts
    return guider


MAX_TOKEN_REPEAT = 4  # ComfyUI's own limit on padding a prompt by repetition (comfy/conds.py CONDCrossAttn)


def equal_token_lengths(pairs: list[tuple[list, list]], node: str) -> list[tuple[list, list]]:
    """Every branch's conditionings repeated along the tokens to one common length, so ComfyUI batches them into
    the one call the branches must share. ComfyUI pads by repetition itself, which leaves attention unchanged,
    but only relative to the batch's first cond; a long prompt beside prompts of other lengths (3 and 4 sections
    of 77 tokens) would otherwise be split into separate calls. Refused when the common length is more than
    :data:`MAX_TOKEN_REPEAT` times the longest prompt."""
    import math

    lengths = {int(c[0].shape[1]) for pos, neg in pairs for c in pos + neg if c[0] is not None}
    if len(lengths) <= 1:
        return pairs
    common = math.lcm(*lengths)
    if common > MAX_TOKEN_REPEAT * max(lengths):
        sections = sorted({n // 77 if n % 77 == 0 else n for n in lengths})
        raise ConductorError(
            f"{node}: the prompts encode to {', '.join(str(n) for n in sorted(lengths))} tokens ({sections} sections "
            f"of 77); every branch must run in one model call, which needs lengths that divide one another (a "
            "common length at most 4x the longest). Shorten the long prompt (or the others) so the section counts "
            "divide each other, e.g. 1 and 3."
        )

    def pad(cond: list) -> list:
        return [[c[0].repeat(1, common // c[0].shape[1], 1) if c[0] is not None else None, c[1]] for c in cond]

    return [(pad(pos), pad(neg)) for pos, neg in pairs]


def parse_prompts(text: str, stack: ConceptStack, scene_prompt: str, regions=None) -> list[str]:
    """Each branch's prompt: its line of ``text`` ('label: prompt' or plain lines in stack order), else its
    region's prompt, else :func:`branch_prompt`."""
    from ..omg.stages import OMGError, parse_concept_prompts

    try:
        given = parse_concept_prompts(text, stack)
    except OMGError as e:
        raise ConductorError(str(e)) from None
    by_label = {}
    for r in getattr(regions, "regions", ()) or ():
        if r.label and r.prompt.strip():
            by_label.setdefault(r.label, r.prompt.strip())
    class_words = [c.class_word for c in stack]
    return [
        given.get(i) or by_label.get(c.label) or branch_prompt(scene_prompt, c, class_words)
        for i, c in enumerate(stack)
    ]


def mask_preview(image: torch.Tensor | None, masks: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """The masks ``[N, H, W]`` tinted over ``image`` (or grey), each outlined by its bounding box and labelled."""
    from ..omg.stages import PALETTE
    from ..regions.layout import Region, Regions
    from ..regions.preview import draw_regions

    _, height, width = masks.shape
    regions = []
    for i, (m, label) in enumerate(zip(masks, labels, strict=True)):
        on = m > 0.5
        if bool(on.any()):
            rows, cols = on.any(dim=1).nonzero().flatten(), on.any(dim=0).nonzero().flatten()
            box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
        else:
            box = (0.0, 0.0, float(width), float(height))
        regions.append(Region(box=box, label=label, color=PALETTE[i % len(PALETTE)], mask=m.float()))
    return draw_regions(Regions(width=width, height=height, regions=tuple(regions)), image, fill_alpha=0.45)
