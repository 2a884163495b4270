"""Concept Conductor in ComfyUI: a guider for SamplerCustomAdvanced (the glue around ``alignment``,
``injection`` and ``masks``).

* **Multipath sampling.** Every step runs the base branch (the scene prompt, no concept) and one branch per
  concept (its prompt, its ED-LoRA/LoRA) on the *same* latent, all in one batched model call: each concept's
  UNet adapter is in the scoped LoRA runtime with a row scope, so it acts only in its own branch's rows. Only
  the base branch's prediction drives the sampler; the concept branches lend it their features.
* **Concept injection.** In every attention layer of the up path, the base rows' attention output (after the
  output projection) is replaced by the concept rows' inside the concept's mask, cond rows from cond rows,
  uncond from uncond (``injection``). The masks start from the user's boxes/SAM masks and, when shape-aware
  masks are on, are re-chosen every few steps of a middle stretch of the schedule from k-means clusters of the
  branches' self-attention at one up-path layer (``masks``).
* **Layout alignment.** In the early steps, before the step's prediction, one extra pass of the positive rows
  of every branch, with the latent requiring grad, reads the self-attention keys of one up-path layer and
  stops right there (neither the forward nor the backward pass runs the rest of the UNet). The keys are pulled
  toward the reference's by one gradient step on the latent (``alignment``), in place, so the sampler's own
  step continues from the moved latent (hence the samplers of ``LATENT_UPDATE_SAMPLERS``).
* **Reference.** Without a reference latent, the reference is the scene prompt sampled plainly from the same
  noise with the same sampler — only as far as the alignment needs (its keys are recorded at each alignment
  step while it is sampled). With one (an image the user encoded), it is inverted along the schedule (DDIM
  inversion: the positive prompt, no CFG) and its keys recorded on the way.

Everything the run keeps (the reference keys of the alignment steps, the masks, the self-attention of a
refinement step until it is clustered) is dropped when sampling ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..attention_patches import chained_attention
from ..latent_gradients import carries_control, latent_gradient_mode, trainable_copy
from ..lora_composer.guider import LATENT_UPDATE_SAMPLERS
from .alignment import latent_step, layout_loss
from .injection import inject
from .masks import masks_at, refine_masks
from .settings import ConductorSettings

log = logging.getLogger("multiconcept")

STATE_KEY = "multiconcept_concept_conductor"
OFF, REFERENCE, ALIGN, GENERATE = "off", "reference", "align", "generate"
BASE = -1  # the base branch's concept index in a role
COND, UNCOND = 0, 1


class ConductorError(ValueError):
    """Bad Concept Conductor input; the message says what to change."""


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the alignment pass right after the layer the loss reads."""


# ------------------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class ConductorLayers:
    """Which self-attention layers the method reads, as ``(block, number, transformer index)``."""

    alignment: tuple[str, int, int]  # its keys are aligned (official: up_blocks.1.attentions.0 on SD1.5)
    masks: tuple[str, int, int]  # its attention is clustered (official: up_blocks.2.attentions.2 on SD1.5)


def conductor_layers(diffusion_model) -> ConductorLayers:
    """The official layers in ComfyUI's numbering: SD1.x/SD2.x (12 output blocks) use the first attention of the
    up path (output_blocks.3) for alignment and the last at 1/16 size (output_blocks.8) for masks; SDXL (9 output
    blocks) uses output_blocks.1's fifth transformer block for both."""
    from ..edlora.layerwise import cross_attention_order

    keys = [k for k in cross_attention_order(diffusion_model) if k[0] == "output"]
    blocks = len(getattr(diffusion_model, "output_blocks", []))
    if blocks == 12:
        chosen = ConductorLayers(("output", 3, 0), ("output", 8, 0))
    elif blocks == 9:
        depth = max((k[2] for k in keys if k[1] == 1), default=-1)
        layer = ("output", 1, min(4, depth))
        chosen = ConductorLayers(layer, layer)
    else:
        chosen = None
    if chosen is None or chosen.alignment not in keys or chosen.masks not in keys:
        raise ConductorError(
            f"this model's UNet ({type(diffusion_model).__name__} with {blocks} output blocks) is not an SD1.x/SD2.x "
            "or SDXL UNet; Concept Conductor knows the layers of those."
        )
    return chosen


# -------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Role:
    concept: int  # BASE or the concept's index in the stack
    kind: int  # COND or UNCOND


class ConductorState:
    """What the patches and the guider share during one sampling run (in ``transformer_options``)."""

    def __init__(self, layers: ConductorLayers, masks: torch.Tensor, settings: ConductorSettings, node: str):
        self.layers = layers
        self.settings = settings
        self.node = node
        self.given_masks = masks.float().clamp(0, 1)  # [N, H, W] at image (or any) size, the image's aspect
        self.n_concepts = int(masks.shape[0])
        self.mode = OFF
        self.roles: dict[int, Role] = {}  # cond list index of a call -> its role
        self.sigmas: torch.Tensor | None = None
        self.step: int | None = None
        self.capture_attention = False
        self.refinements = 0
        self.reset()

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone(); the state is shared
        return self

    def reset(self) -> None:
        self.reference_keys: dict[int, torch.Tensor] = {}  # alignment step -> reference keys [1|B, T, C]
        self.keys: dict[Role, torch.Tensor] = {}  # this alignment pass's keys per role (with grad)
        self.attention: dict[Role, torch.Tensor] = {}  # a refinement step's self-attention [B, T, T]
        self.pending: dict = {}  # (layer, role) -> concept output when ComfyUI split the call
        self.masks: torch.Tensor | None = None  # current combined masks [B, N, h, w] at ``grid`` (bool)
        self.custom: torch.Tensor | None = None
        self.base: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self._at: dict = {}
        self.latent_hw: tuple[int, int] | None = None

    # -- run ------------------------------------------------------------------------------------

    def begin_run(self, latent_hw, batch: int, sigmas: torch.Tensor) -> None:
        self.reset()
        self.refinements = 0  # kept after the run (it says what the run did)
        self.latent_hw = tuple(int(s) for s in latent_hw)
        self.sigmas = sigmas.detach().double().cpu().flatten()
        start = masks_at(self.given_masks, self.latent_hw).bool()  # [N, h, w]
        self.grid = self.latent_hw
        self.masks = start.unsqueeze(0).expand(batch, -1, -1, -1).clone()
        self.custom, self.base = self.masks.clone(), self.masks.clone()

    def end_run(self) -> None:
        final = self.masks
        self.reset()
        self.final_masks = final
        self.mode = OFF
        self.roles = {}
        self.capture_attention = False

    def step_of(self, timestep) -> int | None:
        if self.sigmas is None:
            return None
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        diff = (self.sigmas[:-1] - value).abs()
        i = int(diff.argmin())
        return i if float(diff[i]) <= 1e-5 * max(1.0, abs(value)) else None

    # -- masks ----------------------------------------------------------------------------------

    def masks_for(self, tokens: int, device) -> torch.Tensor | None:
        """The current masks flattened to a layer of ``tokens`` positions: ``[B, N, tokens]`` bool."""
        from ..scoped_lora.lowrank import token_grid

        if self.masks is None or self.latent_hw is None:
            return None
        grid = token_grid(tokens, *self.latent_hw)
        if grid is None:
            return None
        if grid not in self._at:
            b, n = self.masks.shape[:2]
            at = masks_at(self.masks.reshape(b * n, *self.masks.shape[-2:]).float(), grid).bool()
            self._at[grid] = at.reshape(b, n, grid[0] * grid[1]).to(device)
        return self._at[grid]

    def foreground(self, tokens: int, device) -> torch.Tensor | None:
        """``[tokens]``: the given (reference) masks summed over the concepts at a layer of ``tokens`` positions,
        the official ``use_loss_mask`` weights (``ref_mask.sum(dim=-1)``, pipeline_concept_conductor.py l. 910-913)."""
        from ..scoped_lora.lowrank import token_grid

        grid = token_grid(tokens, *self.latent_hw) if self.latent_hw is not None else None
        if grid is None:
            return None
        return masks_at(self.given_masks.float(), grid).bool().float().sum(dim=0).flatten().to(device)

    def refine(self) -> None:
        """Re-choose every concept's mask from the attention captured in this step's pass (``masks``)."""
        from ..scoped_lora.lowrank import token_grid

        base = self.attention.get(Role(BASE, COND))
        if base is None or self.n_concepts == 0:
            return
        grid = token_grid(base.shape[-1], *self.latent_hw)
        customs = [self.attention.get(Role(i, COND)) for i in range(self.n_concepts)]
        if grid is None or any(c is None for c in customs):
            return
        to_grid = lambda m: masks_at(m.float(), grid).bool()  # noqa: E731
        b = base.shape[0]
        generator = torch.Generator(device=base.device).manual_seed(int(self.settings.kmeans_seed) + self.refinements)
        combined_all, custom_all, base_all = [], [], []
        for row in range(b):
            combined, custom, base_masks = refine_masks(
                [c[row] for c in customs], base[row], grid, to_grid(self.custom[row]), to_grid(self.base[row]),
                to_grid(self.masks[row]), threshold=self.settings.overlap_threshold,
                n_init=int(self.settings.kmeans_restarts), generator=generator,
            )  # fmt: skip
            combined_all.append(combined.cpu())
            custom_all.append(custom.cpu())
            base_all.append(base_masks.cpu())
        self.masks, self.custom, self.base = torch.stack(combined_all), torch.stack(custom_all), torch.stack(base_all)
        self.grid = grid
        self._at = {}
        self.refinements += 1

    def image_masks(self, height: int, width: int) -> torch.Tensor:
        """The current (or last run's final) masks of the first image at ``height x width``, float ``[N, H, W]``."""
        m = self.masks if self.masks is not None else getattr(self, "final_masks", None)
        if m is None:
            return masks_at(self.given_masks, (height, width))
        return torch.nn.functional.interpolate(m[0].float()[None], size=(height, width), mode="nearest")[0]


# ------------------------------------------------------------------------------------------ patches


def _chunks(extra_options: dict, rows: int) -> list[tuple[int, slice]]:
    kinds = list(extra_options.get("cond_or_uncond") or [])
    if not kinds or rows % len(kinds):
        return []
    per = rows // len(kinds)
    return [(k, slice(j * per, (j + 1) * per)) for j, k in enumerate(kinds)]


class ConductorAttention:
    """Replace patch on every attention layer (``which``: attn1/attn2). On the alignment and mask layers' self-
    attention it records the keys (reference, alignment) and the head-averaged attention probabilities (a
    refinement step). Everywhere it attends as before (``inner``: the patch that was there, else ComfyUI's
    attention, computed in slices of one CFG pair's rows when the call batches the branches: see
    ``chained_attention``), except in the alignment pass, which uses PyTorch's fused attention: its backward
    pass then never holds the score matrices (at 64x64 tokens, 512 MiB per row and layer in float32)."""

    def __init__(self, which: str, key: tuple, inner=None):
        self.which = which
        self.key = key
        self.inner = inner

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        state: ConductorState | None = extra_options.get(STATE_KEY)
        if state is not None and state.mode != OFF:
            chunks = _chunks(extra_options, q.shape[0])
            if self.which == "attn1" and self.key == state.layers.alignment and state.mode in (REFERENCE, ALIGN):
                self._keys(state, k, chunks, extra_options)
            if (
                self.which == "attn1"
                and self.key == state.layers.masks
                and state.mode == GENERATE
                and state.capture_attention
            ):
                self._attention(state, q, k, chunks, extra_options)
            if state.mode == ALIGN and self.inner is None:
                from comfy.ldm.modules.attention import attention_pytorch

                return attention_pytorch(
                    q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision")
                )
        return chained_attention(self.inner, q, k, v, extra_options)

    def _keys(self, state: ConductorState, k, chunks, extra_options) -> None:
        if state.mode == REFERENCE:
            step = state.step_of(extra_options.get("sigmas", torch.zeros(1)))
            for index, rows in chunks:
                role = state.roles.get(index)
                if step is not None and role == Role(BASE, COND) and step in state.wanted_reference:
                    state.reference_keys[step] = k[rows].detach().clone()
            return
        for index, rows in chunks:
            role = state.roles.get(index)
            if role is not None:
                state.keys[role] = k[rows]
        if len(state.keys) == len(state.roles):
            raise StopForward

    def _attention(self, state: ConductorState, q, k, chunks, extra_options) -> None:
        heads = int(extra_options["n_heads"])
        for index, rows in chunks:
            role = state.roles.get(index)
            if role is None or role.kind != COND:
                continue
            qq, kk = q[rows].float(), k[rows].float()
            b, t, c = qq.shape
            dh = c // heads
            qh = qq.reshape(b, t, heads, dh).transpose(1, 2)
            kh = kk.reshape(b, -1, heads, dh).transpose(1, 2)
            probs = torch.zeros(b, t, kh.shape[2], device=q.device)
            for h in range(heads):  # one head at a time: the [T, T] scores of all heads at once can be large
                probs += torch.softmax(qh[:, h] @ kh[:, h].transpose(-1, -2) * dh**-0.5, dim=-1)
            state.attention[role] = probs / heads


class ConductorInjection:
    """``attn1_output_patch`` / ``attn2_output_patch``: on the up path, in a generation pass, the base rows'
    attention output replaced by each concept's inside its mask (``injection``)."""

    def __init__(self, which: str):
        self.which = which  # "attn1" or "attn2": the same block holds one of each

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, extra_options):
        state: ConductorState | None = extra_options.get(STATE_KEY)
        block = extra_options.get("block")
        if state is None or state.mode != GENERATE or not state.n_concepts or not block or block[0] != "output":
            return n
        chunks = _chunks(extra_options, n.shape[0])
        if not chunks:
            return n
        layer = (block[0], block[1], extra_options.get("block_index", 0), self.which)
        here: dict[Role, torch.Tensor] = {}
        bases = []
        for index, rows in chunks:
            role = state.roles.get(index)
            if role is None:
                continue
            if role.concept == BASE:
                bases.append((role, rows))
            else:
                here[role] = n[rows]
        if not bases:  # ComfyUI split the call (low memory): keep the concepts' outputs for the base rows' call
            for role, out in here.items():
                state.pending[(layer, role)] = out.detach()
            return n
        masks = state.masks_for(n.shape[1], n.device)
        if masks is None:
            return n
        out = n
        for role, rows in bases:
            sources = []
            for i in range(state.n_concepts):
                r = Role(i, role.kind)
                src = here.get(r)
                if src is None:
                    src = state.pending.get((layer, r))
                if src is None:
                    raise ConductorError(
                        f"{state.node}: concept {i + 1}'s branch did not run before the base branch in this step "
                        "(ComfyUI split the batched call). Free memory (a smaller image, fewer concepts) and retry."
                    )
                sources.append(src)
            m = masks if masks.shape[0] == rows.stop - rows.start else masks[:1].expand(rows.stop - rows.start, -1, -1)
            if out is n:
                out = n.clone()
            out[rows] = inject(n[rows], sources, m)
        return out


def install_conductor(model_patcher, state: ConductorState) -> None:
    """Put the state and the patches on ``model_patcher`` (a clone carrying the concepts' row-scoped adapters)."""
    options = model_patcher.model_options.setdefault("transformer_options", {})
    options[STATE_KEY] = state
    from ..edlora.layerwise import cross_attention_order

    for key in cross_attention_order(model_patcher.model.diffusion_model):
        for which, setter in (("attn1", model_patcher.set_model_attn1_replace),
                              ("attn2", model_patcher.set_model_attn2_replace)):  # fmt: skip
            current = options.get("patches_replace", {}).get(which, {}).get(key)
            if isinstance(current, ConductorAttention):
                current = current.inner
            setter(ConductorAttention(which, key, current), *key)
    model_patcher.set_model_attn1_output_patch(ConductorInjection("attn1"))
    model_patcher.set_model_attn2_output_patch(ConductorInjection("attn2"))


# -------------------------------------------------------------------------------------------- guider


def _guider_base():
    import comfy.samplers

    return comfy.samplers.CFGGuider


class ConductorGuider(_guider_base()):
    """CFG on the base branch, with the concept branches batched beside it (module docstring)."""

    def __init__(self, model_patcher, state: ConductorState, reference_latent: torch.Tensor | None = None,
                 size: tuple[int, int] | None = None):  # fmt: skip
        super().__init__(model_patcher)
        self.state = state
        self.reference_latent = reference_latent  # [1|B, C, h, w] in the latent space (VAE Encode's output)
        self.size = None if size is None else (int(size[0]), int(size[1]))  # (width, height) px it was built for
        self.n_concepts = 0
        self.reference_out: torch.Tensor | None = None  # the reference's latent where its run stopped
        self.reference_positive: list | None = None  # the reference image's prompt (official ref_prompt)
        self.steps_aligned = 0
        self.last_loss: float | None = None

    @property
    def settings(self) -> ConductorSettings:
        return self.state.settings

    def set_conductor_conds(self, positive, negative, concepts: list[tuple[list, list]]) -> None:
        """``concepts``: (positive, negative) per concept branch, rows tagged for its scoped adapter."""
        if len(concepts) != self.state.n_concepts:
            raise ConductorError(
                f"{self.state.node}: {len(concepts)} concept branch(es) for {self.state.n_concepts} mask(s): give one "
                "mask (box) per concept."
            )
        self._scene = (positive, negative)
        conds = {"positive": positive, "negative": negative}
        for i, (pos, neg) in enumerate(concepts):
            conds[f"conductor_{i}_positive"] = pos
            conds[f"conductor_{i}_negative"] = neg
        self.n_concepts = len(concepts)
        self.inner_set_conds(conds)

    # -- checks and the run ---------------------------------------------------------------------

    def _check(self, noise, sampler, denoise_mask) -> None:
        import comfy.model_sampling as ms

        node = self.state.node
        sampling = self.model_patcher.get_model_object("model_sampling")
        if not isinstance(sampling, (ms.EPS, ms.V_PREDICTION)) or isinstance(sampling, ms.CONST):
            raise ConductorError(
                f"{node}: this model is not an SD1.x/SD2.x/SDXL UNet; Concept Conductor works on those."
            )
        if self.settings.alignment_weight > 0:
            fn = getattr(sampler, "sampler_function", None)
            name = getattr(fn, "__name__", type(sampler).__name__)
            if name not in LATENT_UPDATE_SAMPLERS:
                ok = ", ".join(sorted(set(LATENT_UPDATE_SAMPLERS.values())))
                raise ConductorError(
                    f"{node}: the sampler ({name.removeprefix('sample_')}) cannot take the layout alignment's latent "
                    f"steps (it evaluates the model more than once per step or keeps its own copy of the latent). Use "
                    f"one of: {ok} - or set alignment_weight to 0."
                )
            if denoise_mask is not None:
                raise ConductorError(
                    f"{node}: the latent carries a noise mask (inpainting); the alignment's latent steps cannot follow "
                    "it. Remove the mask, or set alignment_weight to 0."
                )
        if self.size is not None and (self.size[1] // 8, self.size[0] // 8) != tuple(noise.shape[-2:]):
            w, h = self.size
            raise ConductorError(
                f"{node}: it was built for a {w}x{h} image (its width and height), but the latent being sampled is "
                f"{noise.shape[-1] * 8}x{noise.shape[-2] * 8}. Set the Guider's width and height to the latent's "
                f"size, or sample a {w}x{h} latent (Empty Latent Image)."
            )
        ref = self.reference_latent
        if ref is not None and tuple(ref.shape[-2:]) != tuple(noise.shape[-2:]):
            raise ConductorError(
                f"{node}: the reference is {ref.shape[-1] * 8}x{ref.shape[-2] * 8} px, the image being sampled "
                f"{noise.shape[-1] * 8}x{noise.shape[-2] * 8}. Give a reference of the sampled size (scale it first)."
            )

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):  # fmt: skip
        self._check(noise, sampler, denoise_mask)
        state = self.state
        state.begin_run(noise.shape[-2:], noise.shape[0], sigmas)
        self.steps_aligned, self.last_loss, self.reference_out = 0, None, None
        steps = len(sigmas) - 1
        try:
            wanted = set(self.settings.alignment_steps(steps))
            state.wanted_reference = wanted
            if wanted:
                if self.reference_latent is None:
                    self._reference_run(noise, latent_image, sampler, sigmas[: max(wanted) + 2], seed)
                else:
                    self._inversion_run(sigmas, seed)
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            state.end_run()

    def _plain_guider(self, cfg: float, positive=None):
        import comfy.samplers

        guider = comfy.samplers.CFGGuider(self.model_patcher)
        guider.set_conds(positive if positive is not None else self._scene[0], self._scene[1])
        guider.set_cfg(cfg)
        return guider

    def _reference_run(self, noise, latent_image, sampler, sigmas, seed) -> None:
        """The scene prompt sampled plainly from the same noise as far as the alignment reads, keys recorded."""
        import comfy.utils

        state = self.state
        bar = comfy.utils.ProgressBar(len(sigmas) - 1)
        state.mode, state.roles = REFERENCE, {0: Role(BASE, COND), 1: Role(BASE, UNCOND)}
        try:
            out = self._plain_guider(self.cfg).sample(
                noise, latent_image, sampler, sigmas, callback=lambda i, x0, x, total: bar.update_absolute(i + 1),
                disable_pbar=True, seed=seed,
            )  # fmt: skip
            self.reference_out = out.detach()
        finally:
            state.mode, state.roles = OFF, {}

    def _inversion_run(self, sigmas, seed) -> None:
        """DDIM inversion of the reference along the schedule (its own prompt, ``reference_positive``, or the scene
        prompt; no CFG), keys recorded."""
        import comfy.samplers

        state = self.state
        ref = self.reference_latent
        flipped = sigmas.flip(0)  # from the clean latent (sigma 0) up to the first sigma
        if float(flipped[0]) > 0:
            flipped = torch.cat([flipped.new_zeros(1), flipped])
        state.mode, state.roles = REFERENCE, {0: Role(BASE, COND)}
        try:
            self._plain_guider(1.0, self.reference_positive).sample(
                torch.zeros_like(ref), ref, comfy.samplers.KSAMPLER(_invert), flipped, disable_pbar=True, seed=seed
            )  # fmt: skip
        finally:
            state.mode, state.roles = OFF, {}

    # -- steps ----------------------------------------------------------------------------------

    def _roles(self, positive_only: bool) -> tuple[list, dict[int, Role]]:
        conds, roles = [self.conds.get("positive")], {0: Role(BASE, COND)}
        if not positive_only:
            conds.append(self.conds.get("negative"))
            roles[1] = Role(BASE, UNCOND)
        for i in range(self.n_concepts):
            roles[len(conds)] = Role(i, COND)
            conds.append(self.conds.get(f"conductor_{i}_positive"))
            if not positive_only:
                roles[len(conds)] = Role(i, UNCOND)
                conds.append(self.conds.get(f"conductor_{i}_negative"))
        return conds, roles

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        import comfy.samplers

        state = self.state
        step = state.step_of(timestep)
        state.step = step
        if step is not None and step in state.reference_keys:
            for _ in range(self.settings.repeats(len(state.sigmas) - 1)):
                self._align(x, timestep, model_options, step)
            state.reference_keys.pop(step)
        positive_only = abs(float(self.cfg) - 1.0) < 1e-9
        conds, roles = self._roles(positive_only)
        state.capture_attention = bool(
            self.n_concepts and step is not None and step in self.settings.refine_steps(len(state.sigmas) - 1)
        )
        outs = self.branch_outputs(conds, roles, x, timestep, model_options)
        if state.capture_attention:
            state.refine()
            state.attention = {}
            state.capture_attention = False
        uncond = None if positive_only else outs[1]
        return comfy.samplers.cfg_function(self.inner_model, outs[0], uncond, self.cfg, x, timestep,
                                           model_options=model_options, cond=conds[0],
                                           uncond=None if positive_only else conds[1])  # fmt: skip

    def branch_outputs(self, conds, roles, x, timestep, model_options) -> list[torch.Tensor]:
        """Every branch's prediction (ComfyUI's denoised form) from one batched call, concepts injected."""
        import comfy.samplers

        state = self.state
        state.mode, state.roles = GENERATE, roles
        try:
            return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        finally:
            state.mode, state.roles, state.pending = OFF, {}, {}

    def _align(self, x, timestep, model_options, step: int) -> None:
        """One gradient step of the layout alignment on ``x`` (in place), before the step's prediction."""
        import comfy.samplers

        state = self.state
        reference = state.reference_keys[step]
        conds, roles = self._roles(positive_only=True)
        state.keys = {}
        try:
            with latent_gradient_mode(copy_saved=carries_control(conds)):
                z = trainable_copy(x)
                state.mode, state.roles = ALIGN, roles
                try:
                    comfy.samplers.calc_cond_batch(self.inner_model, conds, z, timestep, model_options)
                except StopForward:
                    pass
                state.mode = OFF
                if len(state.keys) != len(roles):
                    raise ConductorError(
                        f"{state.node}: the alignment pass did not reach its layer {state.layers.alignment}."
                    )
                base = state.keys[Role(BASE, COND)]
                concepts = [[state.keys[Role(i, COND)]] for i in range(self.n_concepts)]
                fg = state.foreground(base.shape[1], base.device) if self.settings.use_loss_mask else None
                loss = layout_loss(
                    [base], concepts, [reference.to(base.device)], self.settings.concept_alignment_factor, [fg]
                )
                grad = torch.autograd.grad(loss, z)[0] if loss.requires_grad else None
        finally:
            state.mode, state.roles, state.keys = OFF, {}, {}
        self.last_loss = float(loss.detach())
        if grad is None or not bool(torch.isfinite(grad).all()):
            log.warning(
                "%s: the alignment gave no finite gradient at step %d; no latent step taken.", state.node, step + 1
            )
            return
        sigma = float(state.sigmas[step])
        weight = self.settings.step_weight(len(state.sigmas) - 1)
        x.add_(latent_step(grad, sigma, weight).to(x.dtype))
        self.steps_aligned += 1


@torch.no_grad()
def _invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler (DDIM) inversion from the clean latent up the schedule: ``x_next = x + (s_next - s) * eps(x, s)``
    (at the first step, from sigma 0, the noise is predicted at the next sigma). One more call at the top sigma
    records that step's keys."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for j in range(len(sigmas) - 1):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        at = s if s > 0 else s_next
        denoised = model(x, at * s_in, **extra_args)
        eps = (x - denoised) / at
        x = x + (s_next - s) * eps
    model(x, float(sigmas[-1]) * s_in, **extra_args)
    return x
