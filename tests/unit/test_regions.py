"""Region JSON: parsing, validation, clipping and masks (pure torch)."""

import json

import pytest
import torch

from multiconcept.samplers.regions import RegionError, box_mask, parse_regions


def _json(*boxes, **extra):
    return json.dumps({"version": 1, "boxes": list(boxes), **extra})


def test_fractions_become_pixels_and_round_trip():
    r = parse_regions(
        _json({"x": 0.25, "y": 0.5, "w": 0.5, "h": 0.25, "prompt": "a <cat1> <cat2>", "label": "cat"}), 64, 32
    )
    (reg,) = r.regions
    assert reg.box == (16.0, 16.0, 48.0, 24.0) and reg.prompt == "a <cat1> <cat2>" and reg.label == "cat"
    assert reg.color.startswith("#") and r.warnings == ()
    assert r.bboxes() == [[16, 16, 48, 24]]
    again = parse_regions(r.to_json(), 64, 32)
    assert again.regions[0].box == reg.box and again.regions[0].prompt == reg.prompt


def test_pixel_units_and_bare_lists():
    r = parse_regions(json.dumps({"units": "px", "boxes": [{"x": 8, "y": 8, "w": 16, "h": 8}]}), 64, 64)
    assert r.regions[0].box == (8.0, 8.0, 24.0, 16.0)
    assert len(parse_regions(json.dumps([{"x": 0, "y": 0, "w": 1, "h": 1}]), 8, 8)) == 1


def test_masks_equal_boxes_at_image_and_latent_resolution():
    r = parse_regions(_json({"x": 0.25, "y": 0.25, "w": 0.5, "h": 0.5}, {"x": 0, "y": 0, "w": 0.125, "h": 1}), 64, 64)
    img = r.masks()
    assert img.shape == (2, 64, 64) and img.dtype == torch.float32
    assert img[0].sum() == 32 * 32 and img[0, 16:48, 16:48].min() == 1 and img[0].max() == 1
    assert img[1, :, :8].min() == 1 and img[1, :, 8:].max() == 0
    lat = r.masks(8, 8)
    assert lat.shape == (2, 8, 8) and lat[0].sum() == 16 and lat[0, 2:6, 2:6].min() == 1


def test_fractional_boxes_give_partial_coverage():
    m = box_mask((0.5, 0.0, 2.0, 1.0), 1, 3)
    assert m.tolist() == [[0.5, 1.0, 0.0]]


def test_partly_outside_is_clipped_with_warning():
    r = parse_regions(_json({"x": -0.25, "y": 0.5, "w": 0.5, "h": 0.75, "label": "dog"}), 64, 64)
    assert r.regions[0].box == (0.0, 32.0, 16.0, 64.0)
    assert r.warnings and "dog" in r.warnings[0] and "clipped" in r.warnings[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"boxes": "x"}), '"boxes" list'),
        (_json(), "no boxes"),
        (_json({"x": 0, "y": 0, "w": 0, "h": 0.5}), "box 1 has no area"),
        (_json({"x": 0, "y": 0, "w": -1, "h": 0.5}), "box 1 has no area"),
        (_json({"x": float("nan"), "y": 0, "w": 0.1, "h": 0.5}).replace("NaN", "NaN"), "finite"),
        (_json({"x": 2, "y": 0, "w": 0.5, "h": 0.5, "label": "cat"}), "box 1 ('cat') lies entirely outside"),
        (_json({"x": "a", "y": 0, "w": 0.5, "h": 0.5}), "must be a number"),
        (_json({"y": 0, "w": 0.5, "h": 0.5}), "has no 'x'"),
        (_json(*[{"x": 0, "y": 0, "w": 0.1, "h": 0.1}] * 17), "at most 16"),
        (_json({"x": 0, "y": 0, "w": 0.1, "h": 0.1}, units="inch"), "units"),
    ],
)
def test_bad_input_names_the_problem(text, message):
    with pytest.raises(RegionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_regions(text, 64, 64)


def test_with_masks_prefers_masks_over_boxes():
    r = parse_regions(_json({"x": 0, "y": 0, "w": 0.5, "h": 0.5}), 4, 4)
    custom = torch.zeros(1, 4, 4)
    custom[0, 0, 0] = 1
    assert torch.equal(r.with_masks(custom).masks(), custom)
    with pytest.raises(RegionError):
        r.with_masks(torch.zeros(2, 4, 4))
