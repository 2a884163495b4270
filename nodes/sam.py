"""SAM: load a segment-anything checkpoint from models/sams; turn region boxes into object masks."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..samplers.sam_masks import SamFileError, dilate, feather, load_sam, masks_for_boxes
from ..samplers.sam_masks import keep_inside_box as cut_to_box
from .common import CATEGORY_REGIONS, NodeError, check_model_file, list_model_files, resolve_model_file
from .regions import BBoxType, RegionsType

SAM_SUFFIXES = (".pth", ".pt", ".safetensors")
log = logging.getLogger("multiconcept")

SamModelType = io.Custom("SAM_MODEL")


def _register_sams_folder():
    import folder_paths

    if "sams" not in folder_paths.folder_names_and_paths:  # other SAM packs use the same folder
        folder_paths.add_model_folder_path("sams", os.path.join(folder_paths.models_dir, "sams"))


_register_sams_folder()


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
    import pickle

    name = os.path.basename(path)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise NodeError(
            node,
            f"{name} needs pickle code execution to load; that is refused for safety (nothing in "
            "it ran). Use the official SAM .pth files or a .safetensors.",
        ) from None
    except Exception as e:
        raise NodeError(node, f"{name} could not be read (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise NodeError(node, f"{name} is not a segment-anything checkpoint (it holds a {type(sd).__name__})")
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
                io.Combo.Input(
                    "sam_name",
                    options=list_model_files("sams", SAM_SUFFIXES),
                    tooltip="SAM checkpoint in models/sams, e.g. sam_vit_b_01ec64.pth (.pth loaded safely, "
                    "tensors only) or a .safetensors.",
                ),
            ],
            outputs=[SamModelType.Output(display_name="sam", tooltip="The loaded SAM model.")],
        )

    @classmethod
    def validate_inputs(cls, sam_name):
        return check_model_file(cls.NAME, "sams", sam_name, "SAM checkpoint")

    @classmethod
    def execute(cls, sam_name) -> io.NodeOutput:
        import comfy.model_management
        import comfy.model_patcher

        path = resolve_model_file(cls.NAME, "sams", sam_name, "SAM checkpoint")
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


def _boxes_per_image(bboxes, n_images: int) -> list[list[list[float]]]:
    if not isinstance(bboxes, (list, tuple)) or not bboxes:
        return [[] for _ in range(n_images)]
    first = bboxes[0]
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        per = [list(map(list, b)) for b in bboxes]  # one list of boxes per image
        return [per[min(i, len(per) - 1)] for i in range(n_images)]
    return [[list(b) for b in bboxes] for _ in range(n_images)]


def _check_boxes(node: str, per_image: list, width: int, height: int) -> list[list[list[float]]]:
    """Every box must be 4 finite numbers with a positive area that overlaps the image."""
    checked = []
    for i, boxes in enumerate(per_image):
        row = []
        for j, b in enumerate(boxes):
            where = f"box {j + 1}" + (f" of image {i + 1}" if len(per_image) > 1 else "")
            try:
                x0, y0, x1, y1 = (float(v) for v in b)
            except (TypeError, ValueError):
                raise NodeError(
                    node, f"{where} is {b!r}, not [x0, y0, x1, y1]. Give each box as four pixel numbers."
                ) from None
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
                raise NodeError(node, f"{where} {b!r} has no area. Give x1 > x0 and y1 > y0 in pixels.")
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise NodeError(
                    node, f"{where} {b!r} lies outside the {width}x{height} image. Move it inside the image."
                )
            row.append([x0, y0, x1, y1])
        checked.append(row)
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
                    tooltip="Or boxes as [x0, y0, x1, y1] pixels (one list for all images, or one per image).",
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
            per_image = _boxes_per_image(bboxes, n)
        else:
            raise NodeError(
                cls.NAME, "neither regions nor bboxes is connected. Connect the Regions node (or a BBOX list)."
            )
        if not any(per_image):
            raise NodeError(cls.NAME, "there are no boxes to segment. Draw at least one box in the Regions node.")
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
