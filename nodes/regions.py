"""Regions: boxes with a prompt, negative prompt and label each, as REGIONS, MASK, BBOX and a preview."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..samplers.regions import MAX_REGIONS, RegionError, parse_regions, validate_regions_json
from ..samplers.regions.preview import draw_regions
from .common import CATEGORY_REGIONS, NodeError, checked_inputs, guarded_validation
from .inputs import image_size_input

NODE_NAME = "Regions"
log = logging.getLogger("multiconcept")

RegionsType = io.Custom("REGIONS")
# The canvas widget (web/js/regions_widget.js); its value is the JSON string below.
RegionsEditorType = io.Custom("MC_REGIONS_EDITOR")
BBoxType = io.Custom("BBOX")
_UNLINKED = object()  # validate_inputs' default for regions_json: the input is not connected

EXAMPLE = (
    '{"version": 1, "units": "fraction", "boxes": [\n'
    ' {"x": 0.05, "y": 0.15, "w": 0.42, "h": 0.8, "prompt": "a <cat1> <cat2>", "negative": "", "label": "cat"},\n'
    ' {"x": 0.53, "y": 0.15, "w": 0.42, "h": 0.8, "prompt": "a <dog1> <dog2>", "negative": "", "label": "dog"}]}'
)


class Regions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiConceptRegions",
            display_name="Regions (boxes + prompts)",
            category=CATEGORY_REGIONS,
            description=(
                "Places concepts in the image: one box per concept, each with its own prompt, negative prompt and "
                "label. Outputs the regions for the sampling nodes, one mask per box, the boxes in the BBOX "
                "convention (x0, y0, x1, y1 pixels) that SAM2/KJNodes packs accept, and a preview."
            ),
            inputs=[
                image_size_input("width", "Width of the image the boxes are placed in, in pixels (a multiple of 8)."),
                image_size_input("height", "Height of the image the boxes are placed in, in pixels (a multiple of 8)."),
                RegionsEditorType.Input(
                    "regions",
                    tooltip="Draw a box per concept (drag on empty space); click a box to edit its label, prompt "
                    "and negative prompt; drag it to move, drag a corner to resize, Delete removes it. Stored as "
                    'JSON: {"boxes": [{"x", "y", "w", "h" as fractions of width/height, "prompt", "negative", '
                    f'"label"}}]}}. At most {MAX_REGIONS} boxes; boxes reaching outside the image are clipped.',
                    extra_dict={"default": EXAMPLE},
                ),
                io.String.Input(
                    "regions_json",
                    optional=True,
                    force_input=True,
                    tooltip='Optional: the boxes as JSON text from another node (same format; add "units": "px" '
                    "for pixels). When connected it replaces the drawn boxes.",
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip="Optional picture to draw the boxes over in the preview (e.g. a sketch or a "
                    "first-stage image).",
                ),
            ],
            outputs=[
                RegionsType.Output(display_name="regions", tooltip="Boxes, prompts and labels for the sampling nodes."),
                io.Mask.Output(display_name="masks", tooltip="One mask per box at image size, in box order."),
                BBoxType.Output(display_name="bboxes", tooltip="Boxes as [x0, y0, x1, y1] integer pixels."),
                io.Image.Output(display_name="preview", tooltip="The boxes and labels drawn over the image."),
            ],
        )

    @classmethod
    @guarded_validation(NODE_NAME, "regions", "Redraw the boxes, or fix the regions JSON (see the node's help page).")
    def validate_inputs(cls, regions, regions_json=_UNLINKED):
        # One input only, so a message is shown once (ComfyUI repeats it per input this function takes) and
        # ComfyUI keeps its own min/max checks of width and height. Checks that need the image size run in
        # execute. ComfyUI passes a linked regions_json as None: then the drawn boxes are not used.
        if regions_json is not _UNLINKED:
            return True
        if not isinstance(regions, str):
            return f"{NODE_NAME}: regions must be JSON text, got {type(regions).__name__}"
        try:
            validate_regions_json(regions)
        except RegionError as e:
            return f"{NODE_NAME}: {e}"
        return True

    @classmethod
    @checked_inputs(NODE_NAME)
    def execute(cls, width, height, regions, regions_json=None, image=None) -> io.NodeOutput:
        if regions_json is not None:
            regions = regions_json
        if width % 8 or height % 8:
            raise NodeError(NODE_NAME, f"width and height must be multiples of 8 (got {width}x{height}).")
        if not isinstance(regions, str):
            raise NodeError(NODE_NAME, f"regions must be JSON text, got {type(regions).__name__}")
        try:
            parsed = parse_regions(regions, width, height)
        except RegionError as e:
            raise NodeError(NODE_NAME, str(e)) from None
        for warning in parsed.warnings:
            log.warning("[multi-concept] %s: %s", NODE_NAME, warning)
        preview = draw_regions(parsed, image)
        return io.NodeOutput(parsed, parsed.masks(), parsed.bboxes(), preview)
