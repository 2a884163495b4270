"""Per-layer fusion residuals as a table and a picture (PIL + torch; no plotting library needed)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 760, 380
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 44, 40
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
STAGE_SHORT = {"text encoder": "TE", "cross-attention k/v": "k/v", "UNet": "UNet"}


def short_layer(key: str) -> str:
    """``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`` -> ``in1.0 attn1.to_q``."""
    k = key.removesuffix(".weight").removeprefix("diffusion_model.")
    for long, short in (("input_blocks.", "in"), ("output_blocks.", "out"), ("middle_block.", "mid"),
                        ("clip_l.transformer.text_model.encoder.layers.", "L"),
                        ("clip_g.transformer.text_model.encoder.layers.", "G"), (".transformer_blocks.", "."),
                        ("self_attn.", ""), ("encoder.layers.", "L")):  # fmt: skip
        k = k.replace(long, short)
    return k


def residual_table(reports: list[dict], names: list[str]) -> str:
    """Plain text: one row per layer, per concept the fused and the plain-sum relative error (in %)."""
    head = ["layer".ljust(34), "stage".ljust(5)] + [f"{n[:14]:>14} fused/sum" for n in names]
    lines = ["  ".join(head)]
    for r in reports:
        cells = [short_layer(r["layer"])[:34].ljust(34), STAGE_SHORT.get(r["stage"], r["stage"])[:5].ljust(5)]
        for f, s in zip(r["fused"], r["sum"], strict=True):
            cells.append(f"{100 * f:>14.2f} / {100 * s:<6.2f}")
        lines.append("  ".join(cells))
    lines.append(summary(reports, names))
    return "\n".join(lines)


def summary(reports: list[dict], names: list[str]) -> str:
    """One line per concept: mean and worst relative error of the fused layers, and of the plain sum."""
    if not reports:
        return "no layers were fused"
    out = []
    for i, n in enumerate(names):
        f = [r["fused"][i] for r in reports]
        s = [r["sum"][i] for r in reports]
        worst = max(range(len(reports)), key=lambda j: f[j])
        out.append(f"{n}: fused mean {100 * np.mean(f):.2f}% (worst {100 * f[worst]:.2f}% at "
                   f"{short_layer(reports[worst]['layer'])}); plain sum mean {100 * np.mean(s):.2f}%")  # fmt: skip
    return "\n".join(out)


def residual_plot(reports: list[dict], names: list[str], title: str = "fusion residuals") -> torch.Tensor:
    """ComfyUI IMAGE ``[1, H, W, 3]``: per layer (x, in fusion order) each concept's relative error, fused
    (solid) and plain sum (faint), so compromised layers stand out."""
    img = Image.new("RGB", (WIDTH, HEIGHT), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    draw.text((x0, 6), title, fill=(20, 20, 20), font=font)
    n = len(reports)
    values = [v for r in reports for v in r["fused"] + r["sum"] if np.isfinite(v)]
    hi = max(values) if values else 1.0
    hi = hi if hi > 0 else 1.0

    def xy(i, v):
        return x0 + (x1 - x0) * ((i + 0.5) / max(n, 1)), y1 - (y1 - y0) * min(v / hi, 1.0)

    stage_start = 0
    for i in range(1, n + 1):  # stage bands
        if i == n or reports[i]["stage"] != reports[stage_start]["stage"]:
            xa, _ = xy(stage_start - 0.5, 0)
            draw.line([(xa, y0), (xa, y1)], fill=(200, 200, 200))
            draw.text(
                (xa + 3, y1 + 6), STAGE_SHORT.get(reports[stage_start]["stage"], "?"), fill=(60, 60, 60), font=font
            )
            stage_start = i
    for c, name in enumerate(names):
        colour = COLOURS[c % len(COLOURS)]
        faint = tuple(int(v + (255 - v) * 0.65) for v in colour)
        for key, col in (("sum", faint), ("fused", colour)):
            pts = [xy(i, r[key][c]) for i, r in enumerate(reports)]
            if len(pts) > 1:
                draw.line(pts, fill=col, width=1 if key == "sum" else 2)
            for p in pts:
                draw.point(p, fill=col)
        draw.text((x0 + 8 + 150 * c, 24), f"{name[:18]} (faint: plain sum)", fill=colour, font=font)
    for frac in (0.0, 0.5, 1.0):
        draw.text((4, y1 - (y1 - y0) * frac - 6), f"{100 * hi * frac:.3g}%", fill=(60, 60, 60), font=font)
    draw.text((x1 - 200, y1 + 22), f"{n} layers, in fusion order", fill=(60, 60, 60), font=font)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
