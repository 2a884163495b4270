"""Applying an ED-LoRA to ComfyUI's MODEL and CLIP (the ComfyUI glue).

* LoRA: the file's diffusers module names are mapped onto ComfyUI's weight keys and added as ordinary
  weight patches on clones (``ModelPatcher.add_patches``), so ComfyUI merges ``strength * up @ down``
  exactly as for any LoRA and drops it with the clone.
* Layer-wise context: an ``OUTER_SAMPLE`` wrapper collects, once per sampling run, the per-layer
  encodings that our text encoder attached to the conditionings, keyed by ComfyUI's per-cond uuid; an
  ``attn2_patch`` then gives cross-attention layer ``i`` the layer-``i`` encoding for exactly the batch
  rows of those conds. Negative prompts and prompts without concept words are left untouched.
"""

from __future__ import annotations

import logging

from ...training.edlora_file import EDLoRAFileError, EDLoRAWeights
from .clip import LAYERWISE_KEY, concept_vocabulary_of, with_vocabulary
from .layerwise import LayerwiseTable, route_layer_context
from .vocabulary import ConceptEntry, EDLoRAConcept

log = logging.getLogger("multiconcept")

ROUTING_KEY = "multiconcept.layerwise"
TABLE_KEY = "multiconcept_layerwise_table"
MERGED_KEY = "multiconcept_merged_concepts"  # uids of ED-LoRA concepts whose UNet LoRA this MODEL has merged
SD15_CROSS_ATTENTION_LAYERS = 16


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


def check_compatible(model_patcher, clip, weights: EDLoRAWeights, source: str) -> None:
    if weights.base_model == "sdxl":
        raise EDLoRAApplyError(
            f"{source} is an SDXL ED-LoRA (70 layer tokens, two text encoders), but this pack applies "
            "SD1.5 ED-LoRAs only. Load an ED-LoRA trained on an SD1.5 model (16 layer tokens)."
        )
    layers = cross_attention_layers(model_patcher)
    widths = {w for _, w in layers}
    model_name = type(model_patcher.model.model_config).__name__
    if len(layers) != SD15_CROSS_ATTENTION_LAYERS or widths != {768}:
        raise EDLoRAApplyError(
            f"{source} is an SD1.5 ED-LoRA, but the MODEL ({model_name}, {len(layers)} cross-attention layers, "
            f"context width {sorted(widths)}) is not SD1.5-shaped (16 layers, width 768). "
            "Load an SD1.5-family checkpoint (SD1.5, its fine-tunes such as ChilloutMix or Anything v4)."
        )
    tokens = clip.tokenize("a")
    missing = [k for k in tokens.keys() if k not in weights.clip_keys]
    if missing:
        raise EDLoRAApplyError(
            f"{source} has token embeddings for text encoder(s) {list(weights.clip_keys)}, but this CLIP also has "
            f"{missing}: it is not an SD1.5 CLIP. Use the CLIP of the SD1.5 checkpoint the MODEL came from."
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
                "trained for a different architecture. Use an SD1.5-family MODEL/CLIP."
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


def text_encoder_patches(clip, weights: EDLoRAWeights, source: str) -> dict:
    pairs = weights.text_encoder_lora.get("text_encoder", {})
    if not pairs:
        return {}
    target_sd = clip.patcher.model.state_dict()
    prefixes = [
        k[: -len("text_model.embeddings.token_embedding.weight")]
        for k in target_sd
        if k.endswith("text_model.embeddings.token_embedding.weight")
    ]
    if len(prefixes) != 1:
        raise EDLoRAApplyError(f"{source}: expected one CLIP-L text encoder in this CLIP, found {len(prefixes)}")
    prefix = prefixes[0]

    def key_for(module: str):
        return f"{prefix}{module}.weight"

    return _patches(pairs, key_for, target_sd, "text-encoder", source)


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
    """attn2_patch: cross-attention layer i reads layer i's context in the rows of concept prompts."""

    def __call__(self, n, context, value, extra_options):
        table = extra_options.get(TABLE_KEY)
        uuids = extra_options.get("uuids")
        if not table or not uuids or context is None:
            return n, context, value
        chunks = table.chunk_layers(uuids, context.device, context.dtype)
        new_context = route_layer_context(context, chunks, extra_options.get("transformer_index"))
        if new_context is context:
            return n, context, value
        if value is context:
            return n, new_context, new_context
        if value is not None and value.shape == context.shape:
            value = route_layer_context(value, chunks, extra_options.get("transformer_index"))
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
        model_patcher.set_model_attn2_patch(LayerwiseContextPatch())


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
