"""Scores of one or more runs as a Markdown table, JSON, and a bar chart IMAGE (PIL + torch, no plotting library)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .scores import EvalScores

RUN_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # fmt: skip
MEAN = "mean"


def _x100(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def run_names(runs: list[EvalScores]) -> list[str]:
    return [r.run or f"run {i + 1}" for i, r in enumerate(runs)]


def markdown_table(runs: list[EvalScores]) -> str:
    """One row per run and concept, then the run's mean row (CLIP-T there: whole images vs the prompt)."""
    names = run_names(runs)
    lines = ["| run | concept | CLIP-I | CLIP-T | SA | NSD |", "|---|---|---:|---:|---:|---:|"]
    for name, r in zip(names, runs, strict=True):
        for c in r.concepts:
            lines.append(
                f"| {name} | {c.label} | {_x100(c.clip_i)} | {_x100(c.clip_t)} | {_x100(c.sa)} | {_x100(c.nsd)} |"
            )
        lines.append(
            f"| {name} | **{MEAN}** | **{_x100(r.clip_i)}** | **{_x100(r.clip_t)}** | {_x100(r.sa)} | {_x100(r.nsd)} |"
        )
    lines.append("")
    lines.append("Scores x100 (cosines of CLIP embeddings). Per concept: its box crop (or the whole image) against its "
                 "references; CLIP-T against its own prompt. Mean row: CLIP-I averaged over concepts, CLIP-T of the "
                 "whole images against the prompt with concept words replaced by class words:")  # fmt: skip
    for name, r in zip(names, runs, strict=True):
        lines.append(f'- {name}: {r.images} image(s), CLIP-T text "{r.text}"' + "".join(f"; {n}" for n in r.notes))
    return "\n".join(lines)


def scores_json(runs: list[EvalScores]) -> str:
    return json.dumps({"version": 1, "runs": [r.as_dict() for r in runs]}, indent=2)


def chart_image(runs: list[EvalScores], width: int = 768, height: int = 400) -> torch.Tensor:
    """ComfyUI IMAGE ``[1, H, W, 3]``: one panel per score (CLIP-I, CLIP-T, and SA / NSD when measured), a group
    of bars per concept (and the mean), one bar per run, values x100 written on the bars."""
    metrics = [("CLIP-I", "clip_i"), ("CLIP-T", "clip_t")]
    if any(c.sa is not None for r in runs for c in r.concepts):
        metrics += [("SA", "sa"), ("NSD", "nsd")]
    labels: list[str] = []
    for r in runs:
        labels += [c.label for c in r.concepts if c.label not in labels]
    groups = [*labels, MEAN]
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    names = run_names(runs)
    # legend
    x = 8
    for i, name in enumerate(names):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        draw.rectangle([x, 8, x + 10, 18], fill=colour)
        draw.text((x + 14, 7), name[:28], fill=(20, 20, 20), font=font)
        x += 24 + 6 * min(len(name), 28)
    top, bottom = 34, height - 30
    panel_w = (width - 16) / len(metrics)
    for p, (title, attr) in enumerate(metrics):
        px0 = 8 + p * panel_w
        px1 = px0 + panel_w - 8
        draw.rectangle([px0, top, px1, bottom], outline=(170, 170, 170))
        draw.text((px0 + 4, top + 3), title + " x100", fill=(20, 20, 20), font=font)
        values = []
        for r in runs:
            row = {c.label: getattr(c, attr) for c in r.concepts}
            row[MEAN] = getattr(r, attr)
            values.append([row.get(g) for g in groups])
        finite = [abs(v) for vs in values for v in vs if v is not None and np.isfinite(v)]
        scale = max(finite) if finite else 1.0
        scale = max(scale, 1e-6)
        base = (top + 18 + bottom) / 2 if any(v < 0 for vs in values for v in vs if v is not None) else bottom
        span = base - (top + 18)
        draw.line([px0, base, px1, base], fill=(120, 120, 120))
        gw = (px1 - px0 - 8) / len(groups)
        bw = max(2.0, (gw - 6) / max(1, len(runs)))
        for gi, group in enumerate(groups):
            gx = px0 + 4 + gi * gw
            draw.text((gx + 2, bottom + 4), group[: max(3, int(gw / 6))], fill=(60, 60, 60), font=font)
            for ri, vs in enumerate(values):
                v = vs[gi]
                if v is None or not np.isfinite(v):
                    continue
                bx0 = gx + 3 + ri * bw
                h = span * v / scale
                y0, y1 = (base - h, base) if h >= 0 else (base, base - h)
                draw.rectangle([bx0, y0, bx0 + bw - 2, y1], fill=RUN_COLOURS[ri % len(RUN_COLOURS)])
                if bw >= 24:
                    text = f"{100 * v:.1f}"
                    draw.text((bx0 + 1, (y0 - 11) if h >= 0 else y1 + 1), text, fill=(30, 30, 30), font=font)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
