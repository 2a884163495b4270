"""Concept Conductor's starting masks when the user gives neither boxes nor masks: the reference's own subjects, as
the official method takes them (Nihukat/Concept-Conductor ``configs/sample_config.yaml`` ``ref_mask_paths``: the
masks of the reference image's subjects). Without a reference image the reference is the scene prompt sampled
from the same noise, so its subjects are found in that sample: each concept's class word's cross-attention
(averaged over the steps and the layers at 1/2 and 1/4 of the latent's side) gives a box, which SAM refines to the
subject's outline when a SAM model is connected, as OMG's automatic masks do (the same machinery:
``samplers/omg``). ComfyUI glue; the maths is in ``omg/blend.py`` and ``regions/sam.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..omg.layout import LayoutStore
from ..omg.stages import attention_boxes, class_word_tokens, masks_from_boxes, run_stage1

THRESHOLD = 0.4  # share of a class word's peak attention that counts as the subject (OMG's default)


@dataclass
class ReferenceMasks:
    masks: torch.Tensor  # [N, H, W] at image size, stack order
    boxes: list  # the attention boxes, pixels
    image: torch.Tensor  # the decoded reference sample [1, H, W, 3]
    refined: bool  # SAM refined the boxes
    how: str  # what the user is told

    def __deepcopy__(self, memo):
        return self


def reference_masks(model, clip, vae, stack, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
                    scheduler: str, scene_prompt: str, positive, negative, sam=None) -> ReferenceMasks:  # fmt: skip
    """Sample ``positive`` (the scene) plainly from ``seed``, keep the class words' attention, and return each
    concept's mask (stack order). Every concept needs its class word in ``scene_prompt`` (OMGError otherwise)."""
    samples = latent["samples"]
    lat_h, lat_w = int(samples.shape[-2]), int(samples.shape[-1])
    width, height = lat_w * 8, lat_h * 8
    words = class_word_tokens(clip, scene_prompt, list(stack))
    # only the word maps are kept: the layout replay is OMG's and is switched off (budget 0)
    store = LayoutStore(max(1, steps - 1), max(2, steps), (lat_h, lat_w), seed, 0, words)
    try:
        run_stage1(model, positive, negative, latent, seed, max(2, steps), cfg, sampler_name, scheduler, store,
                   disable_pbar=True)  # fmt: skip
        image = vae.decode(store.final[:1])
        boxes = attention_boxes(store, width, height, THRESHOLD)
    finally:
        store.free()
    masks, refined = masks_from_boxes(boxes, width, height, image, sam, keep_in_box=False)
    how = "the reference's subjects: each class word's attention in the plain scene sample" + (
        ", refined by SAM" if refined else " (boxes; connect a SAM model for outlines)"
    )
    return ReferenceMasks(masks.float().clamp(0, 1), boxes, image, refined, how)
