"""CLIP-I, CLIP-T and SID's subject alignment / non-subject disentanglement (DESIGN.md §4). Torch only.

For a batch of generated images ``g`` and, per concept, reference images ``r`` (and optionally subject masks
``s`` of them, e.g. from SAM), with ``f`` the normalised CLIP image embedding and ``t`` the text embedding:

* CLIP-I(concept) = mean over pairs (n, m) of ``f(r_n) · f(crop(g_m))``, the crop being the concept's box
  when boxes are given (LoRA-Composer's protocol), else the whole image;
* CLIP-T(image) = mean over m of ``f(g_m) · t(prompt')``, ``prompt'`` = the prompt with each concept's words
  replaced by its class word ("a <cat1> <cat2> cat on a sofa" -> "a cat on a sofa"); per concept, the crop
  against the concept's own (box) prompt, or "a photo of a <class word>";
* SA(concept) = mean ``f(r_n ⊙ s_n) · f(crop(g_m))``; NSD(concept) = 1 - mean ``f(r_n ⊙ (1 - s_n)) · f(crop(g_m))``
  (SID, Kim et al. 2024: masked pixels are set to black).

Scores are cosines in [-1, 1]; tables print them x100 as the papers do.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


class EvaluationError(ValueError):
    """Inputs that cannot be scored; the message says which and what to change."""


@dataclass
class ConceptReference:
    """One concept's reference pictures and how prompts name it."""

    label: str
    references: torch.Tensor  # IMAGE [N, H, W, 3] in 0..1
    masks: torch.Tensor | None = None  # MASK [N, H, W]: 1 = the subject (for SA / NSD)
    class_word: str = ""
    words: tuple[str, ...] = ()
    prompt: str = ""  # the concept's own prompt (its box's), for its per-concept CLIP-T


@dataclass
class ConceptScores:
    label: str
    clip_i: float
    clip_t: float | None
    sa: float | None
    nsd: float | None
    text: str  # what the crop's CLIP-T was measured against
    box: Box | None
    references: int


@dataclass
class EvalScores:
    """The scores of one run (one batch of generated images)."""

    run: str
    prompt: str
    text: str  # the prompt after the class-word substitution (CLIP-T's text)
    images: int
    clip_i: float  # mean over concepts
    clip_t: float | None  # whole images against ``text``
    concepts: list[ConceptScores] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def per_concept(self) -> list[ConceptScores]:
        return self.concepts

    @property
    def sa(self) -> float | None:
        values = [c.sa for c in self.concepts if c.sa is not None]
        return sum(values) / len(values) if values else None

    @property
    def nsd(self) -> float | None:
        values = [c.nsd for c in self.concepts if c.nsd is not None]
        return sum(values) / len(values) if values else None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["sa"], out["nsd"] = self.sa, self.nsd
        for c in out["concepts"]:
            c["box"] = list(c["box"]) if c["box"] is not None else None
        return out


# -- text -----------------------------------------------------------------------------------------------


def substitute_class_words(prompt: str, concepts) -> str:
    """``prompt`` with each run of a concept's words replaced by its class word (a class word right after the
    run is kept once, not doubled); concepts are ``(words, class_word)`` pairs. Spaces are tidied."""
    text = prompt
    for words, class_word in concepts:
        words = [w for w in words if w]
        if not words:
            continue
        alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        run = rf"(?<![\w<>])(?:{alt})(?:\s*(?:{alt}))*"
        if class_word:
            text = re.sub(run + rf"(?:\s+{re.escape(class_word)}\b)?", class_word, text)
        else:
            text = re.sub(run, "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:!?])", r"\1", text)
    return text.strip()


# -- pixels ---------------------------------------------------------------------------------------------


def check_image(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EvaluationError(f"{what} is not an IMAGE batch [N, H, W, 3] (got {shape})")
    if images.shape[0] == 0 or images.shape[1] < 2 or images.shape[2] < 2:
        raise EvaluationError(f"{what} is empty ({tuple(images.shape)})")
    images = images[..., :3].float()
    if not torch.isfinite(images).all():
        raise EvaluationError(f"{what} holds NaN or infinite pixels")
    return images


def crop(images: torch.Tensor, box: Box) -> torch.Tensor:
    """Exactly the box's pixels of every image: ``images[:, y0:y1, x0:x1]``."""
    x0, y0, x1, y1 = box
    h, w = images.shape[1:3]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise EvaluationError(f"box {box} is not inside the {w}x{h} image")
    return images[:, y0:y1, x0:x1, :]


def masked(images: torch.Tensor, masks: torch.Tensor, inside: bool) -> torch.Tensor:
    """The pixels inside (or outside) the binary mask (> 0.5) kept, the rest black, as SID's ``r ⊙ s``."""
    keep = masks > 0.5 if inside else masks <= 0.5
    return images * keep[..., None].to(images.dtype)


def preprocess(images: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """CLIP's preprocessing on IMAGE tensors: shorter side resized to the model's size (bicubic, antialiased),
    centre crop, normalised. ``[N, H, W, 3]`` in 0..1 -> ``[N, 3, h, w]``."""
    x = images.permute(0, 3, 1, 2)
    th, tw = size
    h, w = x.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[..., top : top + th, left : left + tw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def embed_images(clip, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Normalised image embeddings ``[N, D]`` (float32, on the CPU)."""
    out = []
    for i in range(0, images.shape[0], batch):
        x = preprocess(images[i : i + batch].to(clip.device, torch.float32), clip.image_size, clip.mean, clip.std)
        out.append(clip.model.encode_image(x.to(clip.dtype), normalize=True).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(clip, texts: list[str]) -> torch.Tensor:
    tokens = clip.tokenizer(list(texts)).to(clip.device)
    return clip.model.encode_text(tokens, normalize=True).float().cpu()


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over all pairs of rows (both already normalised)."""
    return float((a @ b.T).mean())


# -- scoring --------------------------------------------------------------------------------------------


def checked_reference(ref: ConceptReference) -> tuple[torch.Tensor, torch.Tensor | None]:
    images = check_image(ref.references, f"the references of '{ref.label}'")
    masks = ref.masks
    if masks is not None:
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3:
            raise EvaluationError(f"the reference masks of '{ref.label}' are not a MASK [N, H, W]")
        if tuple(masks.shape[1:]) != tuple(images.shape[1:3]):
            raise EvaluationError(
                f"the reference masks of '{ref.label}' are {masks.shape[2]}x{masks.shape[1]} but its reference images "
                f"are {images.shape[2]}x{images.shape[1]}: make the masks from these images (e.g. SAM Masks on them)"
            )
        if masks.shape[0] not in (1, images.shape[0]):
            raise EvaluationError(
                f"'{ref.label}' has {images.shape[0]} reference images but {masks.shape[0]} masks: one mask per image "
                "(or one for all)"
            )
        masks = masks.float().to(images.device).expand(images.shape[0], -1, -1)
        if not (masks > 0.5).any():
            raise EvaluationError(f"the reference masks of '{ref.label}' are empty: nothing of the subject is kept")
    return images, masks


def score_images(
    clip, images: torch.Tensor, prompt: str, references: list[ConceptReference], boxes: dict[str, Box] | None = None,
    run: str = "",
) -> EvalScores:  # fmt: skip
    """Every score of one batch of generated images against each concept's references."""
    images = check_image(images, "the generated images")
    if not references:
        raise EvaluationError("no concept references: add an Evaluation References node per concept")
    labels = [r.label for r in references]
    if len(set(labels)) != len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise EvaluationError(f"the label {twice[0]!r} is given to two reference sets: give each concept its own label")
    notes = []
    gen_full = embed_images(clip, images)
    pairs = [(r.words, r.class_word) for r in references]
    text = substitute_class_words(prompt or "", pairs)
    clip_t = None
    if text:
        clip_t = mean_cosine(gen_full, embed_texts(clip, [text]))
    else:
        notes.append("no prompt: CLIP-T not measured")
    results = []
    for ref in references:
        ref_images, ref_masks = checked_reference(ref)
        box = (boxes or {}).get(ref.label) if boxes is not None else None
        if boxes is not None and box is None:
            raise EvaluationError(
                f"the concept '{ref.label}' has no box in the regions (boxes: {', '.join(sorted(boxes)) or 'none'}): "
                "give its box that label, or its references the box's label"
            )
        gen = embed_images(clip, crop(images, box)) if box is not None else gen_full
        clip_i = mean_cosine(embed_images(clip, ref_images), gen)
        own = substitute_class_words(ref.prompt, pairs) if ref.prompt.strip() else ""
        own = own or (f"a photo of a {ref.class_word}" if ref.class_word else "")
        concept_t = mean_cosine(gen, embed_texts(clip, [own])) if own else None
        sa = nsd = None
        if ref_masks is not None:
            sa = mean_cosine(embed_images(clip, masked(ref_images, ref_masks, inside=True)), gen)
            nsd = 1.0 - mean_cosine(embed_images(clip, masked(ref_images, ref_masks, inside=False)), gen)
        results.append(ConceptScores(ref.label, clip_i, concept_t, sa, nsd, own, box, int(ref_images.shape[0])))
    mean_i = sum(c.clip_i for c in results) / len(results)
    for value in (mean_i, clip_t):
        if value is not None and not math.isfinite(value):
            raise EvaluationError("a score is not finite: the CLIP model gives NaN embeddings (a broken file?)")
    return EvalScores(run, prompt or "", text, int(images.shape[0]), mean_i, clip_t, results, notes)


def boxes_for_images(regions_boxes: dict[str, tuple[float, float, float, float]], regions_size: tuple[int, int],
                     image_size: tuple[int, int]) -> dict[str, Box]:  # fmt: skip
    """Region boxes (pixels of the regions' ``(width, height)``) in pixels of the images, rounded outward.
    Images of another size are fine when the aspect ratio is the same (an upscale); else an error."""
    rw, rh = regions_size
    iw, ih = image_size
    if abs(rw / rh - iw / ih) > 0.01 * (iw / ih):
        raise EvaluationError(
            f"the images are {iw}x{ih} but the regions are for {rw}x{rh} (another aspect ratio): set the Regions "
            "node to the size the images were made at"
        )
    sx, sy = iw / rw, ih / rh
    out = {}
    for label, (x0, y0, x1, y1) in regions_boxes.items():
        box = (max(0, math.floor(x0 * sx + 1e-6)), max(0, math.floor(y0 * sy + 1e-6)),
               min(iw, math.ceil(x1 * sx - 1e-6)), min(ih, math.ceil(y1 * sy - 1e-6)))  # fmt: skip
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            raise EvaluationError(f"the box of '{label}' is smaller than 2 pixels in the {iw}x{ih} images")
        out[label] = box
    return out
