"""Mix-of-Show's ED-LoRA recipe, pinned (issue 27): each official default with the file and line it comes from,
and each rule against its formula on small tensors — the LoRA initialisation's distribution, the step count, the
linear learning-rate decay, the attention regulariser, the crop-and-place augmentation (the top kept, the black
border outside the loss), the caption augmentation.

Official source: TencentARC/Mix-of-Show @51270fd (train_edlora.py, mixofshow/pipelines/trainer_edlora.py,
mixofshow/models/edlora.py, mixofshow/data/pil_transform.py, options/train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from multiconcept.training import recipe
from multiconcept.training.augment import (
    CAPTION_MODES,
    IMAGE_MODES,
    TEMPLATES,
    augment_caption,
    official_crop,
    short_side_to,
    shuffle_caption,
)
from multiconcept.training.edlora_params import LoRADelta
from multiconcept.training.losses import denoising_loss, mean_norm, mixofshow_attention_loss

# ------------------------------------------------------------------------------------------ the defaults


def test_trainer_settings_default_to_the_official_recipe():
    from multiconcept.training.edlora_trainer import TrainSettings

    s = TrainSettings(concept_words=("<a1>", "<a2>"), class_word="man").resolved("sd15", 10)
    assert s.steps == 1250 and recipe.SAMPLES_PER_PICTURE == 500  # dataset_enlarge_ratio: 500 (8101 yml l. 22)
    assert s.batch_size == 4  # batch_size_per_gpu: 2 (l. 21) on two GPUs: "B4" in the config's name
    assert (s.lr_embedding, s.lr_text, s.lr_unet) == (1e-3, 1e-5, 1e-4)  # finetune_cfg lr (l. 39, 46, 53)
    assert s.rank == s.rank_text == 4  # lora_cfg rank (l. 43, 50)
    assert s.weight_decay == 0.01  # optim_g weight_decay (l. 72), on every group (trainer_edlora.py l. 90-93)
    assert s.lr_schedule == "linear to 0"  # scheduler: linear (l. 77); no warm-up (train_edlora.py l. 85-90)
    assert s.embedding_rule == "freeze at mean norm" and s.norm_cap == 0.55  # emb_norm_threshold (l. 78)
    assert s.noise_offset == 0.01  # noise_offset (l. 56)
    assert s.attention_weight == 0.01 and s.attention_regulariser == "mix-of-show"  # attn_reg_weight (l. 57)
    assert s.full_identity is False  # reg_full_identity: false (l. 58)
    assert s.masked_loss is True  # use_mask_loss: true (l. 59)
    assert s.image_augmentation == IMAGE_MODES[0]  # HumanResizeCropFinalV3, size 512, crop_p 0.5 (l. 14)
    assert s.caption_augmentation == CAPTION_MODES[0] == "shuffle + human templates"  # l. 17-18
    assert s.sample_posterior is True  # vae.encode(images).latent_dist.sample() (trainer_edlora.py l. 203)
    assert s.resolution == 512  # size: 512 (l. 14)
    assert recipe.RANDOM_WORD_STD == 0.013  # initializer_token: <rand-0.013>+man (l. 55)
    assert (s.gradient_checkpointing, s.accumulation) == (False, 1)  # (no such options in the official configs)
    assert (s.lr_embedding_g, s.lr_text_g, s.rank_text_g) == (0.0, 0.0, 0)  # SD1.5 has no CLIP-G


def test_sdxl_settings_default_to_concept_conductors_sdxl_recipe():
    # Nihukat/Concept-Conductor @44c6693, configs/edlora/train_sdxl/chow_dog.yml (mitsuha_girl.yml agrees)
    from multiconcept.training.edlora_trainer import TrainSettings

    s = TrainSettings(concept_words=("<a1>", "<a2>"), class_word="dog").resolved("sdxl", 3)
    assert s.resolution == 1024  # HumanResizeCropFinalV3 size: 1024 (l. 14)
    assert s.batch_size == 1  # batch_size_per_gpu: 1 (l. 21)
    assert (
        s.steps == 3 * 2000
    )  # dataset_enlarge_ratio: 2000 (l. 22); total_iter = len / batch (train_edlora_sdxl.py l. 82)
    assert (s.lr_embedding, s.lr_embedding_g) == (1e-3, 5e-4)  # text_embedding lr (l. 39), text_embedding_2 (l. 42)
    assert (s.lr_text, s.rank_text) == (1e-5, 4)  # text_encoder lr (l. 49), rank (l. 46)
    assert (s.lr_text_g, s.rank_text_g) == (2e-6, 32)  # text_encoder_2 lr (l. 56), rank (l. 53)
    assert (s.lr_unet, s.rank) == (5e-5, 32)  # unet lr (l. 63), rank (l. 60)
    assert s.norm_cap == 0.55  # emb_norm_threshold (l. 88)
    assert s.norm_cap_g == 1.5  # train_opt.get('emb_norm_threshold_2', 1.5) (train_edlora_sdxl.py l. 164)
    assert s.noise_offset == 0.01 and s.attention_weight == 0.01  # noise_offset (l. 66), attn_reg_weight (l. 67)
    assert s.weight_decay == 0.01 and s.lr_schedule == "linear to 0"  # weight_decay (l. 82), scheduler (l. 87)
    assert s.gradient_checkpointing is False and s.accumulation == 1  # gradient_checkpoint (l. 70), l. 4


def test_explicit_values_win_and_clip_g_follows_an_explicit_clip_l_value():
    from multiconcept.training.edlora_trainer import TrainSettings

    s = TrainSettings(concept_words=("<a1>",), class_word="dog", lr_embedding=2e-3, rank=8, batch_size=2,
                      resolution=768, steps=10, lr_text=0.0).resolved("sdxl", 4)  # fmt: skip
    assert (s.lr_embedding, s.lr_embedding_g, s.lr_text, s.lr_text_g) == (2e-3, 2e-3, 0.0, 0.0)
    assert (s.rank, s.rank_text, s.rank_text_g, s.batch_size, s.resolution, s.steps) == (8, 8, 8, 2, 768, 10)
    assert s.lr_unet == 5e-5 and s.norm_cap_g == 1.5  # untouched ones stay official; thresholds never follow
    off = TrainSettings(concept_words=("<a1>",), class_word="dog", norm_cap=0.0).resolved("sdxl", 4)
    assert off.norm_cap == off.norm_cap_g == 0.0


def test_step_count_is_pictures_times_500_over_the_batch():
    # train_edlora.py l. 73-74: total_iter = len(dataset) / total_batch_size, len = pictures × enlarge ratio
    assert recipe.auto_steps(10, 4) == 1250
    assert recipe.auto_steps(7, 4) == math.ceil(7 * 500 / 4)
    assert recipe.auto_steps(3, 1) == 1500


def test_learning_rate_falls_linearly_to_zero():
    # diffusers get_scheduler('linear', num_warmup_steps=0, num_training_steps=T): lr × (T − k) / T at step k
    total = 1250
    for step in (0, total // 2, total - 1):
        assert recipe.lr_factor("linear to 0", step, total) == pytest.approx((total - step) / total)
    assert recipe.lr_factor("linear to 0", 0, total) == 1.0
    assert recipe.lr_factor("constant", total - 1, total) == 1.0


def test_lora_down_starts_as_kaiming_uniform_and_up_at_zero():
    # mixofshow/models/edlora.py LoRALinearLayer: kaiming_uniform_(lora_down.weight, a=√5), zeros_(lora_up.weight)
    g = torch.Generator().manual_seed(0)
    for fan_in in (320, 768, 1280):
        lora = LoRADelta(640, fan_in, 4, g)
        std = float(lora.down.detach().std())
        assert abs(std / (1 / math.sqrt(3 * fan_in)) - 1) < 0.2, fan_in
        assert float(lora.down.abs().max()) <= 1 / math.sqrt(fan_in)
        assert float(lora.up.abs().max()) == 0.0
        reference = torch.empty(4, fan_in)
        torch.nn.init.kaiming_uniform_(reference, a=math.sqrt(5))  # the official call, for the bound
        assert float(lora.down.abs().max()) <= float(reference.abs().max()) * 1.001 + 1e-3


def test_mean_norm_is_over_every_row_of_every_word():
    a, b = torch.zeros(3, 4), torch.zeros(3, 4)
    a[:, 0] = 1.0  # norm 1 in every layer
    b[0, 1] = 3.0  # norm 3 in one layer, 0 elsewhere
    assert mean_norm([a, b]) == pytest.approx((3 * 1 + 3) / 6)


# ------------------------------------------------------------------------------------------ the losses


def _official_attention_reg(groups: dict, masks: torch.Tensor, weight: float, full_identity: bool) -> torch.Tensor:
    """cal_attn_reg of trainer_edlora.py l. 295-313, written out from the official code on ``[B, res, res, 2]``
    maps (word 0 the "adjective", word 1 the subject) and ``[B, 1, 64, 64]`` masks."""
    total = 0
    for cross_map in groups.values():
        map_adjective, map_subject = cross_map[..., 0], cross_map[..., 1]
        map_subject = map_subject / map_subject.max()
        map_adjective = map_adjective / map_adjective.max()
        gt_mask = F.interpolate(masks, size=map_subject.shape[1:], mode="nearest").squeeze(1)
        if full_identity:
            loss_subject = F.mse_loss(map_subject.float(), gt_mask.float(), reduction="mean")
        else:
            loss_subject = map_subject[gt_mask == 0].mean()
        loss_adjective = map_adjective[gt_mask == 0].mean()
        total += weight * (loss_subject + loss_adjective)
    return total


@pytest.mark.parametrize("full_identity", [False, True])
def test_attention_regulariser_equals_the_official_formula(full_identity):
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 4:12, 2:10] = 1
    masks[1, :, 0:8, 8:16] = 1
    groups = {res: torch.rand(2, res, res, 2, generator=g) for res in (16, 8, 4)}
    official = _official_attention_reg(groups, masks, 0.01, full_identity)
    ours = mixofshow_attention_loss({(r, r): m.permute(0, 3, 1, 2) for r, m in groups.items()}, masks[:, 0], 0.01,
                                    full_identity)  # fmt: skip
    assert float(official) > 0
    assert torch.allclose(ours, torch.as_tensor(official).float(), rtol=1e-5, atol=1e-8)


def test_attention_regulariser_is_zero_for_maps_inside_the_mask_and_skipped_for_full_masks():
    masks = torch.zeros(1, 16, 16)
    masks[:, 4:12, 4:12] = 1
    maps = {}
    for res in (16, 8, 4):
        inside = F.interpolate(masks[:, None], size=(res, res), mode="nearest")[:, 0]
        maps[(res, res)] = torch.stack([inside * 0.3, inside * 0.7], 1)  # every word's map inside the mask
    assert float(mixofshow_attention_loss(maps, masks, 0.01)) == 0.0
    # a mask with no pixel outside: the official term is NaN and dropped (trainer_edlora.py l. 257): here 0
    assert float(mixofshow_attention_loss(maps, torch.ones(1, 16, 16), 0.01)) == 0.0
    moved = {hw: m.roll(shifts=hw[0] // 2, dims=-1) for hw, m in maps.items()}
    assert float(mixofshow_attention_loss(moved, masks, 0.01)) > 0  # out of the mask: penalised


# ------------------------------------------------------------------------------------------ augmentation


def _portrait(h=96, w=64):
    """A tall picture whose every row has its own value (so rows can be told apart after resizing)."""
    rows = torch.linspace(0.05, 0.95, h)[:, None].expand(h, w)
    return torch.stack([rows, 1 - rows, rows * 0 + 0.5])


class _Always(random.Random):
    """A generator whose ``random()`` is 0 (the crop always happens); the rest as seeded."""

    def random(self):
        return 0.0


def test_crop_of_a_tall_picture_keeps_its_top_and_places_it_whole():
    image = short_side_to(_portrait(), 64)  # shorter side to the resolution: 64 × 96
    assert tuple(image.shape[-2:]) == (96, 64)
    for seed in range(6):
        canvas, subject, area = official_crop(image, None, 64, _Always(seed))
        rows, cols = area.nonzero(as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        assert subject is None and float(area.sum()) > 0
        # the top of the picture is the top of what was placed (the crop starts at row 0)
        assert float(canvas[0, top, left + 1]) == pytest.approx(float(image[0, 0, 1]), abs=0.03)
        # the long edge fits the canvas: torchvision resize(size=R−1, max_size=R) gives a long edge of R, or R−1
        # both ways when the crop came out square; the rest is black
        placed = (int(rows.max()) - top + 1, int(cols.max()) - left + 1)
        assert max(placed) == 64 or placed == (63, 63), placed
        assert float(canvas[:, area == 0].abs().max()) == 0.0


def test_uncropped_pictures_keep_everything_and_masks_follow_the_picture():
    image = short_side_to(_portrait(), 64)
    mask = torch.zeros(96, 64)
    mask[10:40, 20:44] = 1
    never = random.Random(0)
    never.random = lambda: 1.0  # crop_p 0.5 not met: no crop
    canvas, subject, area = official_crop(image, mask, 64, never)
    rows, cols = area.nonzero(as_tuple=True)
    placed_h, placed_w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    assert (placed_h, placed_w) == (64, 42)  # 96×64 with its long edge to 64: 64×42 (int(64 × 64 / 96))
    assert float(canvas[0, int(rows.min()), int(cols.min()) + 1]) == pytest.approx(float(image[0, 0, 1]), abs=0.03)
    assert float(canvas[0, int(rows.max()), int(cols.min()) + 1]) == pytest.approx(float(image[0, -1, 1]), abs=0.03)
    assert float(subject[area == 0].abs().max()) == 0.0 and 0 < float(subject.sum()) < float(area.sum())


def test_loss_over_the_picture_area_ignores_the_black_border():
    image = short_side_to(_portrait(), 64)
    never = random.Random(1)
    never.random = lambda: 1.0  # no crop: the tall picture is placed 64×42, with a wide black border
    _canvas, _subject, area = official_crop(image, None, 64, never)
    area8 = F.interpolate(area[None, None], size=(8, 8), mode="nearest")[:, 0]
    assert 0 < float(area8.sum()) < 64  # a border at the latent's size
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    base = denoising_loss(pred, target, area8)
    changed = pred.clone()
    changed[:, :, area8[0] == 0] = 50.0
    assert torch.equal(denoising_loss(changed, target, area8), base)


def test_caption_augmentation_keeps_the_first_part_and_uses_the_official_templates():
    rng = random.Random(0)
    caption = "<a1> <a2>, on a red sofa, by a window, at night"
    seen = set()
    for _ in range(20):
        shuffled = shuffle_caption(caption, rng)
        assert shuffled.startswith("<a1> <a2>, ") and sorted(shuffled.split(", ")) == sorted(caption.split(", "))
        seen.add(shuffled)
    assert len(seen) > 1
    text = augment_caption(caption, "shuffle + human templates", random.Random(5))
    assert any(text == t.format(text[len(t.split("{}")[0]) :]) for t in TEMPLATES["human"])
    assert "<a1> <a2>," in text
    assert augment_caption(caption, "off", rng) == caption
    assert len(TEMPLATES["human"]) == 19 and TEMPLATES["human"][0] == "a photo of a {}"  # pil_transform.py EnhanceText
