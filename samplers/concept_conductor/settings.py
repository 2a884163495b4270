"""Concept Conductor's settings and step schedules (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConductorSettings:
    """The method's knobs; the defaults are the official SD1.5 ones, with its step numbers (of 200 steps)
    turned into fractions of the schedule."""

    alignment_weight: float = 10.0  # official attn_guidance_weight (SDXL: 30)
    alignment_end: float = 0.3  # official attn_guidance_end 60 of 200 steps (SDXL: 50)
    alignment_every: int = 1  # official attn_guidance_interval (SDXL: 5)
    concept_alignment_factor: float = 1.0  # official custom_attn_guidance_factor
    shape_masks: bool = True  # official rect_mask = False
    refine_start: float = 0.25  # official mask_refinement_start 50 of 200 (SDXL: 60)
    refine_end: float = 0.4  # official mask_refinement_end 80 of 200
    refine_every: int = 0  # 0: about one in 40 steps (the official 5 of 200)
    overlap_threshold: float = 0.7  # official mask_overlap_threshold
    kmeans_restarts: int = 100  # official num_kmeans_init (SDXL: 25)
    kmeans_seed: int = 0

    def alignment_steps(self, steps: int) -> list[int]:
        if self.alignment_weight <= 0:
            return []
        last = min(steps - 1, int(round(self.alignment_end * steps)))
        every = max(1, int(self.alignment_every))
        return [i for i in range(0, last + 1) if i % every == 0]

    def refine_steps(self, steps: int) -> list[int]:
        if not self.shape_masks:
            return []
        every = int(self.refine_every) or max(1, round(steps / 40))
        first, last = int(round(self.refine_start * steps)), min(steps - 1, int(round(self.refine_end * steps)))
        return [i for i in range(first, last + 1) if i % every == 0]
