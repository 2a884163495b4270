"""Regions: boxes with a prompt each, parsed from the region widget's JSON value (pure Python + torch).

The JSON value (the widget's state, saved in workflows and sent with API prompts) is::

    {"version": 1, "units": "fraction",
     "boxes": [{"x": 0.1, "y": 0.2, "w": 0.3, "h": 0.5,
                "prompt": "a <cat1> <cat2>", "negative": "", "label": "cat", "color": "#e6194b"}]}

Coordinates are **fractions of the image width/height** (top-left origin), so boxes keep their place when
the image size changes. Typed JSON may say ``"units": "px"`` to give pixels instead. Boxes partly outside
the image are clipped (with a warning); boxes fully outside or empty are errors naming the box.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import torch

MAX_REGIONS = 16
PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#000075",
)  # fmt: skip


class RegionError(ValueError):
    """Invalid region JSON; the message names the box and what to change."""


@dataclass(frozen=True)
class Region:
    """One region; ``box`` is ``(x0, y0, x1, y1)`` in pixels of the image, already clipped to it."""

    box: tuple[float, float, float, float]
    prompt: str = ""
    negative: str = ""
    label: str = ""
    color: str = ""
    mask: torch.Tensor | None = field(default=None, compare=False)  # [H, W] in 0..1 at image size

    @property
    def box_int(self) -> tuple[int, int, int, int]:
        """The box rounded outward to whole pixels."""
        x0, y0, x1, y1 = self.box
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


@dataclass(frozen=True)
class Regions:
    """What region nodes pass to sampling nodes (socket type ``REGIONS``)."""

    width: int
    height: int
    regions: tuple[Region, ...]
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.regions)

    def box_masks(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``[N, H, W]`` float masks, 1 inside each box (area-weighted on partly covered pixels)."""
        height = height or self.height
        width = width or self.width
        sx, sy = width / self.width, height / self.height
        return (
            torch.stack(
                [
                    box_mask((r.box[0] * sx, r.box[1] * sy, r.box[2] * sx, r.box[3] * sy), height, width)
                    for r in self.regions
                ]
            )
            if self.regions
            else torch.zeros(0, height, width)
        )

    def masks(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``[N, H, W]``: each region's own mask where it has one (e.g. from SAM), else its box."""
        height = height or self.height
        width = width or self.width
        boxes = self.box_masks(height, width)
        out = []
        for i, r in enumerate(self.regions):
            if r.mask is None:
                out.append(boxes[i])
            else:
                m = r.mask.float()
                if m.shape != (height, width):
                    m = torch.nn.functional.interpolate(
                        m[None, None], size=(height, width), mode="bilinear", align_corners=False
                    )[0, 0]
                out.append(m.clamp(0, 1))
        return torch.stack(out) if out else torch.zeros(0, height, width)

    def with_masks(self, masks: torch.Tensor) -> Regions:
        if masks.shape[0] != len(self.regions):
            raise RegionError(f"{masks.shape[0]} masks for {len(self.regions)} regions")
        return replace(self, regions=tuple(replace(r, mask=m) for r, m in zip(self.regions, masks, strict=True)))

    def bboxes(self) -> list[list[int]]:
        """Boxes as ``[x0, y0, x1, y1]`` integer pixels (the BBOX convention of SAM2 / KJNodes packs)."""
        return [list(r.box_int) for r in self.regions]

    def to_json(self) -> str:
        boxes = []
        for r in self.regions:
            x0, y0, x1, y1 = r.box
            boxes.append(
                {
                    "x": x0 / self.width,
                    "y": y0 / self.height,
                    "w": (x1 - x0) / self.width,
                    "h": (y1 - y0) / self.height,
                    "prompt": r.prompt,
                    "negative": r.negative,
                    "label": r.label,
                    "color": r.color,
                }
            )
        return json.dumps({"version": 1, "units": "fraction", "boxes": boxes})


def box_mask(box, height: int, width: int) -> torch.Tensor:
    """``[H, W]`` coverage of pixel cells by ``box = (x0, y0, x1, y1)`` (pixel units, may be fractional)."""
    x0, y0, x1, y1 = box
    xs = torch.arange(width, dtype=torch.float32)
    ys = torch.arange(height, dtype=torch.float32)
    cover_x = torch.clamp(
        torch.minimum(xs + 1, torch.tensor(float(x1))) - torch.maximum(xs, torch.tensor(float(x0))), 0, 1
    )
    cover_y = torch.clamp(
        torch.minimum(ys + 1, torch.tensor(float(y1))) - torch.maximum(ys, torch.tensor(float(y0))), 0, 1
    )
    return cover_y[:, None] * cover_x[None, :]


# Coordinates beyond this (in fractions, or pixels) are typing mistakes, and would overflow the arithmetic.
MAX_COORDINATE = 1.0e6


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = repr(value)
        raise RegionError(f"{what} must be a number, got {text if len(text) < 40 else text[:37] + '...'}")
    try:
        number = float(value)
    except OverflowError:  # a Python int with hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise RegionError(f"{what} must be a finite number, got {'a huge number' if math.isinf(number) else value!r}")
    if abs(number) > MAX_COORDINATE:
        raise RegionError(
            f"{what} is {number:g}; coordinates must lie between {-MAX_COORDINATE:g} and {MAX_COORDINATE:g}"
        )
    return number


def validate_regions_json(text) -> None:
    """The checks that need no image size (JSON form, box fields, numbers), for a node's ``validate_inputs``."""
    parse_regions(text, 1, 1, allow_empty=True, check_bounds=False)


def parse_regions(
    text: str | dict,
    width: int,
    height: int,
    max_regions: int = MAX_REGIONS,
    allow_empty: bool = False,
    check_bounds: bool = True,
) -> Regions:
    """Validate the widget/API JSON and return pixel-space, clipped regions.

    ``check_bounds=False`` skips the checks against the image (outside, clipping): for validation before
    the image size is known."""
    if width <= 0 or height <= 0:
        raise RegionError(f"image size must be positive, got {width}x{height}")
    if isinstance(text, str):
        if not text.strip():
            data = {"boxes": []}
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise RegionError(f"regions are not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
            except RecursionError:
                raise RegionError(
                    'regions JSON is nested too deeply; give one object with a flat "boxes" list'
                ) from None
    elif not isinstance(text, (dict, list)):
        raise RegionError(f"regions must be JSON text, got {type(text).__name__}")
    else:
        data = text
    if isinstance(data, list):
        data = {"boxes": data}
    if not isinstance(data, dict) or not isinstance(data.get("boxes"), list):
        raise RegionError('regions must be a JSON object with a "boxes" list')
    units = data.get("units", "fraction")
    if units not in ("fraction", "px"):
        raise RegionError(f'"units" must be "fraction" or "px", got {units!r}')
    boxes = data["boxes"]
    if not boxes and not allow_empty:
        raise RegionError("there are no boxes: draw at least one box (or add one to the JSON)")
    if len(boxes) > max_regions:
        raise RegionError(f"{len(boxes)} boxes given; at most {max_regions} are supported")

    sx, sy = (width, height) if units == "fraction" else (1.0, 1.0)
    regions, warnings = [], []
    for i, b in enumerate(boxes):
        name = f"box {i + 1}"
        if not isinstance(b, dict):
            raise RegionError(f"{name} must be an object with x, y, w, h")
        label = str(b.get("label", "") or "")
        if label:
            name += f" ('{label}')"
        try:
            x, y, w, h = (_number(b[k], f"{name}: {k}") for k in ("x", "y", "w", "h"))
        except KeyError as e:
            raise RegionError(f"{name} has no {e.args[0]!r}") from None
        if w <= 0 or h <= 0:
            raise RegionError(f"{name} has no area (w={w:g}, h={h:g}); give it a positive width and height")
        x0, y0, x1, y1 = x * sx, y * sy, (x + w) * sx, (y + h) * sy
        if not check_bounds:
            cx0, cy0, cx1, cy1 = x0, y0, x1, y1
        else:
            cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if cx1 <= cx0 or cy1 <= cy0:
            raise RegionError(f"{name} lies entirely outside the {width}x{height} image; move it inside")
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            warnings.append(f"{name} reached outside the image and was clipped to it")
        for key in ("prompt", "negative", "label", "color"):
            if key in b and not isinstance(b[key], str):
                raise RegionError(f"{name}: {key} must be text")
        regions.append(
            Region(
                box=(cx0, cy0, cx1, cy1),
                prompt=str(b.get("prompt", "")),
                negative=str(b.get("negative", "")),
                label=label,
                color=str(b.get("color") or PALETTE[i % len(PALETTE)]),
            )
        )
    return Regions(width=int(width), height=int(height), regions=tuple(regions), warnings=tuple(warnings))
