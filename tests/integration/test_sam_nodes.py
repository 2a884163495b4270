"""SAM nodes in a real ComfyUI: shape-based loading, masks per box, bad files."""

from __future__ import annotations

import json
import logging
import pathlib
import random

import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.sam import (
    REFERENCE_BOXES,
    REFERENCE_H,
    REFERENCE_IMAGE,
    REFERENCE_W,
    assert_matches_reference,
    assert_reference_is_telling,
    build_tiny_sam,
    predictor_reference,
    reference_image_u8,
    reference_prompt,
    save_reference_image,
    save_tiny_sam,
    textured_image,
)
from tests.support.graphs import plain_txt2img

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
    (d / "empty_sam.pth").write_bytes(b"")
    (d / "random_bytes_sam.pth").write_bytes(bytes([0x13]) + random.Random(0).randbytes(4095))
    for name, key, value in BROKEN_WEIGHTS:
        sd = build_tiny_sam().state_dict()
        sd[key] = sd[key].clone()
        sd[key].view(-1)[3] = value
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in sd.items()}, str(d / name))
        else:
            torch.save(sd, d / name)
    return d


# Weights that load but would give all-zero masks without any error: (file, key, bad value).
BROKEN_WEIGHTS = [
    ("nan_sam.pth", "mask_decoder.output_upscaling.0.weight", float("nan")),
    ("inf_sam.safetensors", "image_encoder.blocks.0.attn.qkv.weight", float("inf")),
    ("huge_sam.pth", "prompt_encoder.point_embeddings.2.weight", 1e30),
]


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


# ------------------------------------------ the node's masks against segment-anything's own predictor

REF_H, REF_W, REF_BOXES, REF_IMAGE = REFERENCE_H, REFERENCE_W, REFERENCE_BOXES, REFERENCE_IMAGE


@pytest.fixture(scope="module")
def reference_image(comfy):
    """A textured picture in ComfyUI's input folder (LoadImage gives it back as exact k/255 floats)."""
    return save_reference_image(comfy.input_dir)


@pytest.fixture(scope="module")
def reference_masks(reference_image):
    """SamPredictor on each box alone, multimask and single, with the same seeded tiny SAM as the file."""
    sam = build_tiny_sam()
    out = {}
    for multimask in (True, False):
        masks, logits, _ = predictor_reference(sam, reference_image, REF_BOXES, multimask)
        full, _, _ = predictor_reference(sam, reference_image, [[0, 0, REF_W, REF_H]], multimask)
        assert_reference_is_telling(masks, full[0])
        out[multimask] = (masks, logits)
    return out


def check_a_valid_prompt_runs(comfy, reference_masks):
    """The next, valid prompt (a fresh run) gives SamPredictor's masks: no state was left broken."""
    result = comfy.run(reference_prompt())
    assert result.success, result.error
    masks, logits = reference_masks[True]
    assert_matches_reference(comfy.output_value(result, "4", 0), masks, logits, "mask after an error")


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("via", ["regions", "bbox_link", "value"])
def test_node_masks_equal_sam_predictor_on_each_box_alone(comfy, sam_files, reference_masks, via, multimask):
    """With no dilation, feathering or cut, the node's masks are SamPredictor's for each box on its own.

    Catches empty masks, masks that ignore or mix up the boxes, a wrong candidate choice, a model that was
    loaded wrongly, and an image that reaches SAM converted wrongly (LoadImage's floats -> uint8)."""
    result = comfy.run(reference_prompt(multimask=multimask, via=via, bboxes=REF_BOXES))
    assert result.success, result.error
    masks, logits = reference_masks[multimask]
    out = comfy.output_value(result, "4", 0)
    assert out.shape == (3, REF_H, REF_W) and out.dtype == torch.float32
    assert_matches_reference(out, masks, logits)
    regions = comfy.output_value(result, "4", 1)
    if via == "regions":
        assert torch.equal(regions.masks(), out)


def test_per_image_box_lists_equal_sam_predictor_per_image(comfy, sam_files):
    sam = build_tiny_sam()
    images = [textured_image(48, 64, seed=21), textured_image(48, 64, seed=22)]
    per_image = [[[2, 2, 40, 44]], [[20, 4, 62, 30], [4, 10, 36, 46]]]
    batch = torch.stack(images).float() / 255
    node = comfy.node_class("MultiConceptSAMMasks")
    masks, _ = node.execute(_tiny_handle(comfy), batch, bboxes=per_image, keep_inside_box=False).result
    assert masks.shape == (3, 48, 64)
    rows = iter(masks)
    for image, boxes in zip(images, per_image, strict=True):
        reference, logits, _ = predictor_reference(sam, image, boxes, multimask=True)
        full, _, _ = predictor_reference(sam, image, [[0, 0, 64, 48]], multimask=True)
        assert 0 < reference.sum() and not torch.equal(reference[0], full[0])
        assert_matches_reference(torch.stack([next(rows) for _ in boxes]), reference, logits)


# ------------------------------------------------------------------------- bad SAM files, bad boxes


@pytest.mark.parametrize(
    "name, words",
    [
        ("empty_sam.pth", ["is empty (0 bytes)", "did not finish"]),
        ("random_bytes_sam.pth", ["is not a PyTorch or safetensors file", "starts with the bytes 13"]),
        ("nan_sam.pth", ["mask_decoder.output_upscaling.0.weight", "NaN or infinite", "empty masks"]),
        ("inf_sam.safetensors", ["image_encoder.blocks.0.attn.qkv.weight", "NaN or infinite"]),
        ("huge_sam.pth", ["prompt_encoder.point_embeddings.2.weight", "1e+30", "far beyond"]),
    ],
)
def test_broken_sam_files_are_refused_and_the_next_prompt_runs(comfy, sam_files, reference_masks, name, words):
    result = comfy.run(reference_prompt(name))
    assert not result.success
    message = result.error["exception_message"]
    assert result.error["node_type"] == "MultiConceptSAMLoader", result.error
    assert message.startswith("SAM Loader:") and name in message and "models/sams" in message, message
    for w in words:
        assert w in message, (w, message)
    assert "pickle code" not in message and "IndexError" not in message
    check_a_valid_prompt_runs(comfy, reference_masks)


def test_huge_boxes_are_clipped_to_the_image_with_a_warning(comfy, sam_files, reference_masks, caplog):
    """1e308 is a finite number: the box is clipped to the image and gets the clipped box's real mask."""
    boxes = [[4, 6, 44, 60], [40, -1e308, 1e308, 34]]
    with caplog.at_level(logging.WARNING, logger="multiconcept"):
        result = comfy.run(reference_prompt(via="value", bboxes=boxes))
    assert result.success, result.error
    assert "box 2 [40, -1e+308, 1e+308, 34] reaches outside the 96x64 image; clipped to [40, 0, 96, 34]" in caplog.text
    assert "box 1" not in caplog.text
    out = comfy.output_value(result, "4", 0)
    clipped = [[4, 6, 44, 60], [40, 0, 96, 34]]
    reference, logits, _ = predictor_reference(build_tiny_sam(), reference_image_u8(), clipped, True)
    assert reference[1].sum() > 0
    assert_matches_reference(out, reference, logits)
    # a Python int too big for a float, straight into the node: clipped the same way
    node = comfy.node_class("MultiConceptSAMMasks")
    image = (reference_image_u8().float() / 255)[None]
    masks, _ = node.execute(_tiny_handle(comfy), image, bboxes=[[40, 0, 10**400, 34]], keep_inside_box=False).result
    assert torch.equal(masks[0], out[1])


@pytest.mark.parametrize(
    "bboxes, words",
    [
        ([[100, 70, 120, 90]], ["box 1 [100, 70, 120, 90] lies outside the 96x64 image", "Move it inside"]),
        ([[4, 6, 44, 60], [-50, 10, 0, 40]], ["box 2 [-50, 10, 0, 40] lies outside", "x from 0 to 96"]),
        ([[4, 6, 44, 60], [1e308, 0, 2e308, 10]], ["box 2 ", "lies outside the 96x64 image"]),
        ([[10, 10, 5, 20]], ["box 1 [10, 10, 5, 20] has no area", "x1 > x0"]),
    ],
)
def test_boxes_with_nothing_inside_the_image_are_errors(comfy, sam_files, reference_masks, bboxes, words):
    result = comfy.run(reference_prompt(via="value", bboxes=bboxes))
    assert not result.success
    message = result.error["exception_message"]
    assert message.startswith("SAM Masks:"), message
    for w in words:
        assert w in message, (w, message)
    check_a_valid_prompt_runs(comfy, reference_masks)


EXPECTED_FORMAT = "Give boxes as [x0, y0, x1, y1] pixel numbers: one list of boxes for all images"


@pytest.mark.parametrize(
    "bboxes, words",
    [
        ("0, 0, 10, 10", ["bboxes is a str ('0, 0, 10, 10'), not a list"]),
        ({"x0": 0, "y0": 0, "x1": 10, "y1": 10}, ["bboxes is a dict ({'x0': 0,"]),
        ([None], ["box 1 is None (a NoneType)"]),
        ([[None, 0, 10, 10]], ["box 1 is [None, 0, 10, 10] (it holds a NoneType"]),
        ([["0", "0", "10", "10"]], ["box 1 is ['0', '0', '10', '10'] (it holds a str"]),
        ([[{"x": 0, "y": 0, "w": 10, "h": 10}]], ["box 1 is [{'x': 0,", "(1 value)"]),
        ([[[0, 0, 10, 10], "junk"], [[1, [2]]]], ["box 2 is 'junk' (a str)"]),
        ([[True, 0, 10, 10]], ["(it holds a bool"]),
        ([[0, 0, 10]], ["box 1 is [0, 0, 10] (3 values)"]),
        ([[0, 0, float("nan"), 10]], ["box 1 [0, 0, nan, 10] holds NaN"]),
        ([], ["there are no boxes to segment"]),
    ],
    ids=["string", "dict", "none", "none-inside", "strings", "dict-box", "nested", "bool", "three", "nan", "empty"],
)
def test_bbox_values_that_are_not_boxes_say_what_came_and_what_is_expected(
    comfy, sam_files, reference_masks, bboxes, words
):
    result = comfy.run(reference_prompt(via="value", bboxes=bboxes))
    assert not result.success
    message = result.error["exception_message"]
    assert message.startswith("SAM Masks:") and EXPECTED_FORMAT in message, message
    assert "one such list per image" in message
    for w in words:
        assert w in message, (w, message)
    check_a_valid_prompt_runs(comfy, reference_masks)


def test_a_single_box_and_tensor_boxes_are_accepted(comfy, sam_files, reference_masks):
    node = comfy.node_class("MultiConceptSAMMasks")
    image = (reference_image_u8().float() / 255)[None]
    masks, logits = reference_masks[True]
    single, _ = node.execute(_tiny_handle(comfy), image, bboxes=REF_BOXES[1], keep_inside_box=False).result
    assert_matches_reference(single, masks[1:2], logits[1:2])
    as_tensor, _ = node.execute(
        _tiny_handle(comfy), image, bboxes=torch.tensor(REF_BOXES), keep_inside_box=False
    ).result
    assert_matches_reference(as_tensor, masks, logits)
