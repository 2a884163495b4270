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
"""

from __future__ import annotations

import math

SAMPLES_PER_PICTURE = 500
NORM_THRESHOLD = 0.55
WEIGHT_DECAY = 0.01
NOISE_OFFSET = 0.01
ATTENTION_WEIGHT = 0.01
OFFICIAL_BATCH = 4  # batch_size_per_gpu 2 on the 2 GPUs the config names say ("B4")
RANDOM_WORD_STD = 0.013

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
