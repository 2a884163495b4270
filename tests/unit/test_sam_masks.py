"""SAM: architecture from shapes, batched box prompts, mask clean-up maths."""

import pytest
import torch

from multiconcept.samplers.sam_masks import (
    SamFileError,
    detect_sam_architecture,
    dilate,
    feather,
    keep_inside_box,
    load_sam,
    masks_for_boxes,
)
from tests.support.tiny_sam import build_tiny_sam


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
