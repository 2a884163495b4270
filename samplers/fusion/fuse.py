"""Gradient fusion of a concept stack into one MODEL and CLIP (ComfyUI glue around ``solvers`` and ``moments``).

The stages follow Mix-of-Show's fusion, each layer's inputs recorded while its concept is active:

1. text encoder — every fused CLIP layer, from the concept's prompts (the templates, concept words filled in)
   encoded by the CLIP with that concept's words and text-encoder LoRA; real tokens only (no padding);
2. cross-attention keys/values — from the *fused* text encoder's outputs at the concept's tokens (its words and
   the end token), layer ``l`` reading the prompt's layer-``l`` encoding (ED-LoRA's layer-wise tokens);
3. the other UNet layers — from a short sampling run of each concept's prompt (no CFG, as the original), with the
   fused keys/values and the concept's own UNet LoRA.

Each stage accumulates second moments only, then solves every layer (closed form or L-BFGS). Base weights and
each concept's weights come from ComfyUI's own patch maths (``comfy.lora.calculate_weight``) over the original
weights, so any LoRA format ComfyUI merges works and a model patched before this node counts as the base.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...formats.fused import FusedConceptInfo, FusedConcepts
from ..concept_stack.lora_fit import LoRAFitError, lora_patches
from ..concept_stack.stack import Concept, ConceptStack
from ..edlora.clip import LAYERWISE_KEY, concept_vocabulary_of, layer_variants_only, with_vocabulary
from ..edlora.layerwise import cross_attention_paths
from ..edlora.model import (
    FAMILIES,
    FUSED_KEY,
    MERGED_KEY,
    EDLoRAApplyError,
    add_layerwise_routing,
    check_compatible,
    model_family,
    text_encoder_patches,
    unet_patches,
)
from ..edlora.vocabulary import ConceptEntry
from ..mixofshow.encoding import concept_clip, encode
from ..prompt_tokens import token_ids
from .moments import MomentAccumulator, input_group, recording
from .solvers import DEFAULT_RIDGE, SOLVERS, LayerProblem, factor, plain_sum, relative_errors, solve

log = logging.getLogger("multiconcept")

DEFAULT_TEMPLATES = ("photo of a {}", "{}")  # the original's concept prompts
SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
_ATTN2_KV = re.compile(r"\.attn2\.to_[kv]\.weight$")


class FusionError(ValueError):
    """Concepts that cannot be fused; the message names the concept or layer and the fix."""


# How strongly each concept's LoRA counts in the fusion. The official fusion merges every concept at full
# strength: unet_alpha = text_encoder_alpha = 1.0 in TencentARC/Mix-of-Show's fusion configs
# (datasets/data_cfgs/MixofShow/multi-concept/*/*.json, read by gradient_fusion.py:403 and :512).
FUSION_STRENGTHS = ("1.0, as the official fusion", "the stack's strengths")


@dataclass(frozen=True)
class FusionSettings:
    solver: str = "closed form"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    steps: int = 20  # sampling steps of each concept's recording run (the original: 20, all recorded)
    width: int = 512
    height: int = 512
    seed: int = 0
    sampler: str = "dpmpp_2m"  # the original records with DPM-Solver multistep
    scheduler: str = "normal"
    text_iters: int = 500  # L-BFGS iterations for text-encoder and key/value layers (the original's defaults)
    unet_iters: int = 50  # ... and for the other UNet layers
    ridge: float = DEFAULT_RIDGE
    save_dtype: str = "fp16"
    strengths: str = FUSION_STRENGTHS[0]


@dataclass
class ConceptPatches:
    """One concept's adapter as ComfyUI weight patches: key -> patch, applied with the concept's strength."""

    concept: Concept
    unet: dict
    clip: dict


@dataclass
class LayerReport:
    layer: str
    stage: str  # "text encoder" / "cross-attention k/v" / "UNet"
    fused: list[float]
    plain_sum: list[float]

    def as_dict(self) -> dict:
        return {"layer": self.layer, "stage": self.stage, "fused": self.fused, "sum": self.plain_sum}


@dataclass
class FusionRun:
    """What a fusion produced, plus timing and memory for the benchmark."""

    fused: FusedConcepts
    reports: list[LayerReport]
    seconds: dict = field(default_factory=dict)  # stage -> seconds
    solve_seconds: float = 0.0


Progress = Callable[[int, int, str], None]


# ------------------------------------------------------------------------------------------- checks


def check_stack(stack: ConceptStack, model, clip) -> str:
    """Refuse, by name, stacks that cannot be fused; return the family key (``sd15`` / ``sdxl``)."""
    if stack is None or len(stack) < 2:
        raise FusionError(
            f"fusion needs at least two concepts (the stack has {0 if stack is None else len(stack)}); for one concept "
            "use the ED-LoRA Loader."
        )
    families = {c.adapter.base_model for c in stack if c.kind == "edlora" and c.adapter is not None}
    if len(families) > 1:
        which = ", ".join(f"{c.name} ({FAMILIES[c.adapter.base_model].name})" for c in stack if c.kind == "edlora")
        raise FusionError(
            f"the concepts were trained for different base models ({which}); one fused model needs concepts of one "
            "family. Remove the odd ones or fuse each family on its own checkpoint."
        )
    merged = set(model.model_options.get("transformer_options", {}).get(MERGED_KEY, ()))
    seen: dict[str, str] = {}
    for c in stack:
        if c.fused:
            raise FusionError(f"{c.name} is already fused (it comes from Fuse Concepts or Load Fused Concepts); fuse "
                              "the original concepts instead.")  # fmt: skip
        if c.loader_uid and c.loader_uid in merged:
            raise FusionError(
                f"the MODEL already has {c.source} merged everywhere (it comes from that ED-LoRA Loader); connect the "
                "checkpoint's MODEL and CLIP."
            )
        if c.kind == "edlora":
            try:
                check_compatible(model, clip, c.adapter, c.source)
            except EDLoRAApplyError as e:
                raise FusionError(str(e)) from None
        for w in c.words:
            if w in seen:
                raise FusionError(
                    f"the word {w} names two concepts ({seen[w]} and {c.name}); the fused model must tell them apart. "
                    "Give one of them other words (concept_words / trigger_words)."
                )
            seen[w] = c.name
    family = model_family(model)
    if family is None:
        raise FusionError("the MODEL is neither SD1.5- nor SDXL-shaped; fusion supports those families")
    return family


def concept_patches(model, clip, concept: Concept) -> ConceptPatches:
    """The concept's UNet and text-encoder adapters as ComfyUI patch dicts keyed by weight key."""
    if concept.kind == "edlora":
        try:
            unet = unet_patches(model, concept.adapter, concept.source) if concept.strength_unet else {}
            text = text_encoder_patches(clip, concept.adapter, concept.source) if concept.strength_text else {}
        except EDLoRAApplyError as e:
            raise FusionError(str(e)) from None
        return ConceptPatches(concept, unet, text)
    try:  # checked whole, whatever the strengths: a file for another family is a mistake at any strength
        fitted = lora_patches(concept.adapter.tensors, concept.source, model, clip)
    except LoRAFitError as e:
        raise FusionError(str(e)) from None
    unet = fitted.unet if concept.strength_unet else {}
    text = fitted.text if concept.strength_text else {}
    if not unet and not text:
        raise FusionError(f"{concept.source} has no LoRA weights this MODEL/CLIP can use (or both strengths are 0)")
    return ConceptPatches(concept, unet, text)


# ------------------------------------------------------------------------------------------- weights


class WeightSource:
    """Base and per-concept weights of one patcher's layers, from the original weights and the patches."""

    def __init__(self, patcher, device):
        self.patcher = patcher
        self.device = device
        self.key_patches = patcher.get_key_patches()

    def base(self, key: str) -> torch.Tensor:
        import comfy.lora

        entry = self.key_patches[key]
        original, convert = entry[0]
        w = convert(original.detach().to(device=self.device, dtype=torch.float32, copy=True), inplace=True)
        w = comfy.lora.calculate_weight(entry[1:], w, key, intermediate_dtype=torch.float32)
        return flat(w, key)

    def delta(self, key: str, base: torch.Tensor, patch, strength: float) -> torch.Tensor:
        import comfy.lora

        shape = self.key_patches[key][0][0].shape
        w = base.reshape(shape).clone()
        w = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], w, key, intermediate_dtype=torch.float32)
        return flat(w, key) - base


def flat(w: torch.Tensor, key: str) -> torch.Tensor:
    if w.ndim == 2:
        return w.float()
    if w.ndim == 4 and w.shape[2] == 1 and w.shape[3] == 1:
        return w.float().reshape(w.shape[0], w.shape[1])
    raise FusionError(
        f"layer {key} has weight shape {list(w.shape)}: fusion handles linear and 1x1 convolution layers only. Use "
        "concepts whose LoRA touches attention/linear layers (ED-LoRAs, standard LoRAs without LoCon convolutions)."
    )


def _check_keys(items: list[ConceptPatches], unet_sd_shapes: dict, clip_sd_shapes: dict) -> None:
    for item in items:
        for part, shapes in ((item.unet, unet_sd_shapes), (item.clip, clip_sd_shapes)):
            for key in part:
                shape = shapes.get(key)
                if shape is None or not key.endswith(".weight"):
                    raise FusionError(f"{item.concept.source}: patch for {key} is not a weight this model has")
                if not (len(shape) == 2 or (len(shape) == 4 and shape[2] == 1 and shape[3] == 1)):
                    raise FusionError(
                        f"{item.concept.source} has a LoRA on {key} (shape {list(shape)}): fusion handles linear and "
                        "1x1 convolution layers only, not LoCon convolutions. Compose this concept with Mix-of-Show "
                        "Regional (scoped) instead."
                    )


# ------------------------------------------------------------------------------------------- recording


def _real_token_counts(clip, text: str) -> dict[str, int]:
    """Per text encoder key: how many tokens of ``text``'s first section are real (start .. first end token)."""
    tokens = clip.tokenize(text)
    empty = clip.tokenize("")
    out = {}
    for key, sections in tokens.items():
        end = empty[key][0][1][0]
        ids = [t[0] for t in sections[0]]
        n = next((i + 1 for i in range(1, len(ids)) if isinstance(ids[i], int) and ids[i] == end), len(ids))
        out[key] = n
    return out


def _clip_key_of(group: str) -> str:
    head = group.split(".", 1)[0]
    return head[len("clip_") :] if head.startswith("clip_") else "l"


def concept_prompts(concept: Concept, templates: tuple[str, ...]) -> list[str]:
    words = concept.prompt_words or concept.class_word
    return [t.replace("{}", words).strip() or words for t in templates]


def _modules(root, keys, strip: str = "") -> dict[str, torch.nn.Module]:
    """group -> one module reading that group's input, for every weight key in ``keys``."""
    out = {}
    for key in keys:
        path = key[: -len(".weight")]
        if strip and path.startswith(strip):
            path = path[len(strip) :]
        group = input_group(path)
        if group not in out:
            out[group] = root.get_submodule(path)
    return out


def record_text_encoder(clip, item: ConceptPatches, keys, templates) -> dict[str, MomentAccumulator]:
    """Text-encoder layer inputs of the concept's prompts, with the concept's words and text-encoder LoRA."""
    import comfy.model_management

    c = item.concept
    clip_i = concept_clip(clip, [c] if c.kind == "edlora" else [], [])
    if item.clip:
        clip_i.add_patches(item.clip, c.strength_text)
    # the 16 (SDXL: 70) per-layer prompt variants, as the official fusion binds each prompt
    # (TencentARC/Mix-of-Show gradient_fusion.py:517-527, bind_concept_prompt), not a 17th layer-averaged one
    clip_i = layer_variants_only(clip_i)
    modules = _modules(clip.patcher.model, keys)
    acc: dict[str, MomentAccumulator] = {}
    for prompt in concept_prompts(c, templates):
        counts = _real_token_counts(clip_i, prompt)

        def select(group, x, counts=counts):
            return x[:, : counts.get(_clip_key_of(group), x.shape[1])] if x.ndim == 3 else x

        with recording(modules, acc, select):
            encode(clip_i, prompt)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return acc


def _context_positions(clip, concept: Concept, prompt: str) -> list[int]:
    """Where the concept sits in the encoded prompt: its words' tokens and the end token (the original's rows)."""
    ids = token_ids(clip, prompt)
    empty = token_ids(clip, "")
    end = empty[1] if len(empty) > 1 else None
    eos = next((i for i in range(1, len(ids)) if ids[i] == end), len(ids) - 1)
    words = set(concept.words)
    if concept.kind == "edlora":
        pos = [i for i, t in enumerate(ids) if isinstance(t, tuple) and t[0] == "concept" and t[1][1] in words]
    else:
        from ..prompt_tokens import phrase_positions

        pos = sorted({p for w in concept.words for occ in phrase_positions(clip, prompt, w) for p in occ})
    if not pos:  # a LoRA without trigger words: every real token but the start token
        pos = list(range(1, eos))
    return sorted(set(pos + [eos]))


def record_context(fused_clip, concept: Concept, attn2_paths: list[str], templates) -> dict[str, MomentAccumulator]:
    """Cross-attention k/v inputs: the fused CLIP's encodings at the concept's tokens, layer by layer."""
    acc: dict[str, MomentAccumulator] = {}
    for prompt in concept_prompts(concept, templates):
        cond = encode(fused_clip, prompt)
        tensor, extra = cond[0][0], cond[0][1]
        lw = extra.get(LAYERWISE_KEY)
        layers = lw.layers if lw is not None else tensor[:, None]
        pos = torch.tensor(_context_positions(fused_clip, concept, prompt), device=layers.device)
        for index, path in enumerate(attn2_paths):
            rows = layers[:, min(index, layers.shape[1] - 1)].index_select(1, pos)
            acc.setdefault(f"{path}:context", MomentAccumulator()).add(rows.reshape(-1, rows.shape[-1]))
    return acc


def record_unet(model, fused_clip, item: ConceptPatches, keys, kv_patches: dict, settings: FusionSettings,
                on_step: Callable[[int], None] | None = None) -> dict[str, MomentAccumulator]:  # fmt: skip
    """The other UNet layers' inputs over a short sampling run of the concept's first prompt (cfg 1, no
    negative: the original records the conditional branch only)."""
    import comfy.sample

    c = item.concept
    clone = model.clone()
    if kv_patches:
        clone.add_patches(kv_patches, 1.0)
    own = {k: p for k, p in item.unet.items() if not _ATTN2_KV.search(k)}
    if own:
        clone.add_patches(own, c.strength_unet)
    add_layerwise_routing(clone)
    prompt = concept_prompts(c, settings.templates)[0]
    positive = encode(fused_clip, prompt)
    negative = encode(fused_clip, "")
    channels = int(getattr(model.model.latent_format, "latent_channels", 4))
    latent = torch.zeros(1, channels, settings.height // 8, settings.width // 8)
    noise = comfy.sample.prepare_noise(latent, settings.seed)
    modules = _modules(model.model.diffusion_model, keys, strip="diffusion_model.")
    acc: dict[str, MomentAccumulator] = {}

    def callback(step, x0, x, total):
        if on_step is not None:
            on_step(step + 1)

    with recording(modules, acc):
        comfy.sample.sample(
            clone, noise, settings.steps, 1.0, settings.sampler, settings.scheduler, positive, negative, latent,
            callback=callback, disable_pbar=True, seed=settings.seed,
        )  # fmt: skip
    return acc


# ------------------------------------------------------------------------------------------- solving


def _solve_layers(source: WeightSource, keys: list[str], items: list[ConceptPatches], which: str,
                  moments: list[dict[str, MomentAccumulator]], settings: FusionSettings, stage: str, iters: int,
                  strip: str, save_dtype, tick: Callable[[str], None]) -> tuple[dict, list[LayerReport], float]:  # fmt: skip
    """Solve each layer; return ``{key: W_fused − W0}`` (in ``save_dtype``), the reports and solver seconds."""
    import comfy.model_management

    diffs, reports, seconds = {}, [], 0.0
    factors: dict = {}
    for key in sorted(keys, key=lambda k: (input_group(_path(k, strip)), k)):
        comfy.model_management.throw_exception_if_processing_interrupted()
        group = input_group(_path(key, strip))
        base = source.base(key)
        deltas, mats, counts = [], [], []
        for item, acc in zip(items, moments, strict=True):
            patch = getattr(item, which).get(key)
            strength = item.concept.strength_unet if which == "unet" else item.concept.strength_text
            deltas.append(None if patch is None else source.delta(key, base, patch, strength))
            a = acc.get(group)
            if a is None or a.moment is None:
                raise FusionError(f"no inputs were recorded for {key} while {item.concept.name} was active")
            mats.append(a.moment)
            counts.append(a.count)
        problem = LayerProblem(base=base, deltas=deltas, moments=mats, counts=counts)
        start = time.perf_counter()
        chol = None
        if settings.solver == "closed form" and len(mats) > 1:
            if group not in factors:  # q/k/v (and k/v of a cross-attention) share one factorisation
                factors.clear()
                factors[group] = factor(mats, settings.ridge, source.device)
            chol = factors[group]
        fused = solve(problem, settings.solver, iters=iters, ridge=settings.ridge, device=source.device, chol=chol)
        seconds += time.perf_counter() - start
        diff = (fused - base).to(save_dtype)
        applied = base + diff.float()
        if not torch.isfinite(applied).all():
            raise FusionError(f"the fused weight of {key} is not finite; check the concepts' files (NaN weights?)")
        diffs[key] = diff.cpu()
        errors_fused, errors_sum = relative_errors(problem, applied, plain_sum(problem))
        reports.append(LayerReport(key, stage, errors_fused, errors_sum))
        tick(key)
    return diffs, reports, seconds


def _path(key: str, strip: str) -> str:
    path = key[: -len(".weight")]
    return path[len(strip) :] if strip and path.startswith(strip) else path


def _fingerprint(source: WeightSource, keys: list[str]) -> dict:
    return {k: float(source.base(k).double().sum()) for k in sorted(keys)[:3]}


def fusion_strengths(stack: ConceptStack, strengths: str) -> ConceptStack:
    """``stack`` with the strengths the fusion uses: 1.0 (official) for every strength left at its Concept Stack
    node's default (a changed one is kept), or the stack's own."""
    if strengths not in FUSION_STRENGTHS:
        raise FusionError(f"strengths is {strengths!r}; choose one of {', '.join(FUSION_STRENGTHS)}")
    if strengths == FUSION_STRENGTHS[1]:
        return stack
    return stack.at_strength(1.0)


def fuse_stack(
    model, clip, stack: ConceptStack, settings: FusionSettings, progress: Progress | None = None
) -> FusionRun:
    """Fuse every concept of ``stack`` into weight differences for ``model`` / ``clip`` (inputs untouched)."""
    import comfy.model_management

    if settings.solver not in SOLVERS:
        raise FusionError(f"solver is {settings.solver!r}; choose one of {', '.join(SOLVERS)}")
    stack = fusion_strengths(stack, settings.strengths)
    family = check_stack(stack, model, clip)
    items = [concept_patches(model, clip, c) for c in stack]
    unet_shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    clip_shapes = {k: tuple(v.shape) for k, v in clip.patcher.model.state_dict().items()}
    _check_keys(items, unet_shapes, clip_shapes)
    save_dtype = SAVE_DTYPES[settings.save_dtype]
    device = comfy.model_management.get_torch_device()

    text_keys = sorted({k for it in items for k in it.clip})
    kv_keys = sorted({k for it in items for k in it.unet if _ATTN2_KV.search(k)})
    unet_keys = sorted({k for it in items for k in it.unet if not _ATTN2_KV.search(k)})
    n = len(items)
    total = n * settings.steps * (1 if unet_keys else 0) + len(text_keys) + len(kv_keys) + len(unet_keys) + 2 * n
    done = [0]

    def tick(text: str):
        done[0] += 1
        if progress is not None:
            progress(done[0], total, text)

    seconds: dict[str, float] = {}
    solve_seconds = 0.0
    reports: list[LayerReport] = []
    clip_source = WeightSource(clip.patcher, device)
    unet_source = WeightSource(model, device)

    # 1. text encoder
    start = time.perf_counter()
    clip_diffs: dict = {}
    if text_keys:
        moments = []
        for it in items:
            moments.append(record_text_encoder(clip, it, text_keys, settings.templates))
            tick(f"text encoder: recorded {it.concept.name}")
        clip_diffs, rep, s = _solve_layers(clip_source, text_keys, items, "clip", moments, settings, "text encoder",
                                           settings.text_iters, "", save_dtype, tick)  # fmt: skip
        reports += rep
        solve_seconds += s
    else:
        done[0] += n
    seconds["text encoder"] = time.perf_counter() - start

    edlora = [c for c in stack if c.kind == "edlora"]
    fused_clip = concept_clip(clip, edlora, [])
    if clip_diffs:
        fused_clip.add_patches({k: ("diff", (v,)) for k, v in clip_diffs.items()}, 1.0)

    # 2. cross-attention keys and values
    start = time.perf_counter()
    kv_diffs: dict = {}
    if kv_keys:
        paths = cross_attention_paths(model.model.diffusion_model)
        moments = []
        for it in items:
            moments.append(record_context(fused_clip, it.concept, paths, settings.templates))
            tick(f"cross-attention: recorded {it.concept.name}")
        kv_diffs, rep, s = _solve_layers(unet_source, kv_keys, items, "unet", moments, settings, "cross-attention k/v",
                                         settings.text_iters, "diffusion_model.", save_dtype, tick)  # fmt: skip
        reports += rep
        solve_seconds += s
    else:
        done[0] += n
    seconds["cross-attention k/v"] = time.perf_counter() - start

    # 3. the other UNet layers, from sampling runs with the fused keys/values
    start = time.perf_counter()
    unet_diffs: dict = {}
    if unet_keys:
        kv_patch = {k: ("diff", (v,)) for k, v in kv_diffs.items()}
        moments = []
        for it in items:
            base_done = done[0]

            def on_step(step, base_done=base_done, name=it.concept.name):
                done[0] = base_done + step
                if progress is not None:
                    progress(done[0], total, f"UNet: sampling {name}, step {step}/{settings.steps}")

            acc = record_unet(model, fused_clip, it, unet_keys, kv_patch, settings, on_step)
            moments.append({g: a.to("cpu") for g, a in acc.items()})
            done[0] = base_done + settings.steps
        unet_diffs, rep, s = _solve_layers(unet_source, unet_keys, items, "unet", moments, settings, "UNet",
                                           settings.unet_iters, "diffusion_model.", save_dtype, tick)  # fmt: skip
        reports += rep
        solve_seconds += s
    seconds["UNet"] = time.perf_counter() - start

    fusion_id = uuid.uuid4().hex[:12]
    concepts = tuple(
        FusedConceptInfo(
            kind=c.kind,
            source=c.source,
            words=tuple(c.words),
            class_word=c.class_word,
            label=c.label,
            strength_unet=c.strength_unet,
            strength_text=c.strength_text,
            embeddings=dict(c.adapter.embeddings) if c.kind == "edlora" else {},
        )  # fmt: skip
        for c in stack
    )
    fused = FusedConcepts(
        fusion_id=fusion_id,
        base_model=family,
        unet={**kv_diffs, **unet_diffs},
        clip=clip_diffs,
        concepts=concepts,
        solver=settings.solver,
        residuals=[r.as_dict() for r in reports],
        base_fingerprint=_fingerprint(unet_source, list(kv_diffs) + list(unet_diffs)),
    )
    return FusionRun(fused=fused, reports=reports, seconds=seconds, solve_seconds=solve_seconds)


# ------------------------------------------------------------------------------------------- applying


def fused_stack(fused: FusedConcepts) -> ConceptStack:
    """The stack a fused MODEL/CLIP go with: every concept's words and label, its LoRA marked as fused."""
    from ...formats.edlora import EDLoRAWeights

    stack = ConceptStack()
    for info in fused.concepts:
        adapter = None
        if info.kind == "edlora":
            adapter = EDLoRAWeights(words=info.words, embeddings=info.embeddings, text_encoder_lora={}, unet_lora={},
                                    base_model=fused.base_model, class_word=info.class_word)  # fmt: skip
        stack = stack.with_concept(
            Concept(
                uid="",
                kind=info.kind,
                source=info.source,
                words=info.words,
                class_word=info.class_word,
                label=info.label,
                strength_unet=info.strength_unet,
                strength_text=info.strength_text,
                adapter=adapter,
                fused=fused.fusion_id,
            )  # fmt: skip
        )
    return stack


def apply_fused(model, clip, fused: FusedConcepts):
    """``(model, clip, stack)``: clones carrying the fused weights and every concept's words."""
    family = model_family(model)
    if family != fused.base_model:
        have = FAMILIES[family].name if family else "neither SD1.5 nor SDXL"
        raise FusionError(f"these concepts were fused on an {FAMILIES[fused.base_model].name} checkpoint but the "
                          f"MODEL is {have}: load {FAMILIES[fused.base_model].checkpoints}.")  # fmt: skip
    unet_sd = model.model.state_dict()
    clip_sd = clip.patcher.model.state_dict()
    for key, t in fused.unet.items():
        if key not in unet_sd or unet_sd[key][0].numel() != t[0].numel() or unet_sd[key].shape[0] != t.shape[0]:
            raise FusionError(
                f"fused layer {key} does not fit this MODEL: use the checkpoint the concepts were fused on"
            )
    for key, t in fused.clip.items():
        if key not in clip_sd or clip_sd[key].shape[0] != t.shape[0]:
            raise FusionError(f"fused text-encoder layer {key} does not fit this CLIP: use the checkpoint's CLIP")
    stack = fused_stack(fused)
    vocab = concept_vocabulary_of(clip)
    for c in stack:
        if c.kind == "edlora":
            clash = [w for w in c.words if vocab.owner_of(w) is not None]
            if clash:
                raise FusionError(f"the CLIP already knows {' '.join(clash)} (from an ED-LoRA Loader?); connect the "
                                  "checkpoint's CLIP.")  # fmt: skip
            entry = ConceptEntry(uid=f"fused-{fused.fusion_id}:{c.uid}", words=c.words, embeddings=c.adapter.embeddings,
                                 source=c.source)  # fmt: skip
            vocab = vocab.with_entry(entry)
    new_clip = with_vocabulary(clip, vocab) if vocab.entries else clip.clone()
    if fused.clip:
        new_clip.add_patches({k: ("diff", (t.reshape(clip_sd[k].shape),)) for k, t in fused.clip.items()}, 1.0)
    new_model = model.clone()
    if fused.unet:
        new_model.add_patches({k: ("diff", (t.reshape(unet_sd[k].shape),)) for k, t in fused.unet.items()}, 1.0)
    add_layerwise_routing(new_model)
    options = new_model.model_options.setdefault("transformer_options", {})
    options[FUSED_KEY] = tuple(options.get(FUSED_KEY, ())) + (fused.fusion_id,)
    return new_model, new_clip, stack


def base_mismatch(model, fused: FusedConcepts) -> list[str]:
    """Keys whose base weights differ from those the fusion was computed on (another checkpoint)."""
    source = WeightSource(model, torch.device("cpu"))
    out = []
    for key, value in fused.base_fingerprint.items():
        if key not in source.key_patches:
            out.append(key)
            continue
        now = float(source.base(key).double().sum())
        if abs(now - value) > 1e-3 * max(1.0, abs(value)):
            out.append(key)
    return out
