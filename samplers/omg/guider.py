"""OMG stage 2 as a ComfyUI guider (the glue around ``blend`` and ``layout``).

Every model call from the start on — calls between two steps too, as second-order and SDE samplers make
them — the global prediction (stage 1's prompt, layout replayed) and each concept's prediction (its adapter,
its own prompt), each with its own CFG, blended by the concept masks. All of them come
from **one** batched model call: the concepts' adapters are in the scoped LoRA runtime with a row scope, so
each acts only in its own rows (``ROW_TAGS_KEY`` on its conds); ComfyUI batches the conds of a call as far
as memory allows. Before the start step the guider is plain CFG on the global prompt, which is stage 1.

Sampling a full schedule through this guider with a sampler that keeps no history (``MEMORYLESS_SAMPLERS``:
euler, heun, dpm_2, ...) starts at the start step from stage 1's latent there (the steps before are stage
1's own, so they are not sampled again): exact for deterministic ones. Samplers that build on earlier steps
(dpmpp_2m, lms, uni_pc, ...) run the whole schedule instead, unblended before the start, so their history
is stage 1's: exact as well. Ancestral and SDE samplers draw fresh noise per step from the seed, so their
steps after the start differ from a run over the whole schedule (both are valid samples of the same layout).
"""

from __future__ import annotations

import logging

import torch

from .blend import blend_predictions, crop_box, resize_masks
from .layout import OFF, REPLAY, LayoutError, LayoutStore

log = logging.getLogger("multiconcept")

CONCEPT_KEY = "omg_concept_{i}_{side}"
MODEL_CONCEPT_KEY = "omg_model_concept_{j}_{side}"


# Samplers whose step reads only the current latent (no history of earlier steps): stage 2 starts at the start
# step from stage 1's latent there and continues stage 1 exactly (ancestral/SDE ones with fresh noise). Every
# other sampler (dpmpp_2m, lms, uni_pc, deis, ipndm, res_multistep, gradient_estimation, the 2m/3m SDE ones ...)
# builds on earlier steps, so stage 2 runs the whole schedule, the steps before the start unblended (equal to
# stage 1's): exact too, at the cost of those steps. ComfyUI's ddim is its euler.
MEMORYLESS_SAMPLERS = frozenset(
    f"sample_{name}"
    for name in (
        "euler",
        "euler_cfg_pp",
        "euler_ancestral",
        "euler_ancestral_cfg_pp",
        "heun",
        "heunpp2",
        "dpm_2",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "dpmpp_2s_ancestral_cfg_pp",
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "ddpm",
        "lcm",
    )  # fmt: skip
)


def is_memoryless(sampler) -> bool:
    """Whether ``sampler`` (a ComfyUI sampler object, or a sampler name) keeps no history between steps."""
    if isinstance(sampler, str):
        return sampler == "ddim" or f"sample_{sampler}" in MEMORYLESS_SAMPLERS
    return getattr(getattr(sampler, "sampler_function", None), "__name__", "") in MEMORYLESS_SAMPLERS


def _guider_base():
    import comfy.samplers

    return comfy.samplers.CFGGuider


class OMGGuider(_guider_base()):
    """``sample`` as CFGGuider's, with the OMG blend from ``store.start`` on (see the module docstring)."""

    def __init__(self, model_patcher, store: LayoutStore, masks: torch.Tensor, policy: str, node: str = "OMG",
                 crop_margin: int | None = None):  # fmt: skip
        super().__init__(model_patcher)
        self.store = store
        self.masks = masks.float()  # [N, H, W] in 0..1 at any size with the image's aspect ratio
        self.policy = policy
        self.node = node
        # crop: each concept predicted on its mask's bounding box plus this many latent cells (None: full size)
        self.crop_margin = crop_margin
        self.crops: list = []
        self.n_concepts = 0
        self.model_concepts: list = []
        self._latent_masks: dict = {}
        self.calls = self.blended = 0  # model calls of the last run, and how many of them were blended

    def set_omg_conds(self, positive, negative, concepts: list[tuple[list, list]], model_concepts=()) -> None:
        """``concepts``: (positive, negative) per stack concept, batched with the scene's rows.
        ``model_concepts``: (model_patcher, positive, negative) per whole-MODEL concept (e.g. a MODEL carrying
        an IP-Adapter/InstantID attention patch), each run as a pass of its own; masks follow in that order."""
        if len(concepts) + len(model_concepts) != self.masks.shape[0]:
            raise LayoutError(f"{len(concepts) + len(model_concepts)} concepts for {self.masks.shape[0]} masks")
        conds = {"positive": positive, "negative": negative}
        for i, (pos, neg) in enumerate(concepts):
            conds[CONCEPT_KEY.format(i=i, side="positive")] = pos
            conds[CONCEPT_KEY.format(i=i, side="negative")] = neg
        self.model_concepts = []
        for j, (patcher, pos, neg) in enumerate(model_concepts):
            if patcher.model is not self.model_patcher.model or patcher.patches_uuid != self.model_patcher.patches_uuid:
                raise LayoutError(
                    f"model concept {j + 1} is not the base MODEL with patches of its own on top (its weights differ: a "
                    "LoRA loader or merge before it?). A model concept may carry attention/model patches (IP-Adapter, "
                    "InstantID); give weight changes (LoRAs) as Concept Stack entries instead."
                )
            conds[MODEL_CONCEPT_KEY.format(j=j, side="positive")] = pos
            conds[MODEL_CONCEPT_KEY.format(j=j, side="negative")] = neg
            self.model_concepts.append(patcher)
        self.n_concepts = len(concepts)
        self.inner_set_conds(conds)

    def _masks_at(self, hw) -> torch.Tensor:
        key = tuple(int(s) for s in hw)
        if key not in self._latent_masks:
            self._latent_masks[key] = resize_masks(self.masks, key)
        return self._latent_masks[key]

    def _set_crops(self, hw) -> None:
        """With ``crop_margin``: each concept's conds get its crop as ComfyUI's area, so ComfyUI runs the
        concept on that part of the latent only (and returns zeros outside it, where its weight is 0)."""
        self.crops = []
        if self.crop_margin is None:
            return
        masks = self._masks_at(hw)
        for i in range(self.n_concepts):
            crop = crop_box(masks[i], margin_cells=int(self.crop_margin), multiple=8)
            self.crops.append(crop)
            if crop is None or (crop[1] - crop[0], crop[3] - crop[2]) == tuple(hw):
                continue
            for side in ("positive", "negative"):
                key = CONCEPT_KEY.format(i=i, side=side)
                self.original_conds[key] = _crop_conds(self.original_conds[key], crop)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        import comfy.model_patcher
        import comfy.samplers

        self.store.replay_uuids = frozenset(c["uuid"] for c in self.conds.get("positive", []) if "uuid" in c)
        # every call from the start on is blended, those between steps too (second-order and SDE samplers)
        position = self.store.position_of(timestep)
        self.calls += 1
        if not (self.n_concepts or self.model_concepts) or position is None or position < self.store.start:
            return super().predict_noise(x, timestep, model_options, seed)
        self.blended += 1
        names = ["positive", "negative"]
        for i in range(self.n_concepts):
            names += [CONCEPT_KEY.format(i=i, side="positive"), CONCEPT_KEY.format(i=i, side="negative")]
        conds = [self.conds.get(n) for n in names]
        outs = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        preds = [self._cfg(outs[2 * b], outs[2 * b + 1], conds[2 * b], conds[2 * b + 1], x, timestep, model_options)
                 for b in range(1 + self.n_concepts)]  # fmt: skip
        for j, patcher in enumerate(self.model_concepts):
            # its own pass, with its own model options (its attention patches, wrappers), none of the scene's
            options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
            sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
            if sample_sigmas is not None:
                options.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
            pair = [self.conds.get(MODEL_CONCEPT_KEY.format(j=j, side=side)) for side in ("positive", "negative")]
            out = comfy.samplers.calc_cond_batch(self.inner_model, pair, x, timestep, options)
            preds.append(self._cfg(out[0], out[1], pair[0], pair[1], x, timestep, options))
        return blend_predictions(preds[0], preds[1:], self._masks_at(x.shape[-2:]).to(x.device), self.policy)

    def _cfg(self, cond_pred, uncond_pred, cond, uncond, x, timestep, model_options):
        import comfy.samplers

        return comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x, timestep,
                                           model_options=model_options, cond=cond, uncond=uncond)  # fmt: skip

    def sample(
        self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None
    ):  # noqa: E501
        store = self.store
        if tuple(noise.shape[-2:]) != store.latent_hw:
            raise LayoutError(
                f"stage 2's latent is {noise.shape[-1] * 8}x{noise.shape[-2] * 8} px, the layout was made at "
                f"{store.latent_hw[1] * 8}x{store.latent_hw[0] * 8}. Sample stage 2 at stage 1's size."
            )
        if seed is not None and store.seed is not None and int(seed) != int(store.seed):
            raise LayoutError(
                f"stage 2's noise seed is {seed}, the layout's is {store.seed}: OMG replays stage 1, so both stages "
                "need the same seed."
            )
        store.check_schedule(sigmas)
        self._set_crops(tuple(noise.shape[-2:]))
        self.calls = self.blended = 0
        store.replayed.clear()
        tail = sigmas.shape[-1] == store.steps + 1 - store.start
        if tail and not is_memoryless(sampler):
            log.warning(
                "[multi-concept] %s: the sampler builds each step on earlier ones; started at the start step it "
                "continues stage 1 with a first-order step there, not exactly. Give stage 2 the whole schedule "
                "(the same steps as stage 1) to continue it exactly.",
                self.node,
            )
        if not tail and store.x_start is not None and _eps_like(self.model_patcher) and is_memoryless(sampler):
            # the steps before the start are stage 1's own: start from its latent there (module docstring)
            model = self.model_patcher.model
            latent_image = model.process_latent_out(store.x_start.to(noise.device, torch.float32))
            noise = torch.zeros_like(noise)
            sigmas = sigmas[store.start :]
            tail = True
            if callback is not None:
                offset, inner = store.start, callback
                callback = lambda step, x0, x, total: inner(step + offset, x0, x, total + offset)  # noqa: E731
        store.mode = REPLAY
        try:
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            store.mode = OFF
            store.replay_uuids = frozenset()


def _crop_conds(conds: list, crop) -> list:
    """``conds`` restricted to the latent ``crop = (y0, y1, x0, x1)`` (ComfyUI's area: h, w, y, x in cells)."""
    y0, y1, x0, x1 = crop
    return [{**c, "area": (y1 - y0, x1 - x0, y0, x0)} for c in conds]


def _eps_like(model_patcher) -> bool:
    """Whether the model adds noise as ``x + sigma * noise`` (SD1.x/SD2.x/SDXL), so that zero noise over
    a latent starts sampling at exactly that latent."""
    import comfy.model_sampling as ms

    sampling = model_patcher.get_model_object("model_sampling")
    return isinstance(sampling, ms.EPS) and not isinstance(sampling, ms.CONST)
