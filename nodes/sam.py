"""SAM: load a segment-anything checkpoint from models/sams; turn region boxes into object masks."""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..formats.weights import CheckpointFileError, check_weight_tensor, read_tensor_file
from ..samplers.regions.sam import SamFileError, clip_box, dilate, feather, load_sam, masks_for_boxes
from ..samplers.regions.sam import keep_inside_box as cut_to_box
from .common import CATEGORY_REGIONS, NodeError, checked_inputs, guarded_validation, register_model_folder
from .inputs import ModelFiles
from .regions import BBoxType, RegionsType
from .validation import short_repr

SAM_FILES = ModelFiles("sams", (".pth", ".pt", ".safetensors"), "SAM checkpoint")
log = logging.getLogger("multiconcept")

SamModelType = io.Custom("SAM_MODEL")

register_model_folder(SAM_FILES.folder)  # the folder other SAM packs use too


class _SamContainer(torch.nn.Module):
    """ModelPatcher writes bookkeeping attributes (e.g. ``device``) on its module; Sam's are read-only."""

    def __init__(self, sam: torch.nn.Module):
        super().__init__()
        self.sam = sam


@dataclass
class SamHandle:
    """The loaded SAM behind a ModelPatcher, so ComfyUI's memory management loads and offloads it."""

    patcher: object
    architecture: str
    file: str

    @property
    def model(self) -> torch.nn.Module:
        return self.patcher.model.sam

    def load(self) -> torch.nn.Module:
        import comfy.model_management

        comfy.model_management.load_model_gpu(self.patcher)
        return self.patcher.model.sam


def read_state_dict(path: str, node: str) -> dict:
    """The checkpoint's ``{key: tensor}`` dict, read safely; broken files are NodeErrors naming the file."""
    name = os.path.basename(path)
    try:
        sd, _, _ = read_tensor_file(path, what="SAM checkpoint")
    except CheckpointFileError as e:
        raise NodeError(node, f"{e} It belongs in models/sams.") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise NodeError(node, f"{name} is not a segment-anything checkpoint (it holds a {type(sd).__name__})")
    # NaN/inf or exploded weights would give empty masks without any error: refuse the file instead.
    for key, t in sd.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            try:
                check_weight_tensor(t, f"{name}: weight '{key}'")
            except CheckpointFileError as e:
                raise NodeError(
                    node,
                    f"{e}. SAM would give empty masks with it. Get the SAM checkpoint again (e.g. the official "
                    "sam_vit_b_01ec64.pth) and put it in models/sams.",
                ) from None
    return sd


class SAMLoader(io.ComfyNode):
    NAME = "SAM Loader"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptSAMLoader",
            display_name="SAM Loader (segment-anything)",
            category=CATEGORY_REGIONS,
            description="Loads a segment-anything (SAM) checkpoint from models/sams. The architecture (ViT-B/L/H or a "
            "smaller custom encoder) is read from the weights' shapes, not from the file name.",
            inputs=[
                SAM_FILES.input(
                    "sam_name",
                    "SAM checkpoint in models/sams, e.g. sam_vit_b_01ec64.pth (.pth loaded safely, "
                    "tensors only) or a .safetensors.",
                ),
            ],
            outputs=[SamModelType.Output(display_name="sam", tooltip="The loaded SAM model.")],
        )

    @classmethod
    @guarded_validation("SAM Loader", "sam_name", "Pick a SAM checkpoint from models/sams.")
    def validate_inputs(cls, sam_name):
        return SAM_FILES.check(cls.NAME, sam_name)

    @classmethod
    @checked_inputs("SAM Loader")
    def execute(cls, sam_name) -> io.NodeOutput:
        import comfy.model_management
        import comfy.model_patcher

        path = SAM_FILES.path(cls.NAME, sam_name)
        sd = read_state_dict(path, cls.NAME)
        try:
            sam, spec = load_sam(sd)
        except SamFileError as e:
            raise NodeError(cls.NAME, f"{sam_name}: {e}. Put a segment-anything checkpoint in models/sams.") from None
        offload = comfy.model_management.unet_offload_device()
        sam = sam.to(offload, dtype=torch.float32)  # fp32: SAM's mask decoder is sensitive to half precision
        patcher = comfy.model_patcher.ModelPatcher(
            _SamContainer(sam), load_device=comfy.model_management.get_torch_device(), offload_device=offload
        )
        log.info("[multi-concept] SAM %s loaded from %s", spec.name, sam_name)
        return io.NodeOutput(SamHandle(patcher, spec.name, sam_name))


BBOX_FORMAT = (
    "Give boxes as [x0, y0, x1, y1] pixel numbers: one list of boxes for all images "
    "([[x0, y0, x1, y1], ...]) or one such list per image ([[[x0, y0, x1, y1], ...], ...])."
)


def _plain(value):
    """Tensors and numpy arrays (other packs' BBOX outputs) as nested Python lists."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) and not isinstance(value, (str, bytes)) else value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_box_like(value) -> bool:
    """A list/tuple of numbers (the right count or not): one box rather than a list of boxes."""
    return isinstance(value, (list, tuple)) and bool(value) and all(_is_number(v) for v in value)


def _boxes_per_image(node: str, bboxes, n_images: int) -> list[list]:
    """A BBOX input as one list of boxes per image; anything else is a NodeError saying what came in."""
    bboxes = _plain(bboxes)
    if not isinstance(bboxes, (list, tuple)):
        raise NodeError(node, f"bboxes is a {type(bboxes).__name__} ({short_repr(bboxes)}), not a list. {BBOX_FORMAT}")
    items = [_plain(b) for b in bboxes]
    if _is_box_like(items):  # a single box [x0, y0, x1, y1]
        return [[items] for _ in range(n_images)]
    first = next((b for b in items if isinstance(b, (list, tuple)) and b), None)
    if first is None or not isinstance(_plain(first[0]), (list, tuple)):
        return [list(items) for _ in range(n_images)]  # one list of boxes for all images
    per = []
    for k, boxes in enumerate(items):  # one list of boxes per image
        if not isinstance(boxes, (list, tuple)):
            raise NodeError(
                node, f"the box list of image {k + 1} is {short_repr(boxes)} (a {type(boxes).__name__}). {BBOX_FORMAT}"
            )
        per.append([_plain(box) for box in boxes])
    if len(per) != n_images:
        log.warning(
            "[multi-concept] %s: %d box lists for %d image(s); %s",
            node,
            len(per),
            n_images,
            "the extra lists are ignored" if len(per) > n_images else "the last list is used for the other images",
        )
    return [per[min(i, len(per) - 1)] for i in range(n_images)]


def _coordinate(value) -> float:
    """A box coordinate as a float; integers too big for a float become +-inf (and are clipped like 1e308)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _describe_bad_box(b) -> str:
    if not isinstance(b, (list, tuple)):
        return f"a {type(b).__name__}"
    if len(b) != 4:
        return f"{len(b)} value{'' if len(b) == 1 else 's'}"
    odd = next(v for v in b if not _is_number(v))
    return f"it holds a {type(odd).__name__}, not only numbers"


def _check_boxes(node: str, per_image: list, width: int, height: int) -> list[list[list[float]]]:
    """Every box must be 4 numbers (not NaN) with x1 > x0 and y1 > y0. Boxes reaching outside the image,
    however far, are clipped to it (a warning names them); a box with nothing left inside is an error."""
    shared = all(row == per_image[0] for row in per_image)  # one list for all images: name boxes only
    checked, clipped = [], {}
    for i, boxes in enumerate(per_image):
        row = []
        for j, b in enumerate(boxes):
            where = f"box {j + 1}" + ("" if shared else f" of image {i + 1}")
            if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b)):
                raise NodeError(
                    node, f"{where} is {short_repr(b)} ({_describe_bad_box(b)}), not [x0, y0, x1, y1]. {BBOX_FORMAT}"
                )
            x0, y0, x1, y1 = (_coordinate(v) for v in b)
            if any(math.isnan(v) for v in (x0, y0, x1, y1)):
                raise NodeError(node, f"{where} {short_repr(b)} holds NaN (not a number). {BBOX_FORMAT}")
            if x1 <= x0 or y1 <= y0:
                raise NodeError(node, f"{where} {short_repr(b)} has no area. Give x1 > x0 and y1 > y0 in pixels.")
            box = clip_box((x0, y0, x1, y1), width, height)
            if box is None:
                raise NodeError(
                    node,
                    f"{where} {short_repr(b)} lies outside the {width}x{height} image (nothing of it is inside). "
                    f"Move it inside the image (x from 0 to {width}, y from 0 to {height} pixels) or remove it.",
                )
            if box != (x0, y0, x1, y1):
                clipped.setdefault(where, (b, box))
            row.append(list(box))
        checked.append(row)
    for where, (original, box) in clipped.items():
        log.warning(
            "[multi-concept] %s: %s %s reaches outside the %dx%d image; clipped to [%s]",
            node,
            where,
            short_repr(list(original)),
            width,
            height,
            ", ".join(f"{v:g}" for v in box),
        )
    return checked


class SAMMasks(io.ComfyNode):
    NAME = "SAM Masks"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptSAMMasks",
            display_name="SAM Masks from Regions",
            category=CATEGORY_REGIONS,
            description="Refines each box into an object mask with SAM (one batched box-prompt call per image). The "
            "output regions carry the masks, so sampling nodes use masks where they exist and boxes otherwise.",
            inputs=[
                SamModelType.Input("sam", tooltip="From SAM Loader."),
                io.Image.Input("image", tooltip="The picture(s) to segment, e.g. a first-stage image."),
                RegionsType.Input("regions", optional=True, tooltip="Boxes from the Regions node (preferred)."),
                BBoxType.Input(
                    "bboxes",
                    optional=True,
                    tooltip="Or boxes as [x0, y0, x1, y1] pixels (one list for all images, or one per image). Boxes "
                    "reaching outside the image are clipped to it.",
                ),
                io.Boolean.Input(
                    "multimask",
                    default=True,
                    tooltip="Let SAM propose 3 masks per box and keep the one with the best predicted IoU.",
                ),
                io.Int.Input(
                    "dilation_px",
                    default=0,
                    min=-64,
                    max=64,
                    tooltip="Grow (positive) or shrink (negative) each mask by this many pixels.",
                ),
                io.Int.Input(
                    "feather_px", default=0, min=0, max=64, tooltip="Soften mask edges over this many pixels."
                ),
                io.Boolean.Input("keep_inside_box", default=True, tooltip="Cut each mask to its own box."),
            ],
            outputs=[
                io.Mask.Output(
                    display_name="masks", tooltip="One mask per box per image, images first, boxes in order."
                ),
                RegionsType.Output(
                    display_name="regions", tooltip="The input regions carrying the first image's masks."
                ),
            ],
        )

    @classmethod
    @checked_inputs("SAM Masks")
    def execute(
        cls, sam, image, regions=None, bboxes=None, multimask=True, dilation_px=0, feather_px=0, keep_inside_box=True
    ) -> io.NodeOutput:
        import comfy.utils

        n, h, w = image.shape[0], image.shape[1], image.shape[2]
        if regions is not None:
            boxes = regions.bboxes()
            if (regions.width, regions.height) != (w, h):
                sx, sy = w / regions.width, h / regions.height
                log.warning(
                    "[multi-concept] %s: regions are %dx%d but the image is %dx%d; boxes were rescaled",
                    cls.NAME,
                    regions.width,
                    regions.height,
                    w,
                    h,
                )
                boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
            per_image = [boxes] * n
        elif bboxes is not None:
            per_image = _boxes_per_image(cls.NAME, bboxes, n)
        else:
            raise NodeError(
                cls.NAME, "neither regions nor bboxes is connected. Connect the Regions node (or a BBOX list)."
            )
        if not any(per_image):
            fix = "Draw at least one box in the Regions node." if regions is not None else BBOX_FORMAT
            raise NodeError(cls.NAME, f"there are no boxes to segment. {fix}")
        per_image = _check_boxes(cls.NAME, per_image, w, h)
        model = sam.load()
        pbar = comfy.utils.ProgressBar(n)
        out, first = [], None
        for i in range(n):
            masks, _ = masks_for_boxes(model, image[i], per_image[i], multimask=multimask)
            cleaned = []
            for mask, box in zip(masks, per_image[i], strict=True):
                mask = feather(dilate(mask, dilation_px), feather_px)
                if keep_inside_box:
                    mask = cut_to_box(mask, box)
                cleaned.append(mask)
            stacked = torch.stack(cleaned) if cleaned else torch.zeros(0, h, w)
            first = stacked if first is None else first
            out.append(stacked)
            pbar.update_absolute(i + 1, n)
        new_regions = regions.with_masks(first) if regions is not None else None
        return io.NodeOutput(torch.cat(out), new_regions)
