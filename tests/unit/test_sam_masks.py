"""SAM: architecture from shapes, batched box prompts, mask clean-up maths."""

import math

import pytest
import torch

from multiconcept.samplers.regions.sam import (
    SamFileError,
    build_sam,
    clip_box,
    default_global_indexes,
    detect_sam_architecture,
    dilate,
    feather,
    keep_inside_box,
    load_sam,
    masks_for_boxes,
)
from tests.support.builders.sam import (
    assert_matches_reference,
    assert_reference_is_telling,
    build_tiny_sam,
    predictor_reference,
    textured_image,
)


def synthetic_state_dict(embed, depth, heads, global_idx, img=1024, patch=16, window=14):
    """Only the keys detection reads, with real SAM shapes (cheap empty tensors)."""
    grid = img // patch
    sd = {
        "image_encoder.patch_embed.proj.weight": torch.empty(embed, 3, patch, patch),
        "image_encoder.pos_embed": torch.empty(1, grid, grid, embed),
        "image_encoder.neck.0.weight": torch.empty(256, embed, 1, 1),
        "prompt_encoder.mask_downscaling.3.weight": torch.empty(16, 4, 2, 2),
        "mask_decoder.mask_tokens.weight": torch.empty(4, 256),
        "mask_decoder.iou_prediction_head.layers.0.weight": torch.empty(256, 256),
        "mask_decoder.iou_prediction_head.layers.1.weight": torch.empty(256, 256),
        "mask_decoder.iou_prediction_head.layers.2.weight": torch.empty(4, 256),
    }
    for i in range(2):
        sd[f"mask_decoder.transformer.layers.{i}.mlp.lin1.weight"] = torch.empty(2048, 256)
    for i in range(depth):
        size = grid if i in global_idx else window
        sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = torch.empty(2 * size - 1, embed // heads)
        sd[f"image_encoder.blocks.{i}.mlp.lin1.weight"] = torch.empty(4 * embed, embed)
    return sd


@pytest.mark.parametrize(
    "name, embed, depth, heads, global_idx",
    [
        ("vit_b", 768, 12, 12, (2, 5, 8, 11)),
        ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
        ("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    ],
)
def test_official_architectures_are_read_from_shapes(name, embed, depth, heads, global_idx):
    spec = detect_sam_architecture(synthetic_state_dict(embed, depth, heads, global_idx))
    assert (spec.name, spec.embed_dim, spec.depth, spec.num_heads) == (name, embed, depth, heads)
    assert spec.global_attn_indexes == global_idx and spec.window_size == 14 and spec.img_size == 1024
    assert spec.out_chans == 256 and spec.mask_in_chans == 16 and spec.num_multimask_outputs == 3


def test_prefixed_and_non_sam_dicts():
    sd = {"model." + k: v for k, v in synthetic_state_dict(768, 12, 12, (2, 5, 8, 11)).items()}
    assert detect_sam_architecture(sd).name == "vit_b"
    with pytest.raises(SamFileError, match="patch_embed"):
        detect_sam_architecture({"model.diffusion_model.input_blocks.0.0.weight": torch.empty(1)})


def test_tiny_model_round_trips_through_detection():
    sam, spec = load_sam(build_tiny_sam().state_dict())
    assert spec.name == "custom" and spec.embed_dim == 64 and spec.depth == 2 and spec.global_attn_indexes == (1,)
    broken = build_tiny_sam().state_dict()
    broken["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    with pytest.raises(SamFileError, match="do not fit"):
        load_sam(broken)


def test_masks_for_boxes_one_per_box():
    sam, _ = load_sam(build_tiny_sam().state_dict())
    image = torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(0))
    boxes = [[4, 4, 30, 40], [40, 8, 76, 44], [0, 0, 80, 48]]
    masks, scores = masks_for_boxes(sam, image, boxes)
    assert masks.shape == (3, 48, 80) and masks.dtype == torch.float32 and scores.shape == (3,)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    for m, b in zip(masks, boxes, strict=True):
        inside = keep_inside_box(m, b)
        assert inside.sum() <= m.sum()
        assert inside[:, : b[0]].sum() == 0 and inside[: b[1]].sum() == 0 and inside[:, b[2] :].sum() == 0


def test_dilate_erode_exact():
    m = torch.zeros(7, 7)
    m[3, 3] = 1
    grown = dilate(m, 1)
    assert grown.sum() == 9 and grown[2:5, 2:5].min() == 1
    assert torch.equal(dilate(grown, -1), m)
    assert torch.equal(dilate(m, 0), m)


def test_feather_softens_but_stays_in_range_and_keeps_flat_regions():
    m = torch.zeros(9, 9)
    m[:, :4] = 1
    f = feather(m, 2)
    assert f.min() >= 0 and f.max() <= 1
    assert f[4, 0] == pytest.approx(1.0) and f[4, 8] == pytest.approx(0.0)
    assert 0 < f[4, 3] < 1 and 0 < f[4, 4] < 1
    assert torch.equal(feather(m, 0), m)


def test_keep_inside_box_zeroes_outside():
    m = torch.ones(6, 6)
    k = keep_inside_box(m, (1.5, 2, 4, 5.2))
    assert k.sum() == 3 * 4 and k[2:6, 1:4].min() == 1  # rounded outward: x 1..4, y 2..6


def test_without_rel_pos_the_official_layout_is_assumed():
    sd = synthetic_state_dict(1280, 32, 16, ())
    for k in [k for k in sd if "rel_pos" in k]:
        del sd[k]
    with pytest.raises(SamFileError, match="qkv"):
        detect_sam_architecture(sd)
    sd["image_encoder.blocks.0.attn.qkv.weight"] = torch.empty(3 * 1280, 1280)
    spec = detect_sam_architecture(sd)
    assert (spec.name, spec.num_heads, spec.global_attn_indexes, spec.use_rel_pos) == (
        "vit_h",
        16,
        (7, 15, 23, 31),
        False,
    )
    assert default_global_indexes(12) == (2, 5, 8, 11) and default_global_indexes(24) == (5, 11, 17, 23)
    assert default_global_indexes(8) == (1, 3, 5, 7) and default_global_indexes(2) == (0, 1)


def test_build_sam_from_a_state_dict_loads_the_weights():
    from segment_anything.modeling import Sam

    reference = build_tiny_sam(seed=3)
    sam = build_sam(reference.state_dict())
    assert isinstance(sam, Sam) and sam.image_encoder.img_size == 256
    for (k, a), b in zip(reference.state_dict().items(), sam.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_feather_exact_values_on_a_step():
    m = torch.zeros(3, 9)
    m[:, :4] = 1
    f = feather(m, 1)  # sigma 0.5: kernel [e^-2, 1, e^-2] / (1 + 2 e^-2), edges replicated
    z = 1 + 2 * math.exp(-2)
    expected = torch.tensor([1, 1, 1, (1 + math.exp(-2)) / z, math.exp(-2) / z, 0, 0, 0, 0], dtype=torch.float32)
    for row in f:
        assert torch.allclose(row, expected, atol=1e-6)


def test_dilate_and_erode_exact_on_a_block():
    m = torch.zeros(8, 8)
    m[2:6, 2:6] = 1  # 4x4 block
    assert dilate(m, 2).sum() == 64 and dilate(m, 1).sum() == 36 and dilate(m, 1)[1:7, 1:7].min() == 1
    eroded = dilate(m, -1)
    assert eroded.sum() == 4 and eroded[3:5, 3:5].min() == 1
    assert dilate(m, -2).sum() == 0
    assert torch.equal(dilate(torch.stack([m, m]), 1)[1], dilate(m, 1))  # batched [N, H, W]


def test_masks_for_boxes_uint8_single_mask_and_no_boxes():
    sam, _ = load_sam(build_tiny_sam().state_dict())
    image = torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(1))
    as_uint8 = (image * 255).round().to(torch.uint8)
    a, _ = masks_for_boxes(sam, image, [[2, 2, 20, 30]], multimask=False)
    b, _ = masks_for_boxes(sam, as_uint8, [[2, 2, 20, 30]], multimask=False)
    assert a.shape == (1, 40, 40) and torch.equal(a, b)
    empty, scores = masks_for_boxes(sam, image, [])
    assert empty.shape == (0, 40, 40) and scores.shape == (0,)


def test_clean_up_chain_never_leaves_the_box():
    sam, _ = load_sam(build_tiny_sam().state_dict())
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2))
    box = [10.5, 12, 40, 50.2]
    masks, _ = masks_for_boxes(sam, image, [box])
    m = keep_inside_box(feather(dilate(masks[0], 8), 4), box)
    assert m.min() >= 0 and m.max() <= 1
    outside = m.clone()
    outside[12:51, 10:40] = 0
    assert outside.sum() == 0


# ------------------------------------------------------------- against segment-anything's own predictor


SCENES = [  # (height, width, boxes in pixels): smaller and larger than the model's 256 px input
    (48, 80, [[4, 4, 30, 40], [40, 8, 76, 44], [20.5, 10.25, 61, 47.5]]),
    (96, 64, [[2, 6, 40, 60], [24, 40, 62, 94], [8, 30, 56, 70]]),
    (200, 320, [[10, 20, 150, 190], [170, 5, 310, 120], [90, 60, 250, 160]]),
]


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("h, w, boxes", SCENES, ids=[f"{h}x{w}" for h, w, _ in SCENES])
def test_masks_for_boxes_equal_sam_predictor_on_each_box_alone(h, w, boxes, multimask):
    """Our batched masks, before any clean-up, are exactly SamPredictor's for each box on its own.

    Catches masks that are empty, that ignore the box (e.g. the whole-image box used for every box), that
    belong to another box, or that pick a different candidate than the best predicted IoU."""
    sam, _ = load_sam(build_tiny_sam().state_dict())
    image = textured_image(h, w, seed=h + w)
    reference, logits, ref_scores = predictor_reference(sam, image, boxes, multimask)
    full, _, _ = predictor_reference(sam, image, [[0, 0, w, h]], multimask)
    assert_reference_is_telling(reference, full[0])
    masks, scores = masks_for_boxes(sam, image.float() / 255, boxes, multimask=multimask)  # ComfyUI IMAGE floats
    assert masks.dtype == torch.float32 and masks.shape == (len(boxes), h, w)
    assert_matches_reference(masks, reference, logits)
    assert torch.allclose(scores, ref_scores, atol=1e-5), (scores, ref_scores)


def test_the_tiny_sam_gives_masks_that_depend_on_the_box():
    """The test model itself: masks neither empty nor full, and different boxes give different masks."""
    sam = build_tiny_sam()
    image = textured_image(64, 64, seed=7)
    boxes = [[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64], [16, 16, 48, 48]]
    for multimask in (True, False):
        reference, logits, _ = predictor_reference(sam, image, boxes, multimask)
        full, _, _ = predictor_reference(sam, image, [[0, 0, 64, 64]], multimask)
        assert_reference_is_telling(reference, full[0])
        assert logits.abs().max() < 10  # logits near zero: a change of box moves the threshold crossing


def test_clip_box():
    assert clip_box((-5, -1e308, 1e308, 30), 64, 48) == (0.0, 0.0, 64.0, 30.0)
    assert clip_box((1.5, 2.5, 10, 20), 64, 48) == (1.5, 2.5, 10.0, 20.0)
    assert clip_box((70, 0, 1e308, 10), 64, 48) is None and clip_box((0, -20, 10, 0), 64, 48) is None
