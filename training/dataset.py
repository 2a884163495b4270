"""Training pictures: fitting images and subject masks to the training resolution (pure torch).

Every image is trained square at ``resolution × resolution`` (Mix-of-Show trains at 512²): scaled so its
shorter side is ``resolution`` and centre-cropped on the longer side. Its mask gets the same scale and crop,
so it keeps covering the same pixels. A picture more than 2× smaller than the resolution is refused —
upscaled that far it would teach the concept blur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import short_side_to

MAX_UPSCALE = 2.0


class DatasetError(ValueError):
    """Pictures or masks that cannot be trained on; the message says which and what to do."""


def _fit(x: torch.Tensor, resolution: int, mode: str, crop: bool = True) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, R, R]``: shorter side to ``R``, centre crop. Without ``crop``: shorter side
    to ``R`` only (for Mix-of-Show's augmentation, which crops and places each sample itself)."""
    if not crop:
        return torch.stack([short_side_to(img, resolution) for img in x]).clamp(0, 1)
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        if mode == "bicubic":
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=scale < 1).clamp(0, 1)
        else:
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[..., top : top + resolution, left : left + resolution]


def fit_images(images: torch.Tensor, resolution: int, crop: bool = True) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (0..1) -> ``[B, H', W', 3]`` at ``resolution²`` (alpha dropped); without
    ``crop`` the shorter side is ``resolution`` and the aspect is kept."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise DatasetError("no images: connect a batch of training pictures (IMAGE)")
    if images.shape[-1] not in (1, 3, 4):
        raise DatasetError(f"images have {images.shape[-1]} channels; expected RGB")
    if resolution % 64 != 0 or resolution < 64:
        raise DatasetError(f"the resolution must be a multiple of 64 (got {resolution})")
    h, w = images.shape[1:3]
    if min(h, w) * MAX_UPSCALE < resolution:
        raise DatasetError(
            f"the images are {w}×{h}: too small to train at {resolution}² (the shorter side must be at least "
            f"{int(resolution / MAX_UPSCALE)} px). Use larger pictures or a lower resolution."
        )
    if not bool(torch.isfinite(images).all()):
        raise DatasetError("the images contain NaN or infinite values")
    x = images[..., :3].float()
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    x = x.permute(0, 3, 1, 2)
    return _fit(x, resolution, "bicubic", crop).permute(0, 2, 3, 1).contiguous()


def fit_masks(
    masks: torch.Tensor | None, num_images: int, image_hw: tuple[int, int], resolution: int, crop: bool = True
) -> torch.Tensor | None:
    """Subject masks -> ``[B, R, R]`` in [0, 1], cropped like the images; ``None`` stays ``None``.

    ``masks`` is ComfyUI's MASK, ``[B, H, W]`` (or ``[H, W]``: one mask for all images). It must be one per
    image (or one), and of the images' size or at least their aspect ratio.
    """
    if masks is None:
        return None
    m = masks.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise DatasetError(f"subject masks must be a MASK batch [B, H, W], got shape {list(masks.shape)}")
    if m.shape[0] == 1 and num_images > 1:
        m = m.expand(num_images, -1, -1)
    if m.shape[0] != num_images:
        raise DatasetError(
            f"{m.shape[0]} subject masks for {num_images} images: give one mask per image (or one for all)"
        )
    h, w = image_hw
    mh, mw = m.shape[1:]
    if abs(mh / mw - h / w) > 0.02:
        raise DatasetError(
            f"the subject masks are {mw}×{mh} but the images {w}×{h}: make them from the same pictures (e.g. the SAM "
            "node on these images)"
        )
    if not bool(torch.isfinite(m).all()):
        raise DatasetError("the subject masks contain NaN or infinite values")
    m = m.clamp(0, 1)
    empty = [i + 1 for i in range(m.shape[0]) if float(m[i].max()) <= 0]
    if empty:
        raise DatasetError(f"subject mask(s) {empty} are empty: every image needs its subject marked")
    if not crop and tuple(m.shape[1:]) != (h, w):  # same pixels as the images before the shorter side is set
        m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return _fit(m[:, None], resolution, "bilinear", crop)[:, 0].clamp(0, 1).contiguous()
