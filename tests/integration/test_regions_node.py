"""The Regions node in a real ComfyUI: outputs, validation errors, preview."""

from __future__ import annotations

import json

import torch

from tests.support.graphs import plain_txt2img

BOXES = {
    "version": 1,
    "boxes": [
        {"x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0, "prompt": "a <cat1> <cat2>", "label": "cat"},
        {"x": 0.5, "y": 0.25, "w": 0.75, "h": 0.5, "prompt": "a dog", "negative": "cartoon", "label": "dog"},
    ],
}


def regions_prompt(text: str, width=64, height=32) -> dict:
    return {
        "1": {"class_type": "MultiConceptRegions", "inputs": {"width": width, "height": height, "regions": text}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 3]}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 1]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_outputs_regions_masks_bboxes_and_preview(comfy):
    result = comfy.run(regions_prompt(json.dumps(BOXES)))
    assert result.success, result.error
    regions = comfy.output_value(result, "1", 0)
    masks = comfy.output_value(result, "1", 1)
    bboxes = comfy.output_value(result, "1", 2)
    preview = comfy.output_value(result, "1", 3)
    assert [r.label for r in regions.regions] == ["cat", "dog"]
    assert regions.regions[1].negative == "cartoon" and regions.regions[0].prompt == "a <cat1> <cat2>"
    assert bboxes == [[0, 0, 32, 32], [32, 8, 64, 24]]  # the dog box was clipped at the right edge
    assert masks.shape == (2, 32, 64) and masks.dtype == torch.float32
    assert masks[0, :, :32].min() == 1 and masks[0, :, 32:].max() == 0
    assert masks[1].sum() == 32 * 16
    assert preview.shape == (1, 32, 64, 3) and preview.std() > 0
    assert len(result.outputs["2"]["images"]) == 1


def test_bad_regions_are_validation_errors_and_comfy_keeps_going(comfy, tiny_checkpoint):
    for text, message in [
        ("{oops", "not valid JSON"),
        (json.dumps({"boxes": []}), "no boxes"),
        (json.dumps({"boxes": [{"x": 3, "y": 0, "w": 0.1, "h": 0.1, "label": "cat"}]}), "entirely outside"),
    ]:
        ok, error = comfy.validate(regions_prompt(text))
        assert not ok and message in str(error) and "Regions:" in str(error)
    ok, error = comfy.validate(regions_prompt(json.dumps(BOXES), width=60))
    assert not ok and "multiples of 8" in str(error)
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_regions"))
    assert after.success, after.error
