"""Mix-of-Show's training augmentations, as functions of tensors and strings (no ComfyUI).

* :func:`official_crop` — ``HumanResizeCropFinalV3(size, crop_p=0.5)`` of ``mixofshow/data/pil_transform.py``:
  shorter side to the resolution; half the time a crop (portrait pictures: a top-anchored crop of random height,
  so heads are kept; others: a random square); the result scaled so its long edge fits the resolution and put at
  a random place on a black square canvas. It returns the picture's own area too: the loss counts only that
  (``trainer_edlora.py`` l. 247-252 divides by the subject mask, or by this area when there is none).
* :func:`shuffle_caption` / :func:`template_caption` — ``ShuffleCaption(keep_token_num=1)`` (the comma-separated
  parts after the first are shuffled) and ``EnhanceText`` (the whole caption goes into a random template, "a
  photo of a {}"); every official config uses the ``human`` templates.

Randomness comes from a ``random.Random`` the caller seeds per step and picture, so a resumed run draws what
the uninterrupted run drew.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

CROP_PROBABILITY = 0.5

# EnhanceText's template lists (mixofshow/data/pil_transform.py), written out as data.
TEMPLATES = {
    "human": (
        "a photo of a {}", "a photo of one {}", "a photo of the {}", "the photo of a {}", "a rendering of a {}",
        "a rendition of the {}", "a rendition of a {}", "a cropped photo of the {}", "a cropped photo of a {}",
        "a bad photo of the {}", "a bad photo of a {}", "a photo of a weird {}", "a weird photo of a {}",
        "a bright photo of the {}", "a good photo of the {}", "a photo of a nice {}", "a good photo of a {}",
        "a photo of a cool {}", "a bright photo of the {}",
    ),
    "object": (
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
        "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
        "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
        "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
        "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
    ),
    "style": (
        "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
        "the painting in the style of {}", "a clean painting in the style of {}",
        "a dirty painting in the style of {}", "a dark painting in the style of {}", "a picture in the style of {}",
        "a cool painting in the style of {}", "a close-up painting in the style of {}",
        "a bright painting in the style of {}", "a cropped painting in the style of {}",
        "a good painting in the style of {}", "a close-up painting in the style of {}",
        "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
        "a weird painting in the style of {}", "a large painting in the style of {}",
    ),
}  # fmt: skip
CAPTION_MODES = ("shuffle + human templates", "shuffle + object templates", "shuffle + style templates",
                 "shuffle only", "off")  # fmt: skip
IMAGE_MODES = ("crop and place (official)", "centre crop")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, H, W]`` -> ``[C, h, w]``, bilinear with antialiasing when shrinking (as PIL's bilinear resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]


def short_side_to(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """torchvision's ``resize(img, size=R)``: the shorter side becomes ``R``, the longer ``int(R × long / short)``."""
    h, w = x.shape[-2:]
    if h <= w:
        size = (resolution, int(resolution * w / h))
    else:
        size = (int(resolution * h / w), resolution)
    return _resize(x, size)


def _long_edge_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """torchvision's ``resize(size=R − 1, max_size=R)``: shorter side ``R − 1`` unless the longer would pass ``R``."""
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = resolution - 1, int((resolution - 1) * long / short)
    if new_long > resolution:
        new_short, new_long = int(resolution * short / long), resolution
    return (new_short, new_long) if h <= w else (new_long, new_short)


def official_crop(image: torch.Tensor, mask: torch.Tensor | None, resolution: int, rng: random.Random,
                  crop_probability: float = CROP_PROBABILITY) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """One augmented training picture.

    ``image`` ``[3, H, W]`` and ``mask`` ``[H, W]`` (or ``None``) with the shorter side already at ``resolution``
    (:func:`short_side_to`). Returns the ``[3, R, R]`` canvas, the subject mask on it (0 off the picture) and the
    picture's own area (1 on the picture, 0 on the black border).
    """
    r = int(resolution)
    x = image
    m = mask[None] if mask is not None else None
    h, w = x.shape[-2:]
    if rng.random() < crop_probability:
        if h > w:  # portrait: keep the top (the head), a random amount of the rest
            keep = w + rng.randint(0, h - w)
            x = x[:, :keep, :]
            m = m[:, :keep, :] if m is not None else None
        else:  # landscape or square: a random R×R window
            left = rng.randint(0, w - r)
            top = rng.randint(0, h - r)
            x = x[:, top : top + r, left : left + r]
            m = m[:, top : top + r, left : left + r] if m is not None else None
    nh, nw = _long_edge_size(x.shape[-2], x.shape[-1], r)
    x = _resize(x, (nh, nw)).clamp(0, 1)
    top, left = rng.randint(0, r - nh), rng.randint(0, r - nw)
    canvas = x.new_zeros((x.shape[0], r, r))
    canvas[:, top : top + nh, left : left + nw] = x
    area = x.new_zeros((r, r))
    area[top : top + nh, left : left + nw] = 1.0
    subject = None
    if m is not None:
        subject = x.new_zeros((r, r))
        subject[top : top + nh, left : left + nw] = _resize(m, (nh, nw))[0].clamp(0, 1)
    return canvas, subject, area


def shuffle_caption(caption: str, rng: random.Random, keep: int = 1) -> str:
    """``ShuffleCaption``: split at commas, keep the first ``keep`` parts in place, shuffle the rest."""
    parts = [p.strip() for p in caption.strip().split(",")]
    fixed, flexible = parts[:keep], parts[keep:]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)


def template_caption(caption: str, kind: str, rng: random.Random) -> str:
    """``EnhanceText``: the whole caption put into a random template of ``kind`` (human, object, style)."""
    return rng.choice(TEMPLATES[kind]).format(caption.strip())


def augment_caption(caption: str, mode: str, rng: random.Random) -> str:
    """The caption of one training sample under ``mode`` (one of :data:`CAPTION_MODES`)."""
    if mode == "off":
        return caption
    text = shuffle_caption(caption, rng)
    if mode.startswith("shuffle + "):
        text = template_caption(text, mode.split()[2], rng)
    return text


def longest_template(mode: str) -> str:
    """The template of ``mode`` that adds the most words (to check captions fit the text encoder's window)."""
    if not mode.startswith("shuffle + "):
        return "{}"
    return max(TEMPLATES[mode.split()[2]], key=len)
