"""The stage-1 layout of OMG: recorded while stage 1 samples, replayed in stage 2's global prediction.

What is kept (DESIGN.md §4 "OMG"; the official code replays the same things from a live twin of stage 1
that it samples again next to stage 2, which doubles the global rows; we record once and replay):

* **Cross-attention**, every layer, from the blend's start step to the end: the attention output of the
  positive rows (before ``to_out``). The global prompt is the same in both stages and has no adapter, so
  replaying the output is exactly replaying the attention probabilities (``P1 @ V`` with the same ``V``).
* **Self-attention**, from the start step until 40 % of the schedule, in the layers at 1/4 of the latent's
  side or coarser (the official code's 32x32 layers of a 1024 px SDXL image): the queries and keys of the
  positive rows, so stage 2 computes ``softmax(q1 k1^T) v`` with its own values. Keeping ``q, k`` instead of
  the probabilities is what keeps this small (``2 x tokens x width`` instead of ``heads x tokens^2``).
* **Word maps** for automatic masks: the cross-attention probabilities of chosen prompt tokens (the class
  words), averaged over heads, steps and the layers at 1/2 and 1/4 of the latent's side, at 1/2 size.

Before the start step nothing needs replaying: stage 2 reuses stage 1's latent there.

Memory: at most ``budget_bytes`` (the node's ``layout_memory_mb``), kept on ``keep_on`` (the nodes pass
ComfyUI's intermediate device: host memory, so the replay never competes with the model for GPU memory), in
the attention's own dtype (fp16 on a GPU). Recording goes step by step; the first step that would not fit (in
the budget, or in the host memory left) is dropped whole with every later one, so the replay covers the
earliest blended steps (those that set the layout); ``cut_message()`` then says so, with the memory a full
replay needs (``needed`` keeps counting past the cut). Per blended step in fp16: SD1.5 at 512x512 about 22 MB
(cross-attention), plus 8 MB while self-attention is kept; SDXL at 1024x1024 about 210 MB, plus 315 MB while
self-attention is kept (the 32x32 layers' queries and keys). The official SDXL run (50 steps, start 0.32: 34
blended steps, 4 with self-attention) needs about 8.4 GB, which the default budget (16 GiB) holds: every
blended step is replayed (tests/unit/test_omg_layout_budget.py counts it at the real SDXL shapes). ``free()``
drops the store.
"""

from __future__ import annotations

import logging
import math

import torch

from ..attention_patches import chained_attention

log = logging.getLogger("multiconcept")

DEFAULT_BUDGET_MB = 16384  # holds the official SDXL run's full replay (about 8.4 GB in fp16, 16.8 in fp32)
HOST_RESERVE = 2 * 2**30  # host memory left free when the store is kept there
SELF_UNTIL = 0.4  # self-attention is replayed until this fraction of the schedule (official: 20 of 50 steps)
RECORD, REPLAY, OFF = "record", "replay", "off"


class LayoutError(ValueError):
    """Stage 2 cannot replay this layout (another size, schedule or seed); the message says what differs."""


def word_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: list[int]) -> torch.Tensor:
    """Softmax cross-attention probabilities ``[B, Q, len(tokens)]`` of the chosen key ``tokens``, averaged
    over heads. ``q [B, Q, heads*d]``, ``k [B, T, heads*d]``."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, nq, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, h, Q, T]
    return probs[..., tokens].mean(dim=1)


class LayoutStore:
    """One stage-1 run's layout (see the module docstring); filled by :class:`LayoutPatch` in record mode.

    ``start``        the first blended step (0-based index into ``sigmas``).
    ``latent_hw``    the latent's ``(h, w)``; ``seed`` the noise seed of stage 1.
    ``word_tokens``  token positions (into the 77-token chunks of the global prompt) whose maps to keep.
    """

    def __init__(self, start: int, steps: int, latent_hw, seed: int | None, budget_bytes: int, word_tokens=(),
                 keep_on=None):  # fmt: skip
        if steps < 2 or not 1 <= start < steps:
            raise LayoutError(
                f"the blend must start after the first step and before the last (start {start} of {steps})"
            )
        self.start = int(start)
        self.steps = int(steps)
        self.self_until = max(self.start, math.ceil(SELF_UNTIL * steps))
        self.latent_hw = tuple(int(s) for s in latent_hw)
        self.seed = seed
        self.budget_bytes = int(budget_bytes)
        self.keep_on = torch.device(keep_on) if keep_on is not None else None  # None: where the attention runs
        self.word_tokens = list(word_tokens)
        self.mode = OFF
        self.sigmas: torch.Tensor | None = None  # the stage-1 schedule, float64 on the CPU
        # keyed by (position, layer key); a position is a step index, or between two for a mid-step call
        self.cross: dict = {}  # -> the attention output [rows, Q, inner]
        self.self_qk: dict = {}  # -> (q, k) [rows, Q, inner]
        self.bytes = 0
        self.stopped_at: int | None = None  # the first step not recorded (memory budget)
        self.needed = 0  # bytes a full replay needs: counted past the cut too
        self.cut_by_host: int | None = None  # host memory free (bytes) when it, not the budget, forced the cut
        self._step_bytes: dict[float, int] = {}
        self.replayed: set[float] = set()  # the positions stage 2 replayed at (what the tests count)
        self._maps: torch.Tensor | None = None  # [B, W, h, w] summed
        self._map_count = 0
        self.replay_uuids: frozenset = frozenset()
        self.x_start: torch.Tensor | None = None  # the latent entering the start step (model space)
        self.final: torch.Tensor | None = None

    # -- steps ----------------------------------------------------------------------------------

    def set_schedule(self, sigmas: torch.Tensor) -> None:
        s = sigmas.detach().double().cpu().flatten()
        if s.numel() != self.steps + 1:
            raise LayoutError(f"stage 1 ran {s.numel() - 1} steps, the layout was made for {self.steps}")
        self.sigmas = s

    def step_of(self, sigma) -> int | None:
        """The step whose sigma this is (stage 1's schedule), or None for a sigma between steps."""
        if self.sigmas is None:
            return None
        value = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        diff = (self.sigmas[:-1] - value).abs()
        i = int(diff.argmin())
        return i if float(diff[i]) <= 1e-5 * max(1.0, abs(value)) else None

    def position_of(self, sigma) -> float | None:
        """Where a model call at ``sigma`` sits in stage 1's schedule: ``i`` at step ``i``'s own sigma, ``i + f``
        (0 < f < 1, the share of the way to the next step's sigma) for a call between steps, as second-order
        and SDE samplers make (dpm_2, dpmpp_2s_ancestral, dpmpp_sde ...); None outside the schedule.

        The same sampler on the same schedule computes the same sigmas bit for bit, so stage 1 and stage 2 agree
        on every position; a step's own sigma is matched exactly, so a call a hair away from it (dpmpp_2s_ancestral
        at eta 1 evaluates its midpoint at the next step's sigma up to float rounding) keeps a position of its own.
        A second call at exactly a step's sigma (heun's correction) shares that step's position."""
        if self.sigmas is None:
            return None
        value = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        s = self.sigmas
        for i in range(s.numel() - 1):
            hi, lo = float(s[i]), float(s[i + 1])
            if value == hi:
                return float(i)
            if hi > value > lo:
                return i + (hi - value) / (hi - lo)
        return None

    def check_schedule(self, sigmas: torch.Tensor) -> None:
        """Stage 2's schedule must be stage 1's, whole or from the start step on."""
        s = sigmas.detach().double().cpu().flatten()
        if self.sigmas is None:
            raise LayoutError("the layout is empty: stage 1 has not run")
        whole, tail = self.sigmas, self.sigmas[self.start :]
        for ref in (whole, tail):
            if s.numel() == ref.numel() and torch.allclose(s, ref, rtol=1e-5, atol=1e-6):
                return
        raise LayoutError(
            f"stage 2 samples another schedule ({s.numel() - 1} steps from sigma {float(s[0]):.3f}) than stage 1 "
            f"({self.steps} steps from {float(self.sigmas[0]):.3f}). Use the same steps, scheduler and denoise."
        )

    # -- recording ------------------------------------------------------------------------------

    def _fits(self, step: float, nbytes: int) -> bool:
        self.needed += nbytes
        if self.stopped_at is not None and step >= self.stopped_at:
            return False
        host = self._host_short(step)
        if host is None and self.bytes + nbytes <= self.budget_bytes:
            return True
        self.cut_by_host = host
        step = math.floor(step)  # drop this step whole, mid-step calls too: a half-replayed step mixes two layouts
        self.stopped_at = step
        for store in (self.cross, self.self_qk):
            for key in [k for k in store if k[0] >= step]:
                del store[key]
        self.bytes -= sum(v for s, v in self._step_bytes.items() if s >= step)
        return False

    def _host_short(self, step: float) -> int | None:
        """The host memory free (bytes) when keeping one more step there would leave less than ``HOST_RESERVE``;
        None when there is room (or the store is not in host memory). Checked once per recorded position."""
        if self.keep_on is None or self.keep_on.type != "cpu" or step in self._step_bytes:
            return None
        import psutil

        free = int(psutil.virtual_memory().available)
        per_step = max(self._step_bytes.values(), default=0)
        return free if free < HOST_RESERVE + per_step else None

    def cut_message(self) -> str | None:
        """What the replay left out and what a full replay needs, or None when every blended step is kept."""
        if self.stopped_at is None or self.budget_bytes <= 0:
            return None  # whole, or replay turned off (layout_memory_mb = 0)
        mib = 2**20
        kept = f"steps {self.start + 1}..{self.stopped_at}" if self.stopped_at > self.start else "no step"
        why = (
            f"only {self.cut_by_host // mib} MiB of host memory was free"
            if self.cut_by_host is not None
            else f"layout_memory_mb is {self.budget_bytes // mib}"
        )
        return (
            f"OMG: the layout replay holds {kept} of the blended steps {self.start + 1}..{self.steps} ({why}); "
            f"later steps run without stage 1's attention and the layout may drift. A full replay needs "
            f"{math.ceil(self.needed / mib)} MiB: raise layout_memory_mb to that"
            + (" and free host memory." if self.cut_by_host is not None else ".")
        )

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` where the store keeps it (never a view of the model's own buffers)."""
        return t.detach().to(self.keep_on or t.device, copy=True)

    def _keep(self, table: dict, key, value, nbytes: int) -> None:
        table[key] = value
        self.bytes += nbytes
        self._step_bytes[key[0]] = self._step_bytes.get(key[0], 0) + nbytes

    def record_cross(self, step: float, layer, out: torch.Tensor) -> None:
        if step < self.start:
            return
        nbytes = out.numel() * out.element_size()
        if self._fits(step, nbytes):
            self._keep(self.cross, (step, layer), self._kept(out), nbytes)

    def wants_self(self, step: float, tokens: int) -> bool:
        h, w = self.latent_hw
        return self.start <= step < self.self_until and tokens <= math.ceil(h / 4) * math.ceil(w / 4)

    def record_self(self, step: float, layer, q: torch.Tensor, k: torch.Tensor) -> None:
        nbytes = (q.numel() + k.numel()) * q.element_size()
        if self._fits(step, nbytes):
            self._keep(self.self_qk, (step, layer), (self._kept(q), self._kept(k)), nbytes)

    def map_grid(self, tokens: int) -> tuple[int, int] | None:
        """The ``(h, w)`` of a layer with ``tokens`` positions if its maps are kept (1/2 and 1/4 of the side)."""
        h, w = self.latent_hw
        for f in (2, 4):
            g = (math.ceil(h / f), math.ceil(w / f))
            if g[0] * g[1] == tokens:
                return g
        return None

    def add_maps(self, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        """``probs [B, Q, W]`` of one layer call, at ``grid``; summed at 1/2 of the latent's side."""
        b, _, n = probs.shape
        maps = probs.transpose(1, 2).reshape(b, n, *grid).float()
        size = (math.ceil(self.latent_hw[0] / 2), math.ceil(self.latent_hw[1] / 2))
        if tuple(grid) != size:
            maps = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        maps = maps.cpu()
        self._maps = maps if self._maps is None else self._maps + maps
        self._map_count += 1

    def word_maps(self) -> torch.Tensor | None:
        """``[B, W, h, w]``: each kept token's average map over heads, layers and steps (None if none)."""
        if self._maps is None:
            return None
        return self._maps / self._map_count

    def describe(self) -> str:
        recorded = sorted({int(k[0]) for k in self.cross})
        steps = f"steps {recorded[0] + 1}..{recorded[-1] + 1}" if recorded else "no steps"
        full = "" if self.stopped_at is None else f" (a full replay needs {self.needed / 2**20:.1f} MiB)"
        return (
            f"layout replay: cross-attention {steps} of {self.steps}, self-attention {len(self.self_qk)} layer-steps; "
            f"{self.bytes / 2**20:.1f} MiB{full}"
        )

    def free(self) -> None:
        self.replayed.clear()
        self.cross.clear()
        self.self_qk.clear()
        self._step_bytes.clear()
        self.bytes = 0
        self._maps = None
        self.x_start = None
        self.mode = OFF

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone(); the store is shared
        return self


def _rows(extra_options: dict, batch: int, pick) -> torch.Tensor | None:
    """The batch rows of the chunks ``pick(kind, uuid)`` selects, or None."""
    kinds = list(extra_options.get("cond_or_uncond") or [])
    uuids = list(extra_options.get("uuids") or [None] * len(kinds))
    if not kinds or batch % len(kinds):
        return None
    per = batch // len(kinds)
    chunks = [j for j, kind in enumerate(kinds) if pick(kind, uuids[j] if j < len(uuids) else None)]
    if not chunks:
        return None
    return torch.cat([torch.arange(j * per, (j + 1) * per) for j in chunks])


class LayoutPatch:
    """attn1/attn2 replace patch of one transformer layer: records stage 1, replays it in stage 2."""

    def __init__(self, store: LayoutStore, which: str, key: tuple, inner=None):
        self.store = store
        self.which = which  # attn1 | attn2
        self.key = key
        self.inner = inner  # another replace patch already on this layer: kept as the attention

    def __deepcopy__(self, memo):
        return self

    def _attention(self, q, k, v, extra_options):
        return chained_attention(self.inner, q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        store = self.store
        if store.mode == OFF:
            return self._attention(q, k, v, extra_options)
        if store.mode == RECORD and store.sigmas is None and extra_options.get("sample_sigmas") is not None:
            store.set_schedule(extra_options["sample_sigmas"])
        sigma = extra_options.get("sigmas")
        step = store.position_of(sigma) if sigma is not None else None
        if step is None:
            return self._attention(q, k, v, extra_options)
        if store.mode == RECORD:
            return self._record(q, k, v, extra_options, step)
        return self._replay(q, k, v, extra_options, step)

    def _record(self, q, k, v, extra_options, step):
        store = self.store
        out = self._attention(q, k, v, extra_options)
        rows = _rows(extra_options, q.shape[0], lambda kind, uuid: kind == 0)
        if rows is None:
            return out
        rows = rows.to(q.device)
        if self.which == "attn2":
            store.record_cross(step, self.key, out.index_select(0, rows))
            grid = store.map_grid(q.shape[1]) if store.word_tokens else None
            if grid is not None and max(store.word_tokens) < k.shape[1]:
                probs = word_probabilities(
                    q.index_select(0, rows), k.index_select(0, rows), extra_options["n_heads"], store.word_tokens
                )
                store.add_maps(probs, grid)
        elif store.wants_self(step, q.shape[1]):
            store.record_self(step, self.key, q.index_select(0, rows), k.index_select(0, rows))
        return out

    def _replay(self, q, k, v, extra_options, step):
        store = self.store
        out = self._attention(q, k, v, extra_options)
        table = store.cross if self.which == "attn2" else store.self_qk
        saved = table.get((step, self.key))
        if saved is None:
            return out
        store.replayed.add(step)
        rows = _rows(extra_options, q.shape[0], lambda kind, uuid: uuid in store.replay_uuids)
        if rows is None:
            return out
        rows = rows.to(q.device)
        if self.which == "attn2":
            new = saved
        else:
            q1, k1 = saved
            if q1.shape[0] != rows.numel() or q1.shape[1] != q.shape[1]:
                return out
            q1, k1 = q1.to(q.device, q.dtype), k1.to(k.device, k.dtype)
            new = self._attention(q1, k1, v.index_select(0, rows), extra_options)
        if new.shape[0] != rows.numel() or new.shape[1:] != out.shape[1:]:
            return out  # another batch than stage 1's: leave the layer alone (stage 2 checks the latent)
        new = new.to(device=out.device, dtype=out.dtype)
        if torch.is_grad_enabled():
            return out.index_copy(0, rows, new)
        out.index_copy_(0, rows, new)
        return out


def transformer_layers(diffusion_model) -> list[tuple[str, int, int]]:
    """Every transformer block of the UNet as ComfyUI's ``(block, number, depth)`` replace key."""
    from ..edlora.layerwise import cross_attention_order

    return list(cross_attention_order(diffusion_model))


def install_layout_patches(model_patcher, store: LayoutStore) -> None:
    """Put record/replay patches for ``store`` on every attention layer of ``model_patcher`` (a clone)."""
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
    for key in transformer_layers(model_patcher.model.diffusion_model):
        for which, setter in (
            ("attn1", model_patcher.set_model_attn1_replace),
            ("attn2", model_patcher.set_model_attn2_replace),
        ):
            current = replace.get(which, {}).get(key)
            inner = current.inner if isinstance(current, LayoutPatch) else current
            setter(LayoutPatch(store, which, key, inner), *key)
