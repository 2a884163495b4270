"""Concept Conductor's settings and step schedules (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Official values cite Nihukat/Concept-Conductor @44c6693: configs/sample_config.yaml (SD1.5) and
# configs/sample_sdxl_config.yaml (SDXL); their step numbers are of num_inference_steps = 200.


OFFICIAL_STEPS = 200


@dataclass(frozen=True)
class ConductorSettings:
    """The method's knobs; the defaults are the official SD1.5 ones, with its step numbers (of 200 steps)
    turned into fractions of the schedule (SDXL's: ``OFFICIAL["sdxl"]``)."""

    alignment_weight: float = 10.0  # attn_guidance_weight, sample_config.yaml:50
    alignment_end: float = 0.3  # attn_guidance_end 60 of 200 steps, sample_config.yaml:48
    alignment_every: int = 1  # attn_guidance_interval, sample_config.yaml:49
    concept_alignment_factor: float = 1.0  # custom_attn_guidance_factor, sample_config.yaml:51
    shape_masks: bool = True  # rect_mask = False
    refine_start: float = 0.25  # mask_refinement_start 50 of 200, sample_config.yaml:64
    refine_end: float = 0.4  # mask_refinement_end 80 of 200, sample_config.yaml:65
    refine_every: int = 0  # 0: about one in 40 steps (mask_update_interval 5 of 200, sample_config.yaml:66)
    overlap_threshold: float = 0.0  # mask_overlap_threshold, sample_config.yaml:67
    kmeans_restarts: int = 100  # num_kmeans_init, sample_config.yaml:68
    kmeans_seed: int = 0
    use_loss_mask: bool = False  # use_loss_mask, sample_config.yaml:71 (sample_sdxl_config.yaml:69)
    # the official runs take num_inference_steps = 200 (sample_config.yaml:41, sample_sdxl_config.yaml:39) and one
    # latent step of alignment_weight per aligned step (61 on SD1.5: steps 0..60). A run of n steps with A aligned
    # steps matches that with ``scale_by`` (r = official aligned steps / A, e.g. 61 / 10 at 30 steps):
    #   "repeat": round(r) gradient steps of alignment_weight per aligned step (as many steps in all, of the same
    #             size, as the official run; each costs a gradient pass);
    #   "weight": one step of alignment_weight * r (as far to first order, cheaper; can overshoot at few steps);
    # None: one step of alignment_weight per aligned step (weaker with fewer steps).
    scale_to_steps: int | None = OFFICIAL_STEPS
    scale_by: str = "repeat"

    def _ratio(self, steps: int) -> float:
        if not self.scale_to_steps or steps <= 0:
            return 1.0
        ours = len(self.alignment_steps(steps))
        return len(self.alignment_steps(self.scale_to_steps)) / ours if ours else 1.0

    def step_weight(self, steps: int) -> float:
        """The weight of one alignment step in a run of ``steps`` steps (see ``scale_to_steps``)."""
        scale = self._ratio(steps) if self.scale_by == "weight" else 1.0
        return float(self.alignment_weight) * scale

    def repeats(self, steps: int) -> int:
        """Gradient steps per aligned step in a run of ``steps`` steps (see ``scale_to_steps``)."""
        return max(1, round(self._ratio(steps))) if self.scale_by == "repeat" else 1

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


OFFICIAL = {
    "sd15": ConductorSettings(),
    # sample_sdxl_config.yaml:46-49 (attn_guidance_end 50, interval 1, weight 40) and :62-66 (refinement 60..80,
    # overlap threshold 0.7, 25 k-means restarts)
    "sdxl": ConductorSettings(
        alignment_weight=40.0,
        alignment_end=0.25,
        alignment_every=1,
        refine_start=0.3,
        refine_end=0.4,
        overlap_threshold=0.7,
        kmeans_restarts=25,
    ),  # fmt: skip
}
FAMILY_FIELDS = ("alignment_weight", "alignment_end", "alignment_every", "refine_start", "refine_end",
                 "overlap_threshold", "kmeans_restarts")  # fmt: skip


def for_family(settings: ConductorSettings, family: str | None) -> tuple[ConductorSettings, tuple[str, ...]]:
    """``settings`` with each family-dependent knob still at its SD1.5 official value set to ``family``'s
    official value (a knob the user changed keeps the user's value), and the names of the knobs it set."""
    official = OFFICIAL.get(family or "")
    if official is None or official == OFFICIAL["sd15"]:
        return settings, ()
    base = OFFICIAL["sd15"]
    changed = tuple(
        f
        for f in FAMILY_FIELDS
        if getattr(settings, f) == getattr(base, f) and getattr(official, f) != getattr(base, f)
    )
    return replace(settings, **{f: getattr(official, f) for f in changed}), changed
