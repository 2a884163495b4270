"""Drawing regions over an image so users can check a layout without opening the widget (PIL + torch)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .layout import Regions


def _rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    try:
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    except (ValueError, IndexError):
        return 255, 0, 0


def draw_regions(regions: Regions, image: torch.Tensor | None = None, fill_alpha: float = 0.25) -> torch.Tensor:
    """``[1, H, W, 3]`` float image: ``image`` (or a neutral grey) with each region's mask tinted, its box
    outlined in its colour and its label (or prompt) written in the corner."""
    w, h = regions.width, regions.height
    if image is not None:
        base = image[0].detach().float().cpu().clamp(0, 1)
        if base.shape[0] != h or base.shape[1] != w:
            base = torch.nn.functional.interpolate(
                base.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False
            )[0].permute(1, 2, 0)
        canvas = base[..., :3].clone()
    else:
        canvas = torch.full((h, w, 3), 0.5)
    masks = regions.masks()
    for region, mask in zip(regions.regions, masks, strict=True):
        color = torch.tensor(_rgb(region.color), dtype=torch.float32) / 255.0
        a = (mask * fill_alpha)[..., None]
        canvas = canvas * (1 - a) + color * a
    pil = Image.fromarray((canvas.numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    line = max(1, round(min(w, h) / 200))
    for i, region in enumerate(regions.regions):
        x0, y0, x1, y1 = region.box
        color = _rgb(region.color)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=line)
        text = region.label or region.prompt[:40] or f"box {i + 1}"
        tx, ty = x0 + line + 2, y0 + line + 1
        bbox = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([bbox[0] - 2, bbox[1] - 1, bbox[2] + 2, bbox[3] + 1], fill=color)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((tx, ty), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]
