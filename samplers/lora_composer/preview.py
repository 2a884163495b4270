"""Pictures of LoRA-Composer's attention maps: per chosen step, each concept's map over the image with its
box outlined, and the loss when a latent step ran (PIL + torch)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..regions.preview import _rgb
from .losses import bounding_rect

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def pick_steps(recorded: list[int], text: str, count: int = 4) -> list[int]:
    """Steps (1-based in ``text``: '1, 5, 10') among ``recorded`` (0-based); empty text: ``count`` spread out."""
    if not recorded:
        return []
    if text and text.strip():
        wanted = []
        for part in text.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if not part.lstrip("-").isdigit():
                raise ValueError(f"steps: '{part}' is not a step number; write e.g. '1, 5, 10'")
            wanted.append(int(part) - 1)
        missing = [s + 1 for s in wanted if s not in recorded]
        if missing:
            raise ValueError(
                f"steps {missing} were not sampled (the run had steps 1..{max(recorded) + 1}); choose among those"
            )
        return wanted
    if len(recorded) <= count:
        return list(recorded)
    idx = np.linspace(0, len(recorded) - 1, count).round().astype(int)
    return [recorded[i] for i in sorted(set(idx.tolist()))]


def _heat(values: np.ndarray) -> np.ndarray:
    """``[h, w]`` in 0..1 -> RGB (black - red - yellow - white)."""
    v = np.clip(values, 0, 1)[..., None]
    return np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def draw_attention_maps(history: dict, steps: list[int], labels: list[str], masks: torch.Tensor, size: tuple[int, int],
                        image: torch.Tensor | None = None, panel: int = 256) -> torch.Tensor:  # fmt: skip
    """``[1, H, W, 3]``: a row per step, a column per concept. ``masks [C, h, w]`` each concept's box at the map
    resolution; ``size`` the image's ``(height, width)``; ``image`` an optional ``[B, H, W, 3]`` to draw on."""
    h_img, w_img = size
    scale = panel / max(h_img, w_img)
    pw, ph = max(1, round(w_img * scale)), max(1, round(h_img * scale))
    head = 14
    cols, rows = max(1, len(labels)), max(1, len(steps))
    sheet = Image.new("RGB", (cols * pw, rows * (ph + head)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    base = None
    if image is not None:
        b = image[0, ..., :3].detach().float().cpu().permute(2, 0, 1)[None]
        base = torch.nn.functional.interpolate(b, size=(ph, pw), mode="bilinear", align_corners=False)[0]
        base = base.permute(1, 2, 0).clamp(0, 1).numpy()
    for r, step in enumerate(steps):
        record = history.get(step)
        for c, label in enumerate(labels):
            x0, y0 = c * pw, r * (ph + head)
            color = _rgb(PALETTE[c % len(PALETTE)])
            text = f"step {step + 1} · {label}"
            if record is not None and record.loss is not None and c < len(record.loss["concepts"]):
                text += f" · loss {sum(record.loss['concepts'][c].values()):.2f}"
            draw.text((x0 + 3, y0 + 1), text[:60], fill=color, font=font)
            if record is None or c >= len(record.maps):
                continue
            m = record.maps[c].float().sum(0)
            m = m / m.max().clamp(min=1e-12)
            up = torch.nn.functional.interpolate(m[None, None], size=(ph, pw), mode="bilinear", align_corners=False)
            heat = _heat(up[0, 0].numpy())
            pixels = heat if base is None else 0.45 * base + 0.55 * heat
            tile = Image.fromarray((pixels * 255).round().astype(np.uint8))
            sheet.paste(tile, (x0, y0 + head))
            rect = bounding_rect(masks[c].bool())
            if rect is not None:
                gy, gx = masks.shape[-2:]
                by0, by1 = y0 + head + rect[0] * ph / gy, y0 + head + rect[1] * ph / gy
                bx0, bx1 = x0 + rect[2] * pw / gx, x0 + rect[3] * pw / gx
                draw.rectangle([bx0, by0, bx1 - 1, by1 - 1], outline=color, width=2)
    return torch.from_numpy(np.asarray(sheet).astype(np.float32) / 255.0)[None]
