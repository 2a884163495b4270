"""Mix-of-Show regional sampling in ComfyUI (the glue around ``regional_attention``).

* The node encodes every region's prompt and negative once and attaches them, with the region masks, to
  its positive and negative conditionings (``REGIONAL_KEY``): a :class:`RegionalSide` each.
* An ``OUTER_SAMPLE`` wrapper collects, once per sampling run, the sides of the run's conds by ComfyUI's
  per-cond uuid (a :class:`RegionalRun`), and checks the regions fit the latent.
* A ``attn2`` replace patch on every cross-attention layer computes the layer's global result as usual
  (through any replace patch that was there before), then, for the batch rows of conds that carry regions,
  the region results from each region's own keys/values and blends them (``regional_attention``).
  Region keys/values — the layer's ``to_k``/``to_v`` of the region's layer-``i`` encoding, plus the
  region's concepts' cross-attention LoRA — are made once per run and reused at every step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..attention_patches import chained_attention
from ..edlora.layerwise import _to_rows, cross_attention_order, layer_for, layer_index
from ..scoped_lora.lowrank import LowRankFactors, token_grid
from .regional_attention import LayerRegions, _repeat_to, layer_regions, regional_attention, stack_regions

REGIONAL_KEY = "multiconcept_regional"  # conditioning dict entry: a RegionalSide
RUN_KEY = "multiconcept_regional_run"  # transformer_options entry during a run: a RegionalRun
WRAPPER_KEY = "multiconcept.mixofshow"
REGION_PROBE_KEY = "multiconcept_region_probe"  # transformer_options: called with each layer's region keys
SCOPED_SPEC_KEY = "multiconcept_scoped_lora"  # samplers.scoped_lora.runtime.SPEC_KEY (not imported: no cycle)

_ATTN2 = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<num>\d+)|middle_block)\.\d+\.transformer_blocks\.(?P<depth>\d+)\.attn2$"
)


class RegionalSamplingError(ValueError):
    """Regions that cannot be applied to this run; the message names the node and the fix."""


@dataclass(frozen=True, eq=False)
class RegionalLayout:
    """What both sides of one regional node share: the regions and the concepts' cross-attention LoRA.

    ``masks``      ``[R, H, W]`` in 0..1 at the image size the regions were drawn for.
    ``weights``    ``[R]`` overlap weights.
    ``kv_factors`` per region: ``{attn2 module path: {"to_k"/"to_v": (LowRankFactors, ...)}}`` of the
                   region's concepts (scoped mode); empty when the concepts are merged or absent.
    """

    node: str
    width: int
    height: int
    masks: torch.Tensor
    weights: torch.Tensor
    labels: tuple[str, ...]
    kv_factors: tuple[dict, ...] = ()

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True, eq=False)
class RegionalSide:
    """One side (positive or negative) of a regional node: per region ``[B, L, T, D]`` contexts, ``L`` = 1
    for a prompt without layer-wise concept words (every layer reads it), else one per cross-attention layer."""

    layout: RegionalLayout
    contexts: tuple[torch.Tensor, ...]

    def __deepcopy__(self, memo):
        return self


class RegionalRun:
    """The regional sides of one sampling run, with per-run caches (region keys/values, layer shares)."""

    def __init__(self, by_uuid: dict, latent_hw: tuple[int, int] | None):
        self.by_uuid = by_uuid
        self.latent_hw = latent_hw
        self._kv: dict = {}
        self._shares: dict = {}

    def __bool__(self) -> bool:
        return bool(self.by_uuid)

    def __deepcopy__(self, memo):
        return self

    def regions(self, layout: RegionalLayout, tokens: int, device) -> LayerRegions:
        """The layout's regions at the layer size that has ``tokens`` positions (built once per run)."""
        key = (id(layout), tokens, device)
        if key not in self._shares:
            hw = self.latent_hw or (layout.height // 8, layout.width // 8)
            grid = token_grid(tokens, *hw)
            if grid is None:
                raise RegionalSamplingError(
                    f"{layout.node}: a cross-attention layer sees {tokens} positions, which fit no feature map of a "
                    f"{hw[1] * 8}x{hw[0] * 8} image"
                )
            self._shares[key] = layer_regions(layout.masks, grid, layout.weights).to(device)
        return self._shares[key]

    def region_kv(self, uuids: tuple, sides: list, per: int, layer: int | None, module, path: str, dtype, device):
        """``(k, v)`` ``[R, B, T, C]``: every region's keys/values at ``layer`` for the rows of these conds
        (``per`` rows each), projected by ``module`` (the layer's attn2) plus the regions' concepts' LoRA."""
        key = (uuids, per, layer, dtype, device)
        if key not in self._kv:
            layout = sides[0].layout
            ks, vs = [], []
            for r in range(len(layout.labels)):
                k_rows, v_rows = [], []
                for side in sides:
                    layers = side.contexts[r]
                    slot = layer_for(layer, int(layers.shape[1]))
                    ctx = layers[:, 0 if slot is None else slot].to(device=device, dtype=dtype)
                    k = module.to_k(ctx)
                    v = module.to_v(ctx)
                    factors = layout.kv_factors[r].get(path, {}) if layout.kv_factors else {}
                    if factors.get("to_k"):
                        k = k + _lora_delta(ctx, factors["to_k"]).to(k.dtype)
                    if factors.get("to_v"):
                        v = v + _lora_delta(ctx, factors["to_v"]).to(v.dtype)
                    k_rows.append(_to_rows(k, per))
                    v_rows.append(_to_rows(v, per))
                tokens = math.lcm(*(int(t.shape[1]) for t in k_rows))
                ks.append(torch.cat([_repeat_to(t, tokens) for t in k_rows]))
                vs.append(torch.cat([_repeat_to(t, tokens) for t in v_rows]))
            self._kv[key] = (stack_regions(ks), stack_regions(vs))
        return self._kv[key]


def _lora_delta(x: torch.Tensor, factors: tuple[LowRankFactors, ...]) -> torch.Tensor:
    xf = x.float()
    out = None
    for f in factors:
        d = (xf @ f.down.to(xf).flatten(1).t()) @ f.up.to(xf).flatten(1).t() * f.scale
        out = d if out is None else out + d
    return out


# ------------------------------------------------------------------------------------------- wrapper


def collect_regional(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: hand this run's regional sides to the attention patches."""
    guider = executor.class_obj
    by_uuid = {}
    for cond_list in (getattr(guider, "conds", None) or {}).values():
        for c in cond_list:
            side = c.get(REGIONAL_KEY)
            if isinstance(side, RegionalSide) and "uuid" in c:
                by_uuid[c["uuid"]] = side
    noise = args[0] if args else kwargs.get("noise")
    latent_hw = tuple(int(s) for s in noise.shape[-2:]) if isinstance(noise, torch.Tensor) and noise.ndim == 4 else None
    if by_uuid and latent_hw is not None:
        for side in by_uuid.values():
            check_fits(side.layout, latent_hw)
    if by_uuid and isinstance(getattr(guider, "model_options", None), dict):
        options = guider.model_options  # this run's own copy
        options["transformer_options"] = {
            **options.get("transformer_options", {}),
            RUN_KEY: RegionalRun(by_uuid, latent_hw),
        }
    return executor(*args, **kwargs)


def check_fits(layout: RegionalLayout, latent_hw: tuple[int, int]) -> None:
    """Regions scale with the image (they are fractions), but only to an image of the same shape."""
    h, w = latent_hw
    if abs(layout.width / layout.height - w / h) > 1.0 / min(h, w):
        raise RegionalSamplingError(
            f"{layout.node}: the regions were drawn on a {layout.width}x{layout.height} image, but the latent being "
            f"sampled is {w * 8}x{h * 8} (another shape). Set the Regions node's width and height to the size of "
            "the Empty Latent Image (or at least the same aspect ratio)."
        )


# ---------------------------------------------------------------------------------- attention patch


class RegionalAttention:
    """attn2 replace patch of one cross-attention layer (see the module docstring)."""

    def __init__(self, key: tuple[str, int, int], path: str, module, order: dict, inner=None):
        self.key = key
        self.path = path
        self.module = module  # the layer's attn2 (shared nn.Module; its to_k/to_v make the region keys)
        self.order = order
        self.inner = inner  # another replace patch for this layer, kept as the global attention

    def __deepcopy__(self, memo):
        return self

    def _attention(self, q, k, v, extra_options):
        return chained_attention(self.inner, q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        base = self._attention(q, k, v, extra_options)
        run = extra_options.get(RUN_KEY)
        uuids = list(extra_options.get("uuids") or [])
        if not run or not uuids or q.shape[0] % len(uuids):
            return base
        sides = [run.by_uuid.get(u) for u in uuids]
        if not any(s is not None for s in sides):
            return base
        per = q.shape[0] // len(uuids)
        layer = layer_index(extra_options, self.order)
        out = base
        groups: dict[int, list[int]] = {}
        for j, s in enumerate(sides):
            if s is not None:
                groups.setdefault(id(s.layout), []).append(j)
        scoped = extra_options.get(SCOPED_SPEC_KEY)
        for chunks in groups.values():
            group = [sides[j] for j in chunks]
            layout = group[0].layout
            rows = torch.cat([torch.arange(j * per, (j + 1) * per) for j in chunks]).to(q.device)
            regions = run.regions(layout, q.shape[1], q.device)
            with _suspended(scoped):
                region_k, region_v = run.region_kv(
                    tuple(uuids[j] for j in chunks), group, per, layer, self.module, self.path, k.dtype, k.device
                )
            whole = len(chunks) == len(uuids)
            q_rows = q if whole else q.index_select(0, rows)
            probe = extra_options.get(REGION_PROBE_KEY)
            if probe is not None:  # e.g. LoRA-Composer's losses read the concept tokens' maps from here
                kinds = list(extra_options.get("cond_or_uncond") or [])
                chunk_kinds = [kinds[j] if j < len(kinds) else 0 for j in chunks]
                probe(self.key, q_rows, region_k, chunk_kinds, per, layout, extra_options)
            base_rows = base if whole else base.index_select(0, rows)
            if self.inner is None:
                blended = regional_attention(
                    q_rows,
                    base_rows,
                    region_k,
                    region_v,
                    regions,
                    extra_options["n_heads"],
                    attention=lambda qq, kk, vv, h: self._attention(qq, kk, vv, extra_options),
                )
            else:
                blended = self._through_inner(q, k, v, rows, base_rows, region_k, region_v, regions, extra_options)
            if whole:
                out = blended.to(base.dtype)
                continue
            if out is base:
                out = base.clone()
            out[rows] = blended.to(out.dtype)
        return out

    def _through_inner(self, q, k, v, rows, base_rows, region_k, region_v, regions, extra_options):
        """With another pack's attention patch inside, call it with the whole batch (the shapes it expects),
        once per region, the region's keys/values in the region rows; then blend."""
        shares = regions.shares
        out = base_rows * regions.outside.to(base_rows)[None, :, None]
        for r in range(region_k.shape[0]):
            if not bool((shares[r] > 0).any()):
                continue
            tokens = math.lcm(int(k.shape[1]), int(region_k[r].shape[1]))
            k_r, v_r = _repeat_to(k, tokens).clone(), _repeat_to(v, tokens).clone()
            k_r[rows] = _repeat_to(region_k[r], tokens).to(k.dtype)
            v_r[rows] = _repeat_to(region_v[r], tokens).to(v.dtype)
            full = self.inner(q, k_r, v_r, extra_options).index_select(0, rows)
            out = out + shares[r].to(out)[None, :, None] * full
        return out


class _suspended:
    """Keep the scoped LoRA runtime's to_k/to_v hooks out of the region projections (its attn2 deltas are for
    the global context; region contexts get their own concepts' deltas here)."""

    def __init__(self, runtime):
        self.runtime = runtime if hasattr(runtime, "_call") else None

    def __enter__(self):
        if self.runtime is not None:
            self.saved = self.runtime._call
            self.runtime._call = None

    def __exit__(self, *exc):
        if self.runtime is not None:
            self.runtime._call = self.saved


def attention_layers(diffusion_model) -> dict[tuple[str, int, int], tuple[str, torch.nn.Module]]:
    """``(block, number, depth) -> (module path, attn2 module)`` for every cross-attention layer."""
    out = {}
    for name, module in diffusion_model.named_modules():
        m = _ATTN2.match(name)
        if m is not None and hasattr(module, "to_k"):
            out[(m.group("kind") or "middle", int(m.group("num") or 0), int(m.group("depth")))] = (name, module)
    return out


def install_regional_attention(model_patcher, node: str) -> None:
    """Put the regional attention on ``model_patcher`` (a clone): every cross-attention layer, once."""
    import comfy.patcher_extension as pe

    dm = model_patcher.model.diffusion_model
    layers = attention_layers(dm)
    if not layers:
        raise RegionalSamplingError(
            f"{node}: this MODEL ({type(model_patcher.model).__name__}) has no UNet cross-attention layers, so "
            "prompts cannot be given per region. Use an SD1.x, SD2.x or SDXL checkpoint."
        )
    order = cross_attention_order(dm)
    model_patcher.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, collect_regional)
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key, (path, module) in layers.items():
        current = replace.get(key, replace.get(key[:2]))
        inner = current.inner if isinstance(current, RegionalAttention) else current
        model_patcher.set_model_attn2_replace(RegionalAttention(key, path, module, order, inner), *key)


__all__ = [
    "REGIONAL_KEY",
    "REGION_PROBE_KEY",
    "RegionalAttention",
    "RegionalLayout",
    "RegionalRun",
    "RegionalSamplingError",
    "RegionalSide",
    "collect_regional",
    "install_regional_attention",
]
