"""SAM nodes in a real ComfyUI: shape-based loading, masks per box, bad files."""

from __future__ import annotations

import json
import logging
import pathlib

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
    torch.save({"x": _TouchOnLoad(str(d / "pickle_ran.txt"))}, d / "needs_code.pth")
    data = (d / "tiny_sam.pth").read_bytes()
    (d / "truncated_sam.pth").write_bytes(data[: len(data) // 3])
    return d


class _TouchOnLoad:
    """Unpickling this would create a file: proves the loader never executes pickle code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


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
    # SAM is managed by ComfyUI like any model: a ModelPatcher with ComfyUI's devices
    import comfy.model_management as mm  # noqa: PLC0415

    assert handle.patcher.load_device == mm.get_torch_device()
    assert handle.patcher.offload_device == mm.unet_offload_device()
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


@pytest.mark.parametrize(
    "name, words",
    [("needs_code.pth", "refused for safety"), ("truncated_sam.pth", "could not be read")],
)
def test_unsafe_and_corrupt_files_are_refused(comfy, sam_files, name, words):
    result = comfy.run(sam_prompt(name))
    assert not result.success
    message = result.error["exception_message"]
    assert message.startswith("SAM Loader:") and words in message and name in message
    assert not (sam_files / "pickle_ran.txt").exists()


def _tiny_handle(comfy):
    return comfy.node_class("MultiConceptSAMLoader").execute("tiny_sam.pth").result[0]


def test_regions_of_another_size_are_rescaled(comfy, sam_files, caplog):
    regions_mod = comfy.pack_module("samplers.regions")
    regions = regions_mod.parse_regions(BOXES, 192, 128)  # twice the image size
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    masks_node = comfy.node_class("MultiConceptSAMMasks")
    with caplog.at_level(logging.WARNING, logger="multiconcept"):
        out = masks_node.execute(_tiny_handle(comfy), image, regions=regions, dilation_px=4).result
    assert "rescaled" in caplog.text and "192x128" in caplog.text
    masks, new_regions = out
    assert masks.shape == (2, 64, 96) and masks.dtype == torch.float32
    for m, (x0, y0, x1, y1) in zip(masks, [(0, 0, 48, 48), (48, 16, 96, 64)], strict=True):
        outside = m.clone()
        outside[y0:y1, x0:x1] = 0
        assert outside.sum() == 0
    assert len(new_regions) == 2 and new_regions.regions[1].mask.shape == (64, 96)
    assert new_regions.masks().shape == (2, 128, 192)  # the regions keep their own size


def test_per_image_bbox_lists(comfy, sam_files):
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    per_image = [[[0, 0, 32, 32]], [[8, 8, 40, 60], [32, 0, 64, 32]]]
    masks, regions = (
        comfy.node_class("MultiConceptSAMMasks").execute(_tiny_handle(comfy), image, bboxes=per_image).result
    )
    assert masks.shape == (3, 64, 64) and regions is None
    assert masks[0, 32:].sum() == 0 and masks[0, :, 32:].sum() == 0 and masks[2, 32:].sum() == 0


@pytest.mark.parametrize(
    "regions, bboxes, words",
    [
        (None, None, "neither regions nor bboxes"),
        (None, [], "no boxes"),
        (None, [[10, 10, 5, 20]], "has no area"),
        (None, [[1, 2, 3]], "not [x0, y0, x1, y1]"),
        (None, [[100, 100, 120, 120]], "outside the 64x64 image"),
    ],
)
def test_bad_box_inputs_are_clear_errors(comfy, sam_files, regions, bboxes, words):
    image = torch.zeros(1, 64, 64, 3)
    node = comfy.node_class("MultiConceptSAMMasks")
    with pytest.raises(ValueError) as info:
        node.execute(_tiny_handle(comfy), image, regions=regions, bboxes=bboxes)
    assert str(info.value).startswith("SAM Masks:") and words in str(info.value)
