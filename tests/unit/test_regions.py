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


def _cover(start: float, stop: float, cells: int) -> list[float]:
    """Expected coverage of cells 0..cells-1 by [start, stop) along one axis (written out, not box_mask)."""
    return [max(0.0, min(i + 1.0, stop) - max(float(i), start)) for i in range(cells)]


def test_box_masks_on_a_non_square_image_at_latent_size():
    # 640x384 image, box x 68..328, y 100..280 px; the latent is 80 wide and 48 high (1/8 on both axes)
    r = parse_regions(json.dumps({"units": "px", "boxes": [{"x": 68, "y": 100, "w": 260, "h": 180}]}), 640, 384)
    m = r.box_masks(48, 80)[0]
    assert m.shape == (48, 80)
    # x 8.5..41, y 12.5..35 in latent cells: 32.5 x 22.5 cells
    assert float(m.sum()) == 32.5 * 22.5
    assert m[:, :8].max() == 0 and m[:, 41:].max() == 0 and m[:12].max() == 0 and m[35:].max() == 0
    assert m[13:35, 9:41].min() == 1
    assert m[12, 8] == 0.25 and m[12, 9] == 0.5 and m[13, 8] == 0.5 and m[34, 40] == 1
    assert m.sum(0).tolist() == [22.5 * c for c in _cover(8.5, 41, 80)]  # column sums: x coverage
    assert m.sum(1).tolist() == [32.5 * c for c in _cover(12.5, 35, 48)]  # row sums: y coverage
    assert torch.equal(r.masks(48, 80)[0], m)  # masks() falls back to the same box mask


def test_box_masks_scale_each_axis_by_its_own_factor():
    # 640x384 image to 40 wide (1/16) and 96 high (1/4): x 68..328 -> 4.25..20.5, y 100..280 -> 25..70
    r = parse_regions(
        json.dumps(
            {
                "units": "px",
                "boxes": [{"x": 68, "y": 100, "w": 260, "h": 180}, {"x": 0, "y": 0, "w": 320, "h": 96}],
            }
        ),
        640,
        384,
    )
    masks = r.box_masks(96, 40)
    assert masks.shape == (2, 96, 40)
    m = masks[0]
    assert m.sum(0).tolist() == [45.0 * c for c in _cover(4.25, 20.5, 40)]
    assert m.sum(1).tolist() == [16.25 * c for c in _cover(25, 70, 96)]
    assert float(m.sum()) == 16.25 * 45
    # the second box: the left half, top quarter of the image
    assert masks[1][:24, :20].min() == 1 and float(masks[1].sum()) == 24 * 20
    # at image size nothing is scaled
    full = r.box_masks()
    assert full.shape == (2, 384, 640) and float(full[0].sum()) == 260 * 180
    assert full[0, 100:280, 68:328].min() == 1 and float(full[1].sum()) == 320 * 96
