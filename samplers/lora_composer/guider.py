"""LoRA-Composer in ComfyUI: a guider for SamplerCustomAdvanced on top of Mix-of-Show regional sampling (the
glue around ``losses``, ``isolation`` and ``reinit``).

* **Region-aware LoRA injection** is the Mix-of-Show regional cross-attention with the concepts' adapters in
  the scoped LoRA runtime (the node builds both exactly as the Mix-of-Show node does).
* **Concept isolation**: an ``attn1`` replace patch on every self-attention layer (``IsolationAttention``).
* **Concept enhancement**: at each early step, before the step's prediction, one extra model pass on the
  positive prompt only, with the latent requiring grad. The concept tokens' cross-attention maps (every
  query against its region's keys, the ones the region's prompt and concept make) and the self-attention
  of the boxes' positions are captured at the loss resolution; the pass stops right after the last layer at
  that resolution, so neither the forward nor the backward pass runs the rest of the UNet. One gradient step
  moves the latent *in place*, so the sampler's own step continues from the moved latent, as the official
  code's scheduler step does. Sampler functions that evaluate the model once per step at the schedule's
  sigmas and keep working on the latent they passed in can take this (``LATENT_UPDATE_SAMPLERS``); others
  are refused by name.
* **Latent re-initialisation**: one positive pass on the starting noise, before the sampler starts.

Step size: the official code moves the variance-preserving latent ``z = x / sqrt(sigma^2 + 1)`` by
``lr * dL/dz``; ComfyUI's samplers hold ``x``, so the same move is ``x -= lr * (sigma^2 + 1) * dL/dx``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..attention_patches import QUERY_POSITIONS_KEY, chained_attention
from ..latent_gradients import carries_control, latent_gradient_mode, trainable_copy
from ..scoped_lora.lowrank import resize_area, token_grid
from .isolation import isolated_attention, isolated_probabilities, membership_codes
from .losses import bounding_rect, composer_loss, step_sizes
from .reinit import reinitialise

log = logging.getLogger("multiconcept")

STATE_KEY = "multiconcept_lora_composer"
OFF, PROBE, RECORD = "off", "probe", "record"

# k-diffusion sampler functions that call the model once per step, at the schedule's sigma, on the very
# tensor they then step from (checked against ComfyUI's k_diffusion/sampling.py)
LATENT_UPDATE_SAMPLERS = {
    "sample_euler": "euler (and ddim)",
    "sample_euler_ancestral": "euler_ancestral",
    "sample_dpmpp_2m": "dpmpp_2m",
    "sample_dpmpp_2m_sde": "dpmpp_2m_sde",
    "sample_dpmpp_3m_sde": "dpmpp_3m_sde",
    "sample_lms": "lms",
    "sample_ddpm": "ddpm",
    "sample_lcm": "lcm",
}


class ComposerError(ValueError):
    """LoRA-Composer cannot run this way; the message says what to change."""


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the probe pass right after the last layer the losses read."""


@dataclass(frozen=True)
class ComposerSettings:
    """Every weight of the method (defaults: the official code's)."""

    enhancement: float = 8.0  # top-k term
    fill: float = 2.0  # row/column maxima term
    region: float = 10.0  # self-attention leaving the box
    top_k_ratio: float = 0.2
    smooth_sigma: float = 0.5
    step_size: float = 20.0
    refine_until: float = 0.5  # fraction of the steps (official: steps 0..25 of 50)
    stop_when_loss_rises: bool = True
    stop_check_from: float = 0.1  # the rise check starts here (official: step 5 of 50)
    isolation: bool = True
    reinitialise: bool = True
    loss_divisor: int = 4  # the loss reads the layers at 1/4 of the latent's side (official)

    @property
    def refines(self) -> bool:
        return self.step_size > 0 and self.refine_until > 0 and bool(self.enhancement or self.fill or self.region)

    @property
    def needs_self_attention(self) -> bool:
        return self.isolation or (self.refines and self.region > 0)


@dataclass(frozen=True)
class ComposerConcept:
    """A concept the losses follow: its region (index into the regional layout), the positions of its words
    in that region's prompt (into the prompt's 77-token chunks) and that prompt's token count."""

    label: str
    region: int
    tokens: tuple[int, ...]
    prompt_tokens: int


@dataclass
class StepRecord:
    maps: list = field(default_factory=list)  # per concept [T_c, h, w] (first cond row), on the CPU
    loss: dict | None = None  # per concept terms of the refinement pass, if one ran


class ComposerState:
    """What the guider and its attention patches share (one per node; never deep-copied)."""

    def __init__(self, settings: ComposerSettings, concepts: list[ComposerConcept], masks: torch.Tensor, node: str,
                 layout=None):  # fmt: skip
        self.settings = settings
        self.concepts = concepts
        self.masks = masks.float()  # [R, H, W] every region (isolation), image size
        self.node = node
        self.layout = layout  # the Mix-of-Show RegionalLayout the cross-attention probe listens to
        self.mode = OFF
        self.latent_hw: tuple[int, int] | None = None
        self._codes: dict = {}
        self.loss_order: list = []  # loss layers in forward order (learnt on the first full pass)
        self._seen_layers: list = []
        self.cross: list | None = None  # per concept [b, T_c, N] summed over layers
        self.cross_layers = 0
        self.self_attn: torch.Tensor | None = None  # [b, N, N] summed over layers
        self.self_layers = 0
        self._pending_self: torch.Tensor | None = None  # this loss layer's map while its forward runs
        self.history: dict[int, StepRecord] = {}
        self.warned_inner = False

    def __deepcopy__(self, memo):
        return self

    # -- per run --------------------------------------------------------------------------------

    def begin_run(self, latent_hw) -> None:
        self.latent_hw = tuple(int(s) for s in latent_hw)
        self._codes = {}
        self.history = {}
        self.mode = OFF

    def end_run(self) -> None:
        self.mode = OFF
        self._codes = {}
        self.clear_captures()

    def clear_captures(self) -> None:
        self.cross, self.cross_layers, self.self_attn, self.self_layers = None, 0, None, 0
        self._seen_layers = []

    @property
    def loss_grid(self) -> tuple[int, int]:
        h, w = self.latent_hw
        d = self.settings.loss_divisor
        return math.ceil(h / d), math.ceil(w / d)

    def is_loss_layer(self, tokens: int) -> bool:
        g = self.loss_grid
        return tokens == g[0] * g[1]

    def grid_of(self, tokens: int):
        return token_grid(tokens, *self.latent_hw) if self.latent_hw else None

    def members(self, tokens: int, device) -> torch.Tensor | None:
        """``[R, N]`` boolean: which positions of a layer with ``tokens`` positions are in each region."""
        grid = self.grid_of(tokens)
        if grid is None:
            return None
        return resize_area(self.masks, grid).flatten(1).to(device) >= 0.5

    def codes(self, tokens: int, device) -> torch.Tensor | None:
        key = (tokens, str(device))
        if key not in self._codes:
            m = self.members(tokens, device)
            self._codes[key] = None if m is None else membership_codes(m)
        return self._codes[key]

    def concept_masks(self, device=None) -> torch.Tensor:
        """``[C, h, w]`` boolean: each concept's region at the loss resolution."""
        return self.concept_masks_at(self.loss_grid, device)

    def concept_masks_at(self, grid, device=None) -> torch.Tensor:
        m = resize_area(self.masks, tuple(grid)) >= 0.5
        return torch.stack([m[c.region] for c in self.concepts]).to(device) if self.concepts else m[:0]

    # -- captures (called by the attention patches) ---------------------------------------------

    def _note_layer(self, key) -> None:
        if key not in self._seen_layers:
            self._seen_layers.append(key)

    def _maybe_stop(self, key) -> None:
        if self.mode == PROBE and self.loss_order and key == self.loss_order[-1]:
            raise StopForward

    def begin_self(self, q, k, heads: int) -> None:
        """A loss layer's self-attention ``[b, N, N]`` from the layer's own queries and keys, pending until
        :meth:`end_self`: where a concept's scoped LoRA makes the queries and keys of its box, :meth:`self_rows`
        puts the rows the forward computes with them in its place first."""
        codes = self.codes(q.shape[1], q.device) if self.settings.isolation else None
        self._pending_self = isolated_probabilities(q, k, heads, codes)

    def self_rows(self, q, k, heads: int, positions: torch.Tensor) -> None:
        """The rows at query ``positions`` of the pending map, from ``q [b, len(positions), C]`` and ``k``: the
        queries and keys the scoped LoRA hands on for those positions (the concept's adapted ones)."""
        pending = self._pending_self
        if pending is None or pending.shape[-1] != k.shape[1] or pending.shape[0] != q.shape[0]:
            return
        codes = self.codes(k.shape[1], k.device) if self.settings.isolation else None
        rows = isolated_probabilities(q, k, heads, codes, queries=positions.to(k.device), selected=True)
        self._pending_self = pending.index_copy(1, positions.to(pending.device), rows.to(pending))  # autograd-safe

    def end_self(self) -> None:
        probs, self._pending_self = self._pending_self, None
        if probs is None:
            return
        self.self_attn = probs if self.self_attn is None else self.self_attn + probs
        self.self_layers += 1

    def cross_probe(self, key, q, region_k, kinds, per, layout, extra_options) -> None:
        """From the Mix-of-Show attention patch: ``q [rows, N, C]`` of the chunks with these ``kinds`` and
        ``region_k [R, rows, T, C]``. Keeps the concept tokens' maps of the positive rows at loss layers."""
        if self.mode == OFF or layout is not self.layout or not self.is_loss_layer(q.shape[1]):
            return
        rows = torch.cat([torch.arange(i * per, (i + 1) * per) for i, kind in enumerate(kinds) if kind == 0]) if (
            kinds) else torch.arange(q.shape[0])  # fmt: skip
        if rows.numel() == 0:
            return
        rows = rows.to(q.device)
        heads = extra_options["n_heads"]
        n, inner = q.shape[1], q.shape[2]
        d = inner // heads
        qh = q.index_select(0, rows).reshape(rows.numel(), n, heads, d).transpose(1, 2).float()
        maps = []
        for c in self.concepts:
            kr = region_k[c.region].index_select(0, rows)
            kh = kr.reshape(rows.numel(), kr.shape[1], heads, d).transpose(1, 2).float()
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1).mean(dim=1)  # [b, N, T]
            repeats = kr.shape[1] // c.prompt_tokens
            cols = [t + m * c.prompt_tokens for t in c.tokens for m in range(repeats)]
            picked = probs[..., cols].reshape(rows.numel(), n, len(c.tokens), repeats).sum(-1)
            maps.append(picked.transpose(1, 2))  # [b, T_c, N]
        if self.mode == RECORD:
            maps = [m.detach() for m in maps]
        self.cross = maps if self.cross is None else [a + m for a, m in zip(self.cross, maps, strict=True)]
        self.cross_layers += 1
        self._note_layer(key)
        self._maybe_stop(key)

    # -- results --------------------------------------------------------------------------------

    def token_maps(self) -> list[torch.Tensor] | None:
        """Per concept ``[b, T_c, h, w]``: the layer mean of the captured maps."""
        if self.cross is None:
            return None
        h, w = self.loss_grid
        return [m.reshape(m.shape[0], m.shape[1], h, w) / self.cross_layers for m in self.cross]

    def loss(self):
        """``(total, parts)`` over the positive rows of the probe pass."""
        maps = self.token_maps()
        if maps is None:
            raise ComposerError(
                f"{self.node}: no cross-attention layer at 1/{self.settings.loss_divisor} of the latent's side was "
                "seen; this model's layout is not one LoRA-Composer knows (SD1.x, SD2.x or SDXL)."
            )
        masks = self.concept_masks(maps[0].device)
        s = self.settings
        total, parts = None, []
        for row in range(maps[0].shape[0]):
            t, p = composer_loss(
                [m[row] for m in maps], masks,
                None if self.self_attn is None else self.self_attn[row] / self.self_layers,
                ratio=s.top_k_ratio, enhancement=s.enhancement, fill=s.fill, region=s.region,
                smooth_sigma=s.smooth_sigma,
            )  # fmt: skip
            total = t if total is None else total + t
            if row == 0:
                parts = p
        return total, parts


class IsolationAttention:
    """attn1 replace patch with two roles. ``capture``: in the probe pass, at the loss layers, the self-attention
    of the positive rows for the region loss (from the layer's own queries and keys, with isolation's blocked
    weights at 0). ``isolate``: concept isolation. Where the scoped LoRA runtime has a patch on the layer (a
    concept's LoRA on this self-attention's keys/values), the chain is capture -> scoped LoRA -> isolate, so
    the concept's keys and the plain ones are both isolated; the scoped patch says which query positions it
    hands on (``QUERY_POSITIONS_KEY``). Another pack's patch below is kept (isolation is then skipped there,
    with a warning: it may expect the whole layer)."""

    def __init__(self, key: tuple, inner=None, isolate: bool = True, capture: bool = True):
        self.key = key
        self.inner = inner
        self.isolate = isolate
        self.capture = capture

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        state = extra_options.get(STATE_KEY)
        if not isinstance(state, ComposerState) or state.latent_hw is None:
            return chained_attention(self.inner, q, k, v, extra_options)
        heads = extra_options["n_heads"]
        positions = extra_options.get(QUERY_POSITIONS_KEY)
        probing = state.mode == PROBE and state.settings.region > 0 and state.is_loss_layer(k.shape[1])
        if self.capture and probing and positions is None:
            # the region loss's map: the plain rows now, a scoped box's rows from the keys its forward uses
            state.begin_self(q, k, heads)
            try:
                return self._attend(state, q, k, v, extra_options, heads, positions)
            finally:
                state.end_self()
        if not self.capture and probing and positions is not None:
            state.self_rows(q, k, heads, positions)
        return self._attend(state, q, k, v, extra_options, heads, positions)

    def _attend(self, state, q, k, v, extra_options, heads, positions):
        codes = state.codes(k.shape[1], k.device) if self.isolate and state.settings.isolation else None
        if codes is None:
            return chained_attention(self.inner, q, k, v, extra_options)
        if positions is not None:
            query_codes = codes.index_select(0, positions.to(codes.device))
        elif q.shape[1] == k.shape[1]:
            query_codes = None
        else:
            return chained_attention(self.inner, q, k, v, extra_options)  # unknown query positions
        if self.inner is not None:
            if not state.warned_inner:
                log.warning("%s: another pack's self-attention patch is on a layer; isolation is skipped there.",
                            state.node)  # fmt: skip
                state.warned_inner = True
            return self.inner(q, k, v, extra_options)
        return isolated_attention(
            q, k, v, heads, codes, query_codes=query_codes,
            attention=lambda qq, kk, vv, h: chained_attention(None, qq, kk, vv, extra_options),
        )  # fmt: skip


def self_attention_layers(diffusion_model) -> list[tuple[str, int, int]]:
    from ..edlora.layerwise import cross_attention_order

    return list(cross_attention_order(diffusion_model))


def install_composer(model_patcher, state: ComposerState) -> None:
    """Put the state (and the isolation patches when needed) on ``model_patcher``, a clone that already
    carries the Mix-of-Show regional attention and the scoped LoRA runtime."""
    from ..mixofshow.sampling import REGION_PROBE_KEY
    from ..scoped_lora.runtime import ScopedAttention

    options = model_patcher.model_options.setdefault("transformer_options", {})
    options[STATE_KEY] = state
    options[REGION_PROBE_KEY] = state.cross_probe
    if not state.settings.needs_self_attention:
        return
    replace = options.get("patches_replace", {}).get("attn1", {})
    for key in self_attention_layers(model_patcher.model.diffusion_model):
        current = replace.get(key)
        if isinstance(current, IsolationAttention):
            current = current.inner
        if isinstance(current, ScopedAttention):
            below = current.inner.inner if isinstance(current.inner, IsolationAttention) else current.inner
            scoped = ScopedAttention(current.runtime, current.attn_path, IsolationAttention(key, below, capture=False))
            patch = IsolationAttention(key, scoped, isolate=False)
        else:
            patch = IsolationAttention(key, current)
        model_patcher.set_model_attn1_replace(patch, *key)


# ---------------------------------------------------------------------------------------------- guider


def _guider_base():
    import comfy.samplers

    return comfy.samplers.CFGGuider


class _ReinitFirst:
    """Wraps the sampler: re-initialises the noise (one positive pass) before the sampler starts."""

    def __init__(self, sampler, guider):
        self.sampler = sampler
        self.guider = guider

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):  # fmt: skip
        noise = self.guider.reinitialised_noise(noise, latent_image, sigmas, extra_args["model_options"])
        return self.sampler.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                   disable_pbar)  # fmt: skip


class LoRAComposerGuider(_guider_base()):
    """CFG on the regional model, with the latent steps and re-initialisation (module docstring)."""

    def __init__(self, model_patcher, state: ComposerState):
        super().__init__(model_patcher)
        self.state = state
        self._sigmas: torch.Tensor | None = None
        self._done: set = set()
        self._refining = False
        self._previous_loss: float | None = None
        self.steps_refined = 0

    @property
    def settings(self) -> ComposerSettings:
        return self.state.settings

    def _check_sampler(self, sampler) -> None:
        fn = getattr(sampler, "sampler_function", None)
        name = getattr(fn, "__name__", type(sampler).__name__)
        if name not in LATENT_UPDATE_SAMPLERS:
            ok = ", ".join(sorted(set(LATENT_UPDATE_SAMPLERS.values())))
            raise ComposerError(
                f"{self.state.node}: the sampler ({name.removeprefix('sample_')}) cannot take latent updates between "
                f"steps (it evaluates the model more than once per step or keeps its own copy of the latent). Use "
                f"one of: {ok} - or set step_size to 0 to sample without the latent steps."
            )

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):  # fmt: skip
        if self.settings.refines:
            self._check_sampler(sampler)
            if denoise_mask is not None:
                raise ComposerError(
                    f"{self.state.node}: the latent carries a noise mask (inpainting); the latent steps cannot "
                    "follow it. Remove the mask, or set step_size to 0."
                )
        sampling = self.model_patcher.get_model_object("model_sampling")
        import comfy.model_sampling as ms

        if not isinstance(sampling, (ms.EPS, ms.V_PREDICTION)) or isinstance(sampling, ms.CONST):
            raise ComposerError(
                f"{self.state.node}: this model ({type(self.model_patcher.model).__name__}) is not an SD1.x/SD2.x/"
                "SDXL UNet; LoRA-Composer works on those."
            )
        if self.state.concepts and (self.settings.refines or self.settings.reinitialise):
            from .concepts import check_box_sizes  # (imports this module)

            h, w = noise.shape[-2:]
            check_box_sizes(self.state.node, self.state.masks, self.state.concepts, w * 8, h * 8,
                            self.settings.loss_divisor)  # fmt: skip
        self.state.begin_run(noise.shape[-2:])
        self._sigmas = sigmas.detach().double().cpu().flatten()
        self._done = set()
        self._refining = self.settings.refines
        self._previous_loss = None
        self.steps_refined = 0
        try:
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self.state.end_run()

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                     *args, **kwargs):  # fmt: skip
        if self.settings.reinitialise and self.state.concepts:
            sampler = _ReinitFirst(sampler, self)
        return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                    seed, *args, **kwargs)  # fmt: skip

    # -- steps ----------------------------------------------------------------------------------

    def _step_of(self, timestep) -> int | None:
        if self._sigmas is None:
            return None
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        diff = (self._sigmas[:-1] - value).abs()
        i = int(diff.argmin())
        return i if float(diff[i]) <= 1e-5 * max(1.0, abs(value)) else None

    def _positive_pass(self, x, timestep, model_options) -> None:
        """One model call on the positive conds only (the state's mode decides what is captured)."""
        import comfy.samplers

        try:
            comfy.samplers.calc_cond_batch(self.inner_model, [self.conds.get("positive")], x, timestep, model_options)
        except StopForward:
            pass
        finally:
            if not self.state.loss_order:  # a full pass: it saw every loss layer, in forward order
                self.state.loss_order = list(self.state._seen_layers)

    def reinitialised_noise(self, noise, latent_image, sigmas, model_options):
        state = self.state
        model_sampling = self.inner_model.model_sampling
        sigma = sigmas[:1].to(noise.device)
        x = model_sampling.noise_scaling(sigma, noise, latent_image, True)
        state.clear_captures()
        state.mode = RECORD
        try:
            self._positive_pass(x, sigma.expand(x.shape[0]), model_options)
        finally:
            state.mode = OFF
        maps = state.token_maps()
        state.clear_captures()
        if maps is None:
            return noise
        masks = state.concept_masks()
        scores, boxes = [], []
        for c, m in enumerate(maps):
            rect = bounding_rect(masks[c])
            if rect is None:
                continue
            scores.append(m[0].sum(0).cpu())
            boxes.append(rect)
        return reinitialise(noise, scores, boxes) if boxes else noise

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        step = self._step_of(timestep)
        first = step is not None and step not in self._done
        if first:
            self._done.add(step)
            self.state.history[step] = StepRecord()
            steps = len(self._sigmas) - 1
            if self._refining and step <= self.settings.refine_until * steps:
                self._refine(x, timestep, model_options, step, steps)
        state = self.state
        if first and state.concepts:
            state.clear_captures()
            state.mode = RECORD
        try:
            return super().predict_noise(x, timestep, model_options, seed)
        finally:
            if first and state.mode == RECORD:
                state.mode = OFF
                maps = state.token_maps()
                if maps is not None:
                    state.history[step].maps = [m[0].detach().float().cpu() for m in maps]
                state.clear_captures()

    def _loss_and_grad(self, x, timestep, model_options, need_grad: bool = True):
        """The attention loss at ``x`` (a positive pass that stops after the loss layers) and its gradient."""
        state = self.state
        state.clear_captures()
        state.mode = PROBE
        try:
            with latent_gradient_mode(copy_saved=carries_control([self.conds.get("positive")])):
                z = trainable_copy(x)
                self._positive_pass(z, timestep, model_options)
                state.mode = OFF
                loss, parts = state.loss()
                grad = torch.autograd.grad(loss, z)[0] if need_grad and loss.requires_grad else None
        finally:
            state.mode = OFF
            state.clear_captures()
        return loss.detach(), parts, grad

    def probe_loss(self, x, timestep, model_options) -> float:
        """The attention loss at ``x``, no step taken (checks)."""
        return float(self._loss_and_grad(x, timestep, model_options, need_grad=False)[0])

    def _refine(self, x, timestep, model_options, step: int, steps: int) -> None:
        state = self.state
        loss, parts, grad = self._loss_and_grad(x, timestep, model_options)
        value = float(loss)
        state.history[step].loss = {"total": value, "concepts": parts}
        if grad is not None and torch.isfinite(grad).all():
            sigma = float(self._sigmas[step])
            lr = float(step_sizes(steps, self.settings.step_size)[step]) * (sigma**2 + 1)
            x.sub_(grad.to(x.dtype) * lr)  # in place: the sampler steps from the moved latent
            self.steps_refined += 1
        elif grad is not None:
            log.warning("%s: the attention loss gave a non-finite gradient at step %d; no latent step taken.",
                        state.node, step + 1)  # fmt: skip
        s = self.settings
        if step >= s.refine_until * steps or (
            s.stop_when_loss_rises and self._previous_loss is not None and value > self._previous_loss
            and step >= s.stop_check_from * steps
        ):  # fmt: skip
            self._refining = False
        self._previous_loss = value
