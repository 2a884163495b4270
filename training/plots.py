"""The loss curve as a picture (PIL + torch; no plotting library needed)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 28, 36


def moving_average(values: list[float], window: int) -> list[float]:
    if not values:
        return []
    window = max(1, min(window, len(values)))
    csum = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    out = []
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out.append(float((csum[i + 1] - csum[lo]) / (i + 1 - lo)))
    return out


def loss_curve_image(losses: list[float], title: str = "training loss", first_step: int = 1) -> torch.Tensor:
    """ComfyUI IMAGE ``[1, H, W, 3]``: each step's loss (light dots) and its moving average (line)."""
    img = Image.new("RGB", (WIDTH, HEIGHT), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    draw.text((x0, 6), title, fill=(20, 20, 20), font=font)
    values = [v for v in losses if np.isfinite(v)]
    if not values:
        draw.text((x0 + 10, (y0 + y1) // 2), "no steps yet", fill=(90, 90, 90), font=font)
    else:
        lo, hi = min(values), max(values)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
        n = len(losses)

        def xy(i, v):
            x = x0 + (x1 - x0) * (i / max(n - 1, 1))
            y = y1 - (y1 - y0) * ((v - lo) / (hi - lo))
            return x, y

        for i, v in enumerate(losses):
            if np.isfinite(v):
                x, y = xy(i, v)
                draw.point((x, y), fill=(150, 180, 220))
        smooth = moving_average(losses, max(1, n // 20))
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 70, 160), width=2)
        for frac in (0.0, 0.5, 1.0):
            v = lo + (hi - lo) * frac
            draw.text((4, y1 - (y1 - y0) * frac - 6), f"{v:.4g}", fill=(60, 60, 60), font=font)
        draw.text((x0, y1 + 8), f"step {first_step}", fill=(60, 60, 60), font=font)
        last = f"step {first_step + n - 1}   last {losses[-1]:.4g}"
        draw.text((x1 - 7 * len(last), y1 + 8), last, fill=(60, 60, 60), font=font)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
