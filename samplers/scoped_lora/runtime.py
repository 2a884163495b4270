"""Scoped LoRA: every concept's adapter runs unmerged, weighted per batch row and per position, in the one
UNet call of a step (the ComfyUI glue around ``lowrank``).

The rule, for every kind of layer: **a concept's LoRA changes a layer's output only at the positions of
its region** (and only in the batch rows it owns); there the layer computes what the layer with the LoRA
merged would compute. A concept's *weight* at a position is its mask value there (area-averaged to the
layer's resolution); where several concepts' weights add up to more than 1, each gets its share.

* **Pointwise layers** — linear layers over image positions (attention q and out projections,
  feed-forward, linear proj_in/proj_out) and convolutions (ResBlock convs, 1x1 proj_in/out, up/down
  sampling): the LoRA's output is multiplied by the concept's weight at each output position.
* **Attention keys/values** (self- and cross-attention): a key or value is read by every query, so masking
  it would leak the concept to queries outside the region. With a spatial scope, the queries inside the
  region attend to keys/values made *with* the concept's LoRA (all of them, as the merged layer would),
  the other queries to the plain ones; the region result replaces the plain one there. Cross-attention
  keys/values see text tokens, so this is the only way to scope them. With a rows-only scope the LoRA is
  applied to the keys/values of the concept's rows.
* **ResBlock time-embedding projections** (``emb_layers``; LoCon has them): the LoRA's change of the
  embedding is added to the feature map only inside the concept's region.
* **Layers before any position exists** (``time_embed``, ``label_emb``): rows-only scopes work there; a
  spatial scope cannot, and such a LoRA is refused with the layer named.

What still reaches outside a region is carried there by the plain network itself (its attention and
convolutions mix positions), as it would carry any change of the picture; see the locality test.

Per step the cost is two thin products per adapted layer for all concepts together (``lowrank``), plus,
for attention with spatially scoped keys/values, one attention over each concept's own queries; the plain
attention then runs only for the queries not fully covered by concepts, so where regions tile the image a
query is attended once, as without concepts.

Installation is on a ``ModelPatcher`` clone only: forward hooks through ``set_injections`` (added when the
clone is loaded for sampling, removed when it is unloaded), a ``DIFFUSION_MODEL`` wrapper that works out
each concept's weights for the rows of the current call, an ``OUTER_SAMPLE`` wrapper for the run, and
attention replace patches where keys/values are spatially scoped. Dropping the clone drops all of it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from ..attention_patches import QUERY_POSITIONS_KEY, chained_attention
from .adapters import ResolvedConcept, ScopedLoRAError
from .lowrank import (
    LayerFactors,
    conv_delta,
    linear_delta,
    normalise_weights,
    per_concept_linear,
    resize_area,
    token_grid,
)

log = logging.getLogger("multiconcept")

KEY = "multiconcept.scoped_lora"
SPEC_KEY = "multiconcept_scoped_lora"
ROW_TAGS_KEY = "multiconcept_row_tags"  # a cond dict entry: the tags of the concepts owning its rows
# Below this share of positions, a layer's LoRA runs on the positions inside the regions only (gathered and
# scattered back); above it, gathering costs about what it saves on a CPU (measured at 56 %: no gain).
SUBSET_FRACTION = 0.4
COND, UNCOND = 0, 1

_ATTENTION = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<num>\d+)|middle_block)\.\d+\.transformer_blocks\.(?P<depth>\d+)"
    r"\.(?P<attn>attn[12])$"
)


@dataclass(frozen=True)
class Scope:
    """Where a concept acts.

    ``mask``      ``[H, W]`` in 0..1 at any resolution with the image's aspect ratio (e.g. a region's box or
                  SAM mask at image size); None means everywhere.
    ``row_tags``  only the batch rows of conds whose ``ROW_TAGS_KEY`` entry shares a tag with these; None
                  means the rows of all conds.
    ``cond_kinds`` which of ComfyUI's chunks: 0 = positive (cond), 1 = negative (uncond); None = every chunk
                  (guiders that batch more cond lists than two, e.g. OMG's per-concept prompts, number them
                  0, 1, 2, ...; there the row tags pick the rows).
    """

    mask: torch.Tensor | None = None
    row_tags: frozenset | None = None
    cond_kinds: frozenset | None = frozenset({COND, UNCOND})

    @property
    def spatial(self) -> bool:
        return self.mask is not None


@dataclass(frozen=True)
class ScopedConcept:
    resolved: ResolvedConcept
    scope: Scope


# ------------------------------------------------------------------------------------ per-call state


class _Call:
    """The weights of the current UNet call: ``weights [K, B, H, W]`` at latent size, resized lazily."""

    def __init__(self, weights: torch.Tensor, device):
        self.weights = weights.to(device)
        self.hw = tuple(weights.shape[-2:])
        k = weights.shape[0]
        self.active = [bool(weights[i].amax() > 0) for i in range(k)]
        self.pending: dict = {}  # module path -> per-concept deltas waiting for their consumer
        self._tokens: dict = {}
        self._subsets: dict = {}
        self._maps: dict = {}
        self._rows: torch.Tensor | None = None

    def any_active(self, owners) -> bool:
        return any(self.active[o] for o in owners)

    def maps(self, size) -> torch.Tensor:
        """``[B, K, h, w]`` at feature-map size ``size``."""
        size = tuple(int(s) for s in size)
        if size not in self._maps:
            self._maps[size] = resize_area(self.weights, size).transpose(0, 1).contiguous()
        return self._maps[size]

    def tokens(self, n: int, where: str) -> torch.Tensor:
        """``[B, n, K]`` for a sequence of ``n`` image positions."""
        if n not in self._tokens:
            grid = token_grid(n, *self.hw)
            if grid is None:
                raise ScopedLoRAError(f"layer {where} sees {n} positions, which fit no feature map of {self.hw}")
            m = self.maps(grid)  # [B, K, h, w]
            self._tokens[n] = m.flatten(2).transpose(1, 2).contiguous()
        return self._tokens[n]

    def token_subset(self, n: int, owners: tuple, where: str):
        """``(positions, weights [B, n_sub, K])`` where any of ``owners`` acts, or ``(None, weights)`` when
        that is most of the picture (then gathering would cost more than it saves)."""
        key = (n, owners)
        if key not in self._subsets:
            w = self.tokens(n, where)
            acting = w.index_select(-1, torch.tensor(owners, device=w.device)).amax(dim=(0, 2)) > 0
            count = int(acting.sum())
            if count > SUBSET_FRACTION * n:
                self._subsets[key] = (None, w)
            else:
                positions = torch.nonzero(acting).flatten()
                self._subsets[key] = (positions, w.index_select(1, positions))
        return self._subsets[key]

    def rows(self) -> torch.Tensor:
        """``[B, K]``: each concept's weight per row (for scopes without a mask it is the same everywhere)."""
        if self._rows is None:
            self._rows = self.weights.amax(dim=(-2, -1)).transpose(0, 1).contiguous()
        return self._rows


# ------------------------------------------------------------------------------------------- plans


@dataclass
class _ModulePlan:
    path: str
    kind: str  # tokens | conv | kv | emb | global
    rows_only: LayerFactors | None = None  # concepts without a mask (or every concept for plain layers)
    spatial: LayerFactors | None = None  # concepts with a mask, where the kind needs separate handling
    all: LayerFactors | None = None
    owners: tuple = field(default_factory=tuple)


def _split(entries: list[tuple[int, object]], spatial_flags: list[bool], conv=None):
    rows = [(o, f) for o, f in entries if not spatial_flags[o]]
    spat = [(o, f) for o, f in entries if spatial_flags[o]]

    def make(items):
        return (
            LayerFactors(owners=tuple(o for o, _ in items), factors=tuple(f for _, f in items), conv=conv)
            if items
            else None
        )

    return make(rows), make(spat), make(entries)


class ScopedLoRA:
    """The scoped adapters of one ModelPatcher clone (immutable once built; per-run state aside)."""

    def __init__(self, concepts: tuple[ScopedConcept, ...], diffusion_model, node: str = "Scoped LoRA"):
        self.concepts = tuple(concepts)
        self.node = node
        self.plans: dict[str, _ModulePlan] = {}
        self.attn_keys: dict[str, tuple] = {}  # attention path -> (attn1/attn2, block, number, depth) to replace
        self._handles: list = []
        self._call: _Call | None = None
        self._run_tags: dict = {}
        self._run_latent: tuple | None = None
        self._mask_cache: dict = {}
        self._build(diffusion_model)

    # -- building -------------------------------------------------------------------------------

    def _build(self, dm) -> None:
        spatial = [c.scope.spatial for c in self.concepts]
        by_path: dict[str, list] = {}
        for k, c in enumerate(self.concepts):
            for path, f in c.resolved.factors.items():
                by_path.setdefault(path, []).append((k, f))
        for path, entries in by_path.items():
            module = _get_module(dm, path)
            owners = tuple(o for o, _ in entries)
            name = f"{self.node}: " + ", ".join(sorted({self.concepts[o].resolved.concept.source for o in owners}))
            if isinstance(module, torch.nn.Conv2d):
                if module.groups != 1:
                    raise ScopedLoRAError(f"{name}: layer {path} is a grouped convolution; it cannot take a LoRA here")
                conv = (module.stride, module.padding, module.dilation)
                _, _, every = _split(entries, spatial, conv)
                self.plans[path] = _ModulePlan(path, "conv", all=every, owners=owners)
            elif isinstance(module, torch.nn.Linear):
                rows, spat, every = _split(entries, spatial)
                if path.endswith((".to_k", ".to_v")) and path.rsplit(".", 2)[-2] in ("attn1", "attn2"):
                    kind = "kv"
                    if spat is not None:
                        attn = path.rsplit(".", 1)[0]
                        m = _ATTENTION.match(attn)
                        if m is None:
                            raise ScopedLoRAError(
                                f"{name}: attention layer {attn} is not in a UNet transformer block; scoped "
                                "LoRA supports UNet models (SD1.x, SD2.x, SDXL)"
                            )
                        block = m.group("kind") or "middle"
                        self.attn_keys[attn] = (m.group("attn"), block, int(m.group("num") or 0), int(m.group("depth")))
                elif ".emb_layers." in path:
                    kind = "emb"
                    if spat is not None:
                        block = _get_module(dm, path.split(".emb_layers.")[0])
                        if getattr(block, "use_scale_shift_norm", False) or getattr(block, "exchange_temb_dims", False):
                            raise ScopedLoRAError(
                                f"{name}: layer {path} feeds a scale/shift normalisation; a LoRA there cannot be "
                                "kept inside a region"
                            )
                elif path.startswith(("time_embed", "label_emb")):
                    kind = "global"
                    if spat is not None:
                        raise ScopedLoRAError(
                            f"{name}: the LoRA changes layer {path}, which acts on the whole image (it makes the "
                            "time/label embedding before any position exists), so it cannot act only inside a "
                            "region. Use a LoRA without that layer, or apply this one to the whole image."
                        )
                else:
                    kind = "tokens"
                self.plans[path] = _ModulePlan(path, kind, rows_only=rows, spatial=spat, all=every, owners=owners)
            else:
                raise ScopedLoRAError(
                    f"{name}: layer {path} is a {type(module).__name__}; scoped LoRA handles linear and 2-D "
                    "convolution layers"
                )

    @property
    def has_row_tags(self) -> bool:
        return any(c.scope.row_tags is not None for c in self.concepts)

    # -- ModelPatcher installation --------------------------------------------------------------

    def install(self, model_patcher) -> None:
        """Put this runtime on ``model_patcher`` (a clone), replacing any scoped LoRA it already carries."""
        import comfy.patcher_extension as pe

        model_patcher.set_injections(KEY, [pe.PatcherInjection(self._inject, self._eject)])
        for kind, fn in (
            (pe.WrappersMP.DIFFUSION_MODEL, self._diffusion_model),
            (pe.WrappersMP.OUTER_SAMPLE, self._outer_sample),
        ):
            model_patcher.remove_wrappers_with_key(kind, KEY)
            model_patcher.add_wrapper_with_key(kind, KEY, fn)
        replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
        for attn, (which, block, number, depth) in self.attn_keys.items():
            current = replace.get(which, {}).get((block, number, depth))
            inner = current.inner if isinstance(current, ScopedAttention) else current
            setter = (
                model_patcher.set_model_attn1_replace if which == "attn1" else model_patcher.set_model_attn2_replace
            )
            setter(ScopedAttention(self, attn, inner), block, number, depth)
        options = model_patcher.model_options.setdefault("transformer_options", {})
        options[SPEC_KEY] = self

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone(); this object is shared, not copied
        return self

    def _inject(self, model_patcher) -> None:
        self._eject(model_patcher)
        dm = model_patcher.model.diffusion_model
        for path, plan in self.plans.items():
            module = _get_module(dm, path)
            self._handles.append(module.register_forward_hook(self._hook_for(plan)))
            if plan.kind == "emb" and plan.spatial is not None:
                out_layers = _get_module(dm, path.split(".emb_layers.")[0] + ".out_layers")
                self._handles.append(out_layers.register_forward_pre_hook(self._emb_adder(plan)))

    def _eject(self, model_patcher) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- wrappers -------------------------------------------------------------------------------

    def _outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        tags = {}
        for cond_list in (getattr(guider, "conds", None) or {}).values():
            for c in cond_list:
                if ROW_TAGS_KEY in c and "uuid" in c:
                    tags[c["uuid"]] = frozenset(c[ROW_TAGS_KEY])
        noise = args[0] if args else kwargs.get("noise")
        self._run_tags = tags
        self._run_latent = tuple(noise.shape[-2:]) if isinstance(noise, torch.Tensor) and noise.ndim == 4 else None
        try:
            return executor(*args, **kwargs)
        finally:
            self._run_tags = {}
            self._run_latent = None

    def _diffusion_model(self, executor, *args, **kwargs):
        x = args[0]
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        self._call = _Call(self.call_weights(x, options or {}), x.device)
        try:
            return executor(*args, **kwargs)
        finally:
            self._call = None

    def call_weights(self, x: torch.Tensor, options: dict) -> torch.Tensor:
        """``[K, B, H, W]``: each concept's weight per row and latent position for this call."""
        b, hw = int(x.shape[0]), tuple(int(s) for s in x.shape[-2:])
        spatial = any(c.scope.spatial for c in self.concepts)
        if spatial and self._run_latent is not None and hw != self._run_latent:
            raise ScopedLoRAError(
                f"{self.node}: a conditioning covers only part of the latent ({hw[1] * 8}x{hw[0] * 8} of "
                f"{self._run_latent[1] * 8}x{self._run_latent[0] * 8} px, e.g. ConditioningSetArea); regions cannot "
                "follow it. Use masks (ConditioningSetMask) instead of areas with this model."
            )
        kinds = list(options.get("cond_or_uncond") or [COND])
        uuids = list(options.get("uuids") or [None] * len(kinds))
        per_chunk = b // max(1, len(kinds))
        weights = torch.zeros(len(self.concepts), b, *hw)
        for k, c in enumerate(self.concepts):
            rows = torch.zeros(b)
            for j, kind in enumerate(kinds):
                ok = c.scope.cond_kinds is None or kind in c.scope.cond_kinds
                if ok and c.scope.row_tags is not None:
                    ok = bool(self._run_tags.get(uuids[j] if j < len(uuids) else None, frozenset()) & c.scope.row_tags)
                if ok:
                    rows[j * per_chunk : (j + 1) * per_chunk] = 1.0
            if c.scope.mask is None:
                weights[k] = rows[:, None, None]
            else:
                weights[k] = rows[:, None, None] * self._latent_mask(k, hw)
        return normalise_weights(weights)

    def _latent_mask(self, k: int, hw: tuple[int, int]) -> torch.Tensor:
        key = (k, hw)
        if key not in self._mask_cache:
            mask = self.concepts[k].scope.mask.float().cpu()
            mh, mw = mask.shape[-2:]
            if abs(mw / mh - hw[1] / hw[0]) > 1.0 / min(hw):  # aspect ratios differ by more than a latent pixel
                name = self.concepts[k].resolved.concept.name
                raise ScopedLoRAError(
                    f"{self.node}: the region of '{name}' was drawn on a {mw}x{mh} image, but the image being sampled "
                    f"is {hw[1] * 8}x{hw[0] * 8} (another shape). Set the Regions node's width and height to the "
                    "sampled image size."
                )
            self._mask_cache[key] = resize_area(mask.clamp(0, 1), hw)
        return self._mask_cache[key]

    # -- hooks ----------------------------------------------------------------------------------

    def _hook_for(self, plan: _ModulePlan):
        runtime = self

        if plan.kind == "tokens":

            def hook(module, inputs, output):
                call = runtime._call
                if call is None or not call.any_active(plan.owners):
                    return None
                x = inputs[0]
                if x.ndim != 3:
                    return output + linear_delta(x, plan.all, call.rows())
                positions, w = call.token_subset(x.shape[1], plan.owners, plan.path)
                if positions is None:
                    return output + linear_delta(x, plan.all, w)
                if positions.numel() == 0:
                    return None
                # the LoRA only where a region is: gather those positions, add their deltas back in place
                delta = linear_delta(x.index_select(1, positions), plan.all, w)
                if torch.is_grad_enabled():  # keep autograd intact (gradient guidance through the UNet)
                    return output.index_add(1, positions, delta.to(output.dtype))
                output.index_add_(1, positions, delta.to(output.dtype))
                return None

        elif plan.kind == "conv":

            def hook(module, inputs, output):
                call = runtime._call
                if call is None or not call.any_active(plan.owners):
                    return None
                return output + conv_delta(inputs[0], plan.all, call.maps(output.shape[-2:]), output.shape[-2:])

        elif plan.kind == "global":

            def hook(module, inputs, output):
                call = runtime._call
                if call is None or not call.any_active(plan.owners):
                    return None
                return output + linear_delta(inputs[0], plan.all, call.rows())

        elif plan.kind == "kv":

            def hook(module, inputs, output):
                call = runtime._call
                if call is None or not call.any_active(plan.owners):
                    return None
                ctx = inputs[0]
                if plan.spatial is not None and call.any_active(plan.spatial.owners):
                    deltas = per_concept_linear(ctx, plan.spatial)
                    slot = call.pending.setdefault(plan.path.rsplit(".", 1)[0], {})
                    which = plan.path.rsplit(".", 1)[1]  # to_k / to_v
                    for owner, d in zip(plan.spatial.owners, deltas, strict=True):
                        slot.setdefault(owner, {})[which] = d
                if plan.rows_only is not None and call.any_active(plan.rows_only.owners):
                    rows = call.rows()[:, None, :].expand(-1, ctx.shape[1], -1)
                    return output + linear_delta(ctx, plan.rows_only, rows)
                return None

        elif plan.kind == "emb":

            def hook(module, inputs, output):
                call = runtime._call
                if call is None or not call.any_active(plan.owners):
                    return None
                x = inputs[0]
                if plan.spatial is not None and call.any_active(plan.spatial.owners):
                    deltas = per_concept_linear(x, plan.spatial)
                    call.pending[plan.path] = list(zip(plan.spatial.owners, deltas, strict=True))
                if plan.rows_only is not None and call.any_active(plan.rows_only.owners):
                    return output + linear_delta(x, plan.rows_only, call.rows())
                return None

        else:  # pragma: no cover - every kind is listed above
            raise AssertionError(plan.kind)
        return hook

    def _emb_adder(self, plan: _ModulePlan):
        runtime = self

        def pre_hook(module, inputs):
            call = runtime._call
            if call is None:
                return None
            pending = call.pending.pop(plan.path, None)
            if not pending:
                return None
            h = inputs[0]
            maps = call.maps(h.shape[-2:])  # [B, K, h, w]
            add = None
            for owner, d in pending:
                if not call.active[owner]:
                    continue
                term = maps[:, owner : owner + 1].to(h.dtype) * d.to(h.dtype)[:, :, None, None]
                add = term if add is None else add + term
            return None if add is None else (h + add,) + tuple(inputs[1:])

        return pre_hook


class ScopedAttention:
    """attn1/attn2 replace patch: queries in a concept's region attend to keys/values made with its LoRA,
    the other queries to the plain ones, so the layer's output changes only inside the region."""

    def __init__(self, runtime: ScopedLoRA, attn_path: str, inner=None):
        self.runtime = runtime
        self.attn_path = attn_path
        self.inner = inner  # another pack's replace patch for this layer, kept as the attention function

    def _attention(self, q, k, v, extra_options):
        return chained_attention(self.inner, q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        call = self.runtime._call
        pending = call.pending.pop(self.attn_path, None) if call is not None else None
        owners = [o for o in (pending or {}) if call.active[o]]
        if not owners:
            return self._attention(q, k, v, extra_options)
        weights = call.tokens(q.shape[1], self.attn_path)  # [B, N, K]
        # out = (1 - sum_c w_c) * plain + sum_c w_c * with_c: the plain attention is needed only for the
        # queries some share of which is left to it, so inside fully covered regions each query is attended
        # once (the concept's), not twice; outside every region the factor is exactly 1 (output unchanged).
        rest = 1.0 - weights.index_select(-1, torch.tensor(owners, device=weights.device)).sum(-1)  # [B, N]
        plain_tokens = torch.nonzero((rest > 1e-6).any(dim=0)).flatten()
        n = q.shape[1]
        if plain_tokens.numel() == n:
            out = self._attention(q, k, v, extra_options)
        else:
            out = None
            if plain_tokens.numel():
                part = self._attention(
                    q.index_select(1, plain_tokens), k, v, {**extra_options, QUERY_POSITIONS_KEY: plain_tokens}
                )
                out = part.new_zeros(part.shape[0], n, part.shape[-1])
                out[:, plain_tokens] = part
        if out is not None:
            out = out * rest.to(out.dtype).unsqueeze(-1)
        for owner in owners:
            deltas = pending[owner]
            w = weights[..., owner]  # [B, N]
            rows = torch.nonzero(w.amax(dim=1) > 0).flatten()
            tokens = torch.nonzero(w.index_select(0, rows).amax(dim=0) > 0).flatten()
            if rows.numel() == 0 or tokens.numel() == 0:
                continue
            k_c = k.index_select(0, rows)
            v_c = v.index_select(0, rows)
            if "to_k" in deltas:
                k_c = k_c + deltas["to_k"].index_select(0, rows).to(k.dtype)
            if "to_v" in deltas:
                v_c = v_c + deltas["to_v"].index_select(0, rows).to(v.dtype)
            q_c = q.index_select(0, rows).index_select(1, tokens)
            # only the concept's own positions
            region = self._attention(q_c, k_c, v_c, {**extra_options, QUERY_POSITIONS_KEY: tokens})
            if out is None:
                out = region.new_zeros(q.shape[0], n, region.shape[-1])
            w_c = w.index_select(0, rows).index_select(1, tokens).to(region.dtype).unsqueeze(-1)
            where = (rows[:, None], tokens[None, :])
            out[where] = out[where] + w_c * region  # overlapping concepts add their shares
        return out

    def __deepcopy__(self, memo):
        return self


def _get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def install_scoped_lora(model_patcher, concepts: list[ScopedConcept], node: str) -> ScopedLoRA:
    """Add ``concepts`` to the scoped LoRA on ``model_patcher`` (a clone), keeping any it carries already."""
    existing = model_patcher.model_options.get("transformer_options", {}).get(SPEC_KEY)
    previous = existing.concepts if isinstance(existing, ScopedLoRA) else ()
    runtime = ScopedLoRA(previous + tuple(concepts), model_patcher.model.diffusion_model, node=node)
    runtime.install(model_patcher)
    return runtime
