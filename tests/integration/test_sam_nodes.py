"""SAM nodes in a real ComfyUI: shape-based loading, masks per box, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.graphs import plain_txt2img
from tests.support.tiny_sam import save_tiny_sam

BOXES = json.dumps(
    {
        "boxes": [
            {"x": 0.0, "y": 0.0, "w": 0.5, "h": 0.75, "label": "cat"},
            {"x": 0.5, "y": 0.25, "w": 0.5, "h": 0.75, "label": "dog"},
        ]
    }
)


@pytest.fixture(scope="module")
def sam_files(comfy):
    d = comfy.models_dir / "sams"
    save_tiny_sam(d / "tiny_sam.pth")
    save_tiny_sam(d / "tiny_sam.safetensors")
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, d / "not_sam.pth")
    return d


def sam_prompt(sam_name: str, use_regions=True, keep_inside=True) -> dict:
    prompt = {
        "1": {"class_type": "MultiConceptSAMLoader", "inputs": {"sam_name": sam_name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 2, "color": 0x8040C0}},
        "3": {"class_type": "MultiConceptRegions", "inputs": {"width": 96, "height": 64, "regions": BOXES}},
        "4": {
            "class_type": "MultiConceptSAMMasks",
            "inputs": {
                "sam": ["1", 0],
                "image": ["2", 0],
                "multimask": True,
                "dilation_px": 2,
                "feather_px": 1,
                "keep_inside_box": keep_inside,
            },
        },
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    if use_regions:
        prompt["4"]["inputs"]["regions"] = ["3", 0]
    else:
        prompt["4"]["inputs"]["bboxes"] = ["3", 2]
    return prompt


@pytest.mark.parametrize("name", ["tiny_sam.pth", "tiny_sam.safetensors"])
def test_masks_per_box_inside_their_boxes(comfy, sam_files, name):
    result = comfy.run(sam_prompt(name))
    assert result.success, result.error
    handle = comfy.output_value(result, "1")
    assert handle.architecture == "custom"
    masks = comfy.output_value(result, "4", 0)
    regions = comfy.output_value(result, "4", 1)
    assert masks.shape == (4, 64, 96) and masks.dtype == torch.float32  # 2 images x 2 boxes
    assert masks.min() >= 0 and masks.max() <= 1
    boxes = [[0, 0, 48, 48], [48, 16, 96, 64]]
    for i, m in enumerate(masks):
        x0, y0, x1, y1 = boxes[i % 2]
        outside = m.clone()
        outside[y0:y1, x0:x1] = 0
        assert outside.sum() == 0
    assert regions.regions[0].mask is not None and torch.equal(regions.masks(), masks[:2])


def test_bbox_input_gives_the_same_masks(comfy, sam_files):
    a = comfy.run(sam_prompt("tiny_sam.pth", use_regions=True))
    b = comfy.run(sam_prompt("tiny_sam.pth", use_regions=False))
    assert a.success and b.success, (a.error, b.error)
    assert torch.equal(comfy.output_value(a, "4", 0), comfy.output_value(b, "4", 0))
    assert comfy.output_value(b, "4", 1) is None


def test_non_sam_file_and_missing_file(comfy, sam_files, tiny_checkpoint):
    bad = comfy.run(sam_prompt("not_sam.pth"))
    assert not bad.success
    message = bad.error["exception_message"]
    assert (
        message.startswith("SAM Loader:")
        and "not a segment-anything checkpoint" in message
        and "models/sams" in message
    )
    ok, error = comfy.validate(sam_prompt("missing_sam.pth"))
    assert not ok and "models/sams" in str(error) and "missing_sam.pth" in str(error)
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_sam"))
    assert after.success, after.error
