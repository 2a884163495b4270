"""Applying an ED-LoRA to ComfyUI's MODEL and CLIP (the ComfyUI glue).

* LoRA: the file's diffusers module names are mapped onto ComfyUI's weight keys and added as ordinary
  weight patches on clones (``ModelPatcher.add_patches``), so ComfyUI merges ``strength * up @ down``
  exactly as for any LoRA and drops it with the clone.
* Layer-wise context: an ``OUTER_SAMPLE`` wrapper collects, once per sampling run, the per-layer
  encodings that our text encoder attached to the conditionings, keyed by ComfyUI's per-cond uuid; an
  ``attn2_patch`` then gives cross-attention layer ``i`` the layer-``i`` encoding for exactly the batch
  rows of those conds. Negative prompts and prompts without concept words are left untouched.
  Layer ``i`` is the ``i``-th cross-attention in the UNet's forward order (input blocks, middle, output
  blocks, and the transformer blocks of each spatial transformer in turn), as ED-LoRAs number their tokens.

Both families are handled: SD1.5 ED-LoRAs (Mix-of-Show: 16 layer tokens, CLIP-L) and SDXL ED-LoRAs
(Concept Conductor's trainer: 70 layer tokens, CLIP-L and CLIP-G embeddings and LoRA on both encoders).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...formats.edlora import EDLoRAFileError, EDLoRAWeights
from .clip import LAYERWISE_KEY, concept_vocabulary_of, with_vocabulary
from .layerwise import LayerwiseTable, cross_attention_order, layer_index, route_layer_context
from .vocabulary import ConceptEntry, EDLoRAConcept

log = logging.getLogger("multiconcept")

ROUTING_KEY = "multiconcept.layerwise"
TABLE_KEY = "multiconcept_layerwise_table"
MERGED_KEY = "multiconcept_merged_concepts"  # uids of ED-LoRA concepts whose UNet LoRA this MODEL has merged
FUSED_KEY = "multiconcept_fused"  # ids of the concept fusions whose weights this MODEL carries (Fuse Concepts)
SD15_CROSS_ATTENTION_LAYERS = 16


@dataclass(frozen=True)
class Family:
    """What an ED-LoRA of one base-model family needs from the MODEL and CLIP."""

    name: str  # as users say it
    layers: int  # cross-attention layers of the UNet = layer tokens per concept word
    context_width: int  # width of the text context the cross-attention reads
    clip_keys: tuple[str, ...]  # ComfyUI's text encoder keys (tokenize(...).keys())
    checkpoints: str  # the fix: which checkpoints to load


FAMILIES = {
    "sd15": Family(
        name="SD1.5",
        layers=SD15_CROSS_ATTENTION_LAYERS,
        context_width=768,
        clip_keys=("l",),
        checkpoints="an SD1.5-family checkpoint (SD1.5, or a fine-tune such as ChilloutMix or Anything v4)",
    ),
    "sdxl": Family(
        name="SDXL",
        layers=70,
        context_width=2048,
        clip_keys=("g", "l"),
        checkpoints="an SDXL base checkpoint (SDXL 1.0 base or a fine-tune of it; not the refiner)",
    ),
}


class EDLoRAApplyError(ValueError):
    """The ED-LoRA does not fit the given MODEL/CLIP; the message names the fix."""


# ------------------------------------------------------------------------------------- compatibility


def cross_attention_layers(model_patcher) -> list[tuple[str, int]]:
    """``(module name, context width)`` of every cross-attention (attn2) layer of the diffusion model."""
    out = []
    diffusion_model = model_patcher.model.diffusion_model
    for name, module in diffusion_model.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            out.append((name, int(module.to_k.weight.shape[1])))
    return out


def model_family(model_patcher) -> str | None:
    """``"sd15"`` / ``"sdxl"`` when the MODEL has that family's cross-attention shape, else None."""
    layers = cross_attention_layers(model_patcher)
    widths = {w for _, w in layers}
    for key, family in FAMILIES.items():
        if len(layers) == family.layers and widths == {family.context_width}:
            return key
    return None


def check_compatible(model_patcher, clip, weights: EDLoRAWeights, source: str) -> None:
    """Refuse, naming the fix, an ED-LoRA whose family (SD1.5 / SDXL) the MODEL or CLIP does not have."""
    family = FAMILIES.get(weights.base_model)
    if family is None:
        raise EDLoRAApplyError(f"{source}: unknown ED-LoRA base model {weights.base_model!r} (expected SD1.5 or SDXL)")
    n = weights.layer_tokens
    what = f"{source} is an {family.name} ED-LoRA ({n} layer token{'' if n == 1 else 's'} per word"
    what += ", two text encoders)" if len(family.clip_keys) > 1 else ")"
    if n not in (1, family.layers):
        raise EDLoRAApplyError(
            f"{what}, but {family.name} ED-LoRAs have {family.layers} layer tokens per word (one per "
            "cross-attention layer), or 1: the file is not an ED-LoRA this pack can route."
        )

    layers = cross_attention_layers(model_patcher)
    widths = sorted({w for _, w in layers})
    model_name = type(model_patcher.model.model_config).__name__
    if len(layers) != family.layers or widths != [family.context_width]:
        found = model_family(model_patcher)
        hint = (
            f" (the MODEL is {FAMILIES[found].name}: use an ED-LoRA trained for {FAMILIES[found].name} instead)"
            if found
            else ""
        )
        raise EDLoRAApplyError(
            f"{what}, but the MODEL ({model_name}, {len(layers)} cross-attention layers, context width {widths}) is "
            f"not {family.name}-shaped ({family.layers} layers, width {family.context_width}). Load "
            f"{family.checkpoints} for this ED-LoRA{hint}."
        )
    clip_keys = tuple(sorted(clip.tokenize("a").keys()))
    if clip_keys != family.clip_keys or tuple(sorted(weights.clip_keys)) != family.clip_keys:
        raise EDLoRAApplyError(
            f"{what}; it has token embeddings for text encoder(s) {list(weights.clip_keys)}, but this CLIP has "
            f"{list(clip_keys)}: it is not an {family.name} CLIP (that has {list(family.clip_keys)}). Use the CLIP "
            f"of the {family.name} checkpoint the MODEL came from."
        )


# ------------------------------------------------------------------------------------------ LoRA maps


def _patches(lora_pairs: dict, key_for, target_sd: dict, where: str, source: str) -> dict:
    """ComfyUI weight patches for ``lora_pairs`` (module -> LoRAPair), checking every module maps."""
    import comfy.lora

    lora_sd, to_load = {}, {}
    for module, pair in lora_pairs.items():
        target = key_for(module)
        if target is None or target not in target_sd:
            raise EDLoRAApplyError(
                f"{source}: the {where} module '{module}' has no counterpart in this model, so the file was "
                "trained for a different architecture. Use the MODEL and CLIP of the family it was trained for "
                "(SD1.5 or SDXL)."
            )
        expected = tuple(target_sd[target].shape)
        delta_shape = (pair.up.shape[0], pair.down.reshape(pair.down.shape[0], -1).shape[1])
        flat = (expected[0], int(target_sd[target][0].numel()))
        if delta_shape != flat:
            raise EDLoRAApplyError(
                f"{source}: the {where} LoRA for '{module}' is {list(delta_shape)} but the model weight is "
                f"{list(expected)}: the file was trained for a different architecture."
            )
        name = f"mc_{len(to_load)}"
        lora_sd[f"{name}.lora_up.weight"] = pair.up
        lora_sd[f"{name}.lora_down.weight"] = pair.down
        to_load[name] = target
    patches = comfy.lora.load_lora(lora_sd, to_load, log_missing=False)
    if len(patches) != len(to_load):
        raise EDLoRAApplyError(f"{source}: only {len(patches)} of {len(to_load)} {where} LoRA modules could be read")
    return patches


def unet_patches(model_patcher, weights: EDLoRAWeights, source: str) -> dict:
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})

    def key_for(module: str):
        return key_map.get("lora_unet_" + module.replace(".", "_"))

    target_sd = model_patcher.model.state_dict()
    return _patches(weights.unet_lora, key_for, target_sd, "UNet", source)


# The file's text-encoder LoRA groups and the ComfyUI text encoder (clip key) each one belongs to.
TEXT_ENCODER_GROUPS = {"text_encoder": "l", "text_encoder_2": "g"}
_TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"


def text_encoder_prefixes(clip) -> dict[str, str]:
    """``{clip key: state-dict prefix}`` of the CLIP's text encoders, e.g. ``{"l": "clip_l.transformer."}``.

    ComfyUI's SD1.5 CLIP holds ``clip_l``, its SDXL CLIP ``clip_l`` and ``clip_g``; a CLIP with a single text
    model under another name counts as ``l``.
    """
    return _prefixes_in(clip.patcher.model.state_dict())


def _prefixes_in(state: dict) -> dict[str, str]:
    prefixes = [k[: -len(_TOKEN_EMBEDDING)] for k in state if k.endswith(_TOKEN_EMBEDDING)]
    out = {}
    for prefix in prefixes:
        head = prefix.split(".", 1)[0]
        if head.startswith("clip_") and len(head) > len("clip_"):
            out.setdefault(head[len("clip_") :], prefix)
    if not out and len(prefixes) == 1:
        out["l"] = prefixes[0]
    return out


def text_encoder_patches(clip, weights: EDLoRAWeights, source: str) -> dict:
    """ComfyUI weight patches for the file's text-encoder LoRA: ``text_encoder`` -> CLIP-L, ``text_encoder_2`` -> CLIP-G."""
    groups = {g: pairs for g, pairs in weights.text_encoder_lora.items() if pairs}
    if not groups:
        return {}
    target_sd = clip.patcher.model.state_dict()
    prefixes = _prefixes_in(target_sd)
    patches = {}
    for group, pairs in groups.items():
        clip_key = TEXT_ENCODER_GROUPS.get(group)
        prefix = prefixes.get(clip_key)
        if prefix is None:
            raise EDLoRAApplyError(
                f"{source} has a LoRA for '{group}' (CLIP-{(clip_key or '?').upper()}), but this CLIP's text encoders are "
                f"{['CLIP-' + k.upper() for k in sorted(prefixes)]}. Use the CLIP of the checkpoint the ED-LoRA was "
                "trained for."
            )

        def key_for(module: str, prefix=prefix):
            return f"{prefix}{module}.weight"

        patches.update(_patches(pairs, key_for, target_sd, f"text-encoder ({group})", source))
    return patches


# ---------------------------------------------------------------------------------- layer routing


def collect_layerwise_contexts(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: hand this run's per-layer contexts to the attention patch."""
    guider = executor.class_obj
    conds = getattr(guider, "conds", None) or {}
    by_uuid = {}
    ignored = 0
    for cond_list in conds.values():
        for c in cond_list:
            lw = c.get(LAYERWISE_KEY)
            if lw is None or "uuid" not in c:
                continue
            layers = lw.aligned_to(c.get("cross_attn"))
            if layers is None:
                ignored += 1
                continue
            by_uuid[c["uuid"]] = layers
    if ignored:
        log.warning(
            "[multi-concept] %d conditioning(s) were changed after encoding (e.g. averaged or zeroed); their "
            "concept words use the layer-averaged embedding instead of one embedding per layer.",
            ignored,
        )
    if by_uuid and isinstance(getattr(guider, "model_options", None), dict):
        # guider.model_options is this run's own copy (CFGGuider.sample clones it before OUTER_SAMPLE).
        options = guider.model_options
        options["transformer_options"] = {**options.get("transformer_options", {}), TABLE_KEY: LayerwiseTable(by_uuid)}
    return executor(*args, **kwargs)


class LayerwiseContextPatch:
    """attn2_patch: cross-attention layer i reads layer i's context in the rows of concept prompts.

    ``order`` maps ComfyUI's ``(block, number, block_index)`` to the layer's index in the UNet (see
    :func:`~.layerwise.cross_attention_order`); without it the layer is ComfyUI's ``transformer_index``,
    which is the layer index on SD1.5 only (SDXL's spatial transformers hold 2 or 10 blocks each).
    """

    def __init__(self, order: dict | None = None):
        self.order = dict(order) if order else None

    def __call__(self, n, context, value, extra_options):
        table = extra_options.get(TABLE_KEY)
        uuids = extra_options.get("uuids")
        if not table or not uuids or context is None:
            return n, context, value
        layer = layer_index(extra_options, self.order)
        chunks = table.chunk_layers(uuids, context.device, context.dtype)
        new_context = route_layer_context(context, chunks, layer)
        if new_context is context:
            return n, context, value
        if value is context:
            return n, new_context, new_context
        if value is not None and value.shape == context.shape:
            value = route_layer_context(value, chunks, layer)
        return n, new_context, value


def has_layerwise_routing(model_patcher) -> bool:
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    return any(type(p).__name__ == LayerwiseContextPatch.__name__ for p in patches)


def add_layerwise_routing(model_patcher) -> None:
    """Install the routing on a clone, once however many ED-LoRA loaders are chained."""
    import comfy.patcher_extension

    if not model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ROUTING_KEY):
        model_patcher.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ROUTING_KEY, collect_layerwise_contexts
        )
    if not has_layerwise_routing(model_patcher):
        order = cross_attention_order(model_patcher.model.diffusion_model)
        model_patcher.set_model_attn2_patch(LayerwiseContextPatch(order))


# ------------------------------------------------------------------------------------------- loader


def apply_edlora(
    model,
    clip,
    weights: EDLoRAWeights,
    source: str,
    strength_unet: float,
    strength_text: float,
    words: tuple[str, ...] | None = None,
    class_word: str = "",
):
    """Return ``(model, clip, concept)``: clones carrying the concept; the inputs are never modified."""
    check_compatible(model, clip, weights, source)
    if words:
        try:
            weights = weights.with_words(words)
        except EDLoRAFileError as e:
            raise EDLoRAApplyError(str(e)) from None
    vocab = concept_vocabulary_of(clip)
    free = vocab.free_words(weights.words)
    renamed_from: tuple[str, ...] = ()
    if free != weights.words:
        renamed_from = weights.words
        log.warning(
            "[multi-concept] %s: concept words %s are already used by another concept in this CLIP; "
            "use %s in prompts for this one.",
            source,
            " ".join(weights.words),
            " ".join(free),
        )
        weights = weights.with_words(free)

    # Build every patch first: a failure must leave nothing half-applied.
    unet = unet_patches(model, weights, source) if strength_unet != 0 else {}
    text = text_encoder_patches(clip, weights, source) if strength_text != 0 else {}

    entry = ConceptEntry(uid=vocab.new_uid(source), words=weights.words, embeddings=weights.embeddings, source=source)
    new_clip = with_vocabulary(clip, vocab.with_entry(entry))
    if text:
        new_clip.add_patches(text, strength_text)
    new_model = model.clone()
    if unet:
        new_model.add_patches(unet, strength_unet)
    add_layerwise_routing(new_model)

    concept = EDLoRAConcept(
        uid=entry.uid,
        words=weights.words,
        class_word=class_word or weights.class_word,
        file=source,
        base_model=weights.base_model,
        layer_tokens=weights.layer_tokens,
        strength_unet=float(strength_unet),
        strength_text=float(strength_text),
        renamed_from=renamed_from,
        weights=weights,
    )
    if unet:  # remembered so that method nodes can refuse to scope a concept that is already merged
        options = new_model.model_options.setdefault("transformer_options", {})
        options[MERGED_KEY] = tuple(options.get(MERGED_KEY, ())) + (entry.uid,)
    return new_model, new_clip, concept


__all__ = [
    "EDLoRAApplyError",
    "LayerwiseContextPatch",
    "add_layerwise_routing",
    "apply_edlora",
    "collect_layerwise_contexts",
]
