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


def regions_prompt(text: str, width=128, height=64) -> dict:
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
    assert bboxes == [[0, 0, 64, 64], [64, 16, 128, 48]]  # the dog box was clipped at the right edge
    assert masks.shape == (2, 64, 128) and masks.dtype == torch.float32
    assert masks[0, :, :64].min() == 1 and masks[0, :, 64:].max() == 0
    assert masks[1].sum() == 64 * 32
    assert preview.shape == (1, 64, 128, 3) and preview.std() > 0
    assert len(result.outputs["2"]["images"]) == 1


def test_bad_regions_json_is_a_validation_error_shown_once(comfy, tiny_checkpoint):
    for text, message in [
        ("{oops", "not valid JSON"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        (json.dumps({"boxes": [{"x": 10**400, "y": 0, "w": 0.1, "h": 0.1}]}), "must be a finite number"),
        (json.dumps({"boxes": [{"x": "left", "y": 0, "w": 0.1, "h": 0.1}]}), "box 1: x must be a number"),
        (json.dumps({"boxes": [{"x": 0, "y": 0, "w": 0, "h": 0.1, "label": "cat"}]}), "box 1 ('cat') has no area"),
    ]:
        ok, error = comfy.validate(regions_prompt(text))
        assert not ok, text[:40]
        errors = error["node_errors"]["1"]["errors"]
        assert len(errors) == 1, errors  # once, against the regions input (not once per input)
        assert errors[0]["extra_info"]["input_name"] == "regions"
        assert message in errors[0]["details"] and "Regions:" in errors[0]["details"], errors[0]["details"]
        assert "Exception" not in errors[0]["message"]
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_regions"))
    assert after.success, after.error


def test_comfyui_keeps_its_own_range_checks_of_width_and_height(comfy):
    for size, kind in [({"width": 100000}, "value_bigger_than_max"), ({"height": 32}, "value_smaller_than_min")]:
        ok, error = comfy.validate(regions_prompt(json.dumps(BOXES), **size))
        assert not ok and [e["type"] for e in error["node_errors"]["1"]["errors"]] == [kind]
    ok, error = comfy.validate(regions_prompt(json.dumps(BOXES), width=2**40))
    assert not ok


def test_image_dependent_errors_name_the_node_when_it_runs(comfy, tiny_checkpoint):
    for text, size, message in [
        (json.dumps({"boxes": []}), {}, "no boxes"),
        (json.dumps({"boxes": [{"x": 3, "y": 0, "w": 0.1, "h": 0.1, "label": "cat"}]}), {}, "entirely outside"),
        (json.dumps(BOXES), {"width": 132}, "multiples of 8"),
    ]:
        result = comfy.run(regions_prompt(text, **size))
        assert not result.success and result.error["node_type"] == "MultiConceptRegions"
        assert (
            result.error["exception_message"].startswith("Regions: ") and message in result.error["exception_message"]
        )
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_regions_run"))
    assert after.success, after.error
