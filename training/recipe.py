"""Mix-of-Show's ED-LoRA recipe as numbers and small rules (pure Python/torch; no ComfyUI).

Every official value below cites where it lives in TencentARC/Mix-of-Show (the real-person configs
``options/train/EDLoRA/real/8101_EDLoRA_potter_Cmix_B4_Repeat500.yml`` and its siblings, which all agree):

* samples per picture: ``dataset_enlarge_ratio: 500`` (the thanos config uses 250); the number of optimiser
  steps is ``len(dataset) / total_batch_size`` (``train_edlora.py`` l. 73-74), i.e. ``pictures × 500 / batch``;
* learning rate: ``scheduler: linear``, built as diffusers' ``get_scheduler('linear', num_warmup_steps=0,
  num_training_steps=total_iter)`` (``train_edlora.py`` l. 85-90): step ``k`` of ``T`` uses ``lr × (T − k) / T``;
* ``emb_norm_threshold: 0.55``: once the mean norm of the concept's token embeddings reaches it, they are frozen
  for the rest of the run (``train_edlora.py`` l. 138-143);
* AdamW ``weight_decay: 0.01``, ``betas: [0.9, 0.999]`` for every group, embeddings included (the embedding
  group sets no decay of its own: ``trainer_edlora.py`` l. 90-93);
* ``noise_offset: 0.01`` (``trainer_edlora.py`` l. 207-209), ``attn_reg_weight: 0.01``, ``reg_full_identity:
  false`` for real people, ``use_mask_loss: true``;
* ``initializer_token: <rand-0.013>+man``: one random vector (std 0.013) or the class word's embedding, copied
  to all 16 layers (``trainer_edlora.py`` l. 170-185);
* LoRA layers: ``kaiming_uniform_(down, a=√5)``, ``up = 0`` (``mixofshow/models/edlora.py``, LoRALinearLayer).

SDXL (no Mix-of-Show recipe exists): Concept Conductor's SDXL trainer, Nihukat/Concept-Conductor @44c6693,
``configs/edlora/train_sdxl/chow_dog.yml`` (and ``mitsuha_girl.yml``, which agrees), ``train_edlora_sdxl.py`` and
``mixofshow/pipelines/trainer_edlora_sdxl.py``:

* ``size: 1024`` (l. 14), ``batch_size_per_gpu: 1`` (l. 21), ``dataset_enlarge_ratio: 2000`` (l. 22): pictures ×
  2000 samples, one per step;
* learning rates (l. 39-63): CLIP-L embeddings 1e-3, CLIP-G embeddings 5e-4, CLIP-L LoRA 1e-5 (rank 4), CLIP-G
  LoRA 2e-6 (rank 32), UNet LoRA 5e-5 (rank 32); the same ``linear`` schedule, AdamW decay 0.01, noise offset,
  attention regulariser and crop augmentation as Mix-of-Show;
* the embedding rule: frozen once the CLIP-L mean norm reaches 0.55 (l. 88) or the CLIP-G one 1.5
  (``train_edlora_sdxl.py`` l. 164, ``emb_norm_threshold_2`` default);
* ``mixed_precision: bf16`` (l. 3), ``gradient_accumulation_steps: 1`` (l. 4), ``gradient_checkpoint: false`` (l. 70).

Where we differ from that trainer on purpose (the help page says so too): the CLIP-G embeddings start from the
class word's CLIP-G embedding (the trainer computes ``init_feature_2`` but writes only the CLIP-L rows, l. 248-266,
so its CLIP-G rows keep whatever ``resize_token_embeddings`` put there); when the CLIP-L rule freezes the run, the
CLIP-G embeddings stay as they are (the trainer puts them back to their start, l. 159-166, since it copies them only
when the CLIP-G rule fires); the size conditioning is the picture's size (the trainer passes ``latents.shape[1] * 8``
= 32, the latent's channel count, as the original height, l. 313).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLES_PER_PICTURE = 500
NORM_THRESHOLD = 0.55
WEIGHT_DECAY = 0.01
NOISE_OFFSET = 0.01
ATTENTION_WEIGHT = 0.01
OFFICIAL_BATCH = 4  # batch_size_per_gpu 2 on the 2 GPUs the config names say ("B4")
RANDOM_WORD_STD = 0.013

# TrainSettings' "the family's official value": a learning rate of AUTO_RATE, a size/rank/batch of 0
AUTO_RATE = -1.0

LR_SCHEDULES = ("linear to 0", "constant")
EMBEDDING_RULES = ("freeze at mean norm", "cap each row", "off")


def auto_steps(num_pictures: int, batch_size: int, samples_per_picture: int = SAMPLES_PER_PICTURE) -> int:
    """Optimiser steps for ``samples_per_picture`` samples of each picture at ``batch_size`` per step."""
    return max(1, math.ceil(num_pictures * samples_per_picture / max(1, batch_size)))


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier of 0-based ``step`` of ``total`` (diffusers' 'linear' without warm-up)."""
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total))


def lora_down_bound(in_features: int) -> float:
    """``kaiming_uniform_(a=√5)``'s bound for a ``[rank, in]`` weight: gain √(2/(1+5)) × √(3/in) = 1/√in."""
    return 1.0 / math.sqrt(in_features)


@dataclass(frozen=True)
class FamilyRecipe:
    """One base-model family's official values, per text encoder (ComfyUI clip key) where they differ."""

    source: str
    resolution: int
    batch_size: int
    samples_per_picture: int
    lr_embedding: dict[str, float]
    lr_text: dict[str, float]
    lr_unet: float
    rank_text: dict[str, int]
    rank_unet: int
    norm_threshold: dict[str, float]


RECIPES = {
    "sd15": FamilyRecipe(
        source="Mix-of-Show (TencentARC/Mix-of-Show, options/train/EDLoRA/real/8101_EDLoRA_potter*.yml)",
        resolution=512,
        batch_size=OFFICIAL_BATCH,
        samples_per_picture=SAMPLES_PER_PICTURE,
        lr_embedding={"l": 1e-3},
        lr_text={"l": 1e-5},
        lr_unet=1e-4,
        rank_text={"l": 4},
        rank_unet=4,
        norm_threshold={"l": NORM_THRESHOLD},
    ),
    "sdxl": FamilyRecipe(
        source="Concept Conductor's SDXL trainer (Nihukat/Concept-Conductor, configs/edlora/train_sdxl/*.yml)",
        resolution=1024,
        batch_size=1,
        samples_per_picture=2000,
        lr_embedding={"l": 1e-3, "g": 5e-4},
        lr_text={"l": 1e-5, "g": 2e-6},
        lr_unet=5e-5,
        rank_text={"l": 4, "g": 32},
        rank_unet=32,
        norm_threshold={"l": NORM_THRESHOLD, "g": 1.5},
    ),
}


def chosen(value, official, auto=0):
    """``value`` unless it is the "official" sentinel ``auto`` (0 for sizes, ranks, batches; AUTO_RATE for rates)."""
    return official if value == auto else value
