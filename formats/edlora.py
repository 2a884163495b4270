"""ED-LoRA files: reading the official Mix-of-Show ``.pth``, reading and writing our ``.safetensors``.

Pure torch + safetensors; no ComfyUI imports, so the format is unit-tested and usable from the CLI.

Official layout (Mix-of-Show ``save_lora``), optionally wrapped in ``{"params": ...}``::

    new_concept_embedding: {word: Tensor[L, 768]}      # L = 16 layer tokens (1 for plain textual inversion)
    text_encoder:          {"<module>.lora_down.weight": ..., "<module>.lora_up.weight": ...}
    unet:                  {"<module>.lora_down.weight": ..., "<module>.lora_up.weight": ...}

Module names are diffusers names (``text_model.encoder.layers.0.self_attn.q_proj``,
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``). The LoRA delta is
``alpha * up @ down`` with no division by rank.

The SDXL variant (Concept Conductor's trainer) adds ``new_concept_embedding_2`` ([70, 1280] per word)
and ``text_encoder_2``; we recognise it so we can refuse it clearly on SD1.5 models.

Our safetensors layout flattens the same tree with a dot after the group name::

    new_concept_embedding.<word>        Tensor[L, 768]
    new_concept_embedding_2.<word>      Tensor[L, 1280]           (SDXL only)
    text_encoder.<module>.lora_{down,up}.weight
    text_encoder_2.<module>.lora_{down,up}.weight                 (SDXL only)
    unet.<module>.lora_{down,up}.weight

with string metadata ``format = "multiconcept.edlora"``, ``format_version = "1"``, ``concept_words``
(JSON list, prompt order), ``class_word``, ``base_model`` (``sd15`` / ``sdxl``) and ``lora_scale``
(a reminder of the ``alpha * up @ down`` convention).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch

from .fused import FORMAT_NAME as FUSED_FORMAT
from .weights import CheckpointFileError, OutputExistsError, check_weight_tensor, read_tensor_file, write_safetensors

FORMAT_NAME = "multiconcept.edlora"
FORMAT_VERSION = "1"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

EMBEDDING_GROUPS = {"new_concept_embedding": "l", "new_concept_embedding_2": "g"}
LORA_GROUPS = ("text_encoder", "text_encoder_2", "unet")
# Width of each text encoder's token embeddings, by ComfyUI's clip key.
EMBEDDING_WIDTH = {"l": 768, "g": 1280}
# Layer tokens per concept word for each base model family.
LAYER_TOKENS = {"sd15": 16, "sdxl": 70}


class EDLoRAFileError(ValueError):
    """A file that is not a usable ED-LoRA; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class LoRAPair:
    """One low-rank update: ``delta = alpha * up @ down`` (conv 1x1 shapes allowed)."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """``up @ down`` in float32, shaped like the target weight (linear or 1x1 conv)."""
        up = self.up.float().reshape(self.up.shape[0], -1)
        down = self.down.float().reshape(self.down.shape[0], -1)
        out = up @ down
        if self.up.ndim == 4:
            out = out.reshape(out.shape[0], out.shape[1], 1, 1)
        return out


@dataclass(frozen=True)
class EDLoRAWeights:
    """Everything one ED-LoRA file holds, validated.

    ``embeddings[word][clip_key]`` is ``[L, width]``: row ``i`` is the token used by cross-attention
    layer ``i`` (``L == 1`` means one token for every layer).
    """

    words: tuple[str, ...]
    embeddings: dict[str, dict[str, torch.Tensor]]
    text_encoder_lora: dict[str, dict[str, LoRAPair]]  # group ("text_encoder"/"text_encoder_2") -> module -> pair
    unet_lora: dict[str, LoRAPair]
    base_model: str  # "sd15" or "sdxl"
    class_word: str = ""
    source_format: str = "safetensors"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layer_tokens(self) -> int:
        first = self.embeddings[self.words[0]]
        return int(next(iter(first.values())).shape[0])

    @property
    def clip_keys(self) -> tuple[str, ...]:
        return tuple(sorted(self.embeddings[self.words[0]].keys()))

    def with_words(self, new_words: tuple[str, ...] | list[str]) -> EDLoRAWeights:
        """The same concept under other prompt words (same order, same count)."""
        new_words = tuple(new_words)
        if len(new_words) != len(self.words):
            raise EDLoRAFileError(
                f"this ED-LoRA has {len(self.words)} concept word(s) ({' '.join(self.words)}); "
                f"{len(new_words)} replacement word(s) were given ({' '.join(new_words) or 'none'})"
            )
        validate_concept_words(new_words)
        embeddings = {new: self.embeddings[old] for old, new in zip(self.words, new_words, strict=True)}
        return replace(self, words=new_words, embeddings=embeddings)


def validate_concept_words(words) -> None:
    seen = set()
    for w in words:
        if not isinstance(w, str) or not w.strip() or w != w.strip() or any(c.isspace() for c in w):
            raise EDLoRAFileError(f"concept word {w!r} must be a single word without spaces, e.g. <cat1>")
        if w in seen:
            raise EDLoRAFileError(f"concept word {w} appears twice")
        seen.add(w)


# ---------------------------------------------------------------------------------------------- reading


def read_edlora(path: str | os.PathLike) -> EDLoRAWeights:
    """Read and validate an ED-LoRA file (official ``.pth`` or our ``.safetensors``)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        content, metadata, kind = read_tensor_file(path, what="ED-LoRA file")
    except CheckpointFileError as e:
        raise EDLoRAFileError(str(e)) from None
    if kind == "safetensors" and metadata.get("format") == FUSED_FORMAT:
        raise EDLoRAFileError(
            f"{name} is a fused multi-concept file (from Fuse Concepts), not a single ED-LoRA: load it with the "
            "'Load Fused Concepts' node"
        )
    if kind == "safetensors":
        tree: dict = {}
        for key, tensor in content.items():
            group, sep, rest = key.partition(".")
            if not sep:
                tree[group] = tensor
                continue
            tree.setdefault(group, {})[rest] = tensor
        return _weights_from_tree(tree, name, source_format="safetensors", metadata=metadata)
    return _weights_from_tree(content, name, source_format="mixofshow-pth", metadata={})


def _weights_from_tree(raw, name: str, source_format: str, metadata: dict[str, str]) -> EDLoRAWeights:
    if not isinstance(raw, dict):
        raise EDLoRAFileError(f"{name} is not an ED-LoRA: it holds a {type(raw).__name__}, not a dict of tensors")
    tree = raw["params"] if isinstance(raw.get("params"), dict) else raw

    if "new_concept_embedding" not in tree:
        hint = _what_is_it(tree)
        raise EDLoRAFileError(
            f"{name} is not an ED-LoRA (no 'new_concept_embedding' entry){hint}. "
            "For an ordinary LoRA use ComfyUI's 'Load LoRA' node; for ED-LoRA use a Mix-of-Show .pth "
            "or a .safetensors made by this pack."
        )

    embeddings = _read_embeddings(tree, name)
    words = _word_order(embeddings, metadata, name)
    base_model = _base_model(embeddings, name)

    te_lora = {}
    for group in ("text_encoder", "text_encoder_2"):
        if group in tree:
            te_lora[group] = _read_lora_group(tree[group], f"{name}: {group}")
    unet_lora = _read_lora_group(tree.get("unet", {}), f"{name}: unet")

    return EDLoRAWeights(
        words=words,
        embeddings={w: embeddings[w] for w in words},
        text_encoder_lora=te_lora,
        unet_lora=unet_lora,
        base_model=base_model,
        class_word=str(metadata.get("class_word", "") or ""),
        source_format=source_format,
        metadata=dict(metadata),
    )


def _what_is_it(tree: dict) -> str:
    keys = [k for k in tree.keys() if isinstance(k, str)]
    if any(
        k.startswith(("lora_unet_", "lora_te", "lora_down", "unet.", "text_encoder.")) or ".lora_" in k for k in keys
    ):
        return " — it looks like an ordinary LoRA"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return " — it looks like a full checkpoint"
    return ""


def _read_embeddings(tree: dict, name: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, clip_key in EMBEDDING_GROUPS.items():
        table = tree.get(group)
        if table is None:
            continue
        if not isinstance(table, dict) or not table:
            raise EDLoRAFileError(f"{name}: '{group}' must map concept words to tensors, found {type(table).__name__}")
        for word, emb in table.items():
            if not isinstance(emb, torch.Tensor) or not emb.is_floating_point():
                raise EDLoRAFileError(f"{name}: embedding of {word!r} is not a float tensor")
            if emb.ndim == 1:
                emb = emb[None]
            width = EMBEDDING_WIDTH[clip_key]
            if emb.ndim != 2 or emb.shape[1] != width:
                raise EDLoRAFileError(
                    f"{name}: embedding of {word!r} has shape {list(emb.shape)}; expected [layers, {width}] for '{group}'"
                )
            try:
                check_weight_tensor(emb, f"{name}: embedding of {word!r}")
            except CheckpointFileError as e:
                raise EDLoRAFileError(str(e)) from None
            out.setdefault(str(word), {})[clip_key] = emb.detach().float().contiguous()
    if not out:
        raise EDLoRAFileError(f"{name}: 'new_concept_embedding' is empty — the file names no concept words")
    validate_concept_words(list(out))
    key_sets = {tuple(sorted(v)) for v in out.values()}
    layer_counts = {int(t.shape[0]) for v in out.values() for t in v.values()}
    if len(key_sets) != 1 or len(layer_counts) != 1:
        raise EDLoRAFileError(
            f"{name}: concept words disagree in embedding tables or layer-token counts {sorted(layer_counts)}"
        )
    return out


def _word_order(embeddings: dict, metadata: dict[str, str], name: str) -> tuple[str, ...]:
    words = list(embeddings)
    listed = metadata.get("concept_words")
    if listed:
        try:
            order = json.loads(listed)
        except json.JSONDecodeError:
            raise EDLoRAFileError(f"{name}: metadata 'concept_words' is not a JSON list") from None
        if sorted(order) != sorted(words):
            raise EDLoRAFileError(
                f"{name}: metadata 'concept_words' {order} does not match the stored embeddings {words}"
            )
        return tuple(order)
    return tuple(words)  # official files: dict order is the training order (<name1>, <name2>)


def _base_model(embeddings: dict, name: str) -> str:
    sample = next(iter(embeddings.values()))
    layers = int(next(iter(sample.values())).shape[0])
    if "g" in sample or layers == LAYER_TOKENS["sdxl"]:
        return "sdxl"
    if layers not in (1, LAYER_TOKENS["sd15"]):
        raise EDLoRAFileError(
            f"{name}: each concept word has {layers} layer tokens; SD1.5 ED-LoRAs have 16 (or 1 for plain textual inversion)"
        )
    return "sd15"


def _read_lora_group(table, where: str) -> dict[str, LoRAPair]:
    if not isinstance(table, dict):
        raise EDLoRAFileError(f"{where} must be a dict of LoRA tensors, found {type(table).__name__}")
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, tensor in table.items():
        if key.endswith(".alpha"):
            continue  # a training-time buffer; inference uses the loader's strength instead
        if key.endswith(".lora_down.weight"):
            downs[key[: -len(".lora_down.weight")]] = tensor
        elif key.endswith(".lora_up.weight"):
            ups[key[: -len(".lora_up.weight")]] = tensor
        else:
            raise EDLoRAFileError(
                f"{where}: unexpected key {key!r} (expected <module>.lora_down.weight / .lora_up.weight)"
            )
    if set(downs) != set(ups):
        missing = sorted(set(downs) ^ set(ups))[:3]
        raise EDLoRAFileError(f"{where}: LoRA halves without a partner (truncated file?): {missing}")
    pairs = {}
    for module in sorted(downs):
        up, down = ups[module], downs[module]
        for half, t in (("lora_up", up), ("lora_down", down)):
            try:
                check_weight_tensor(t, f"{where}: {module}.{half}")
            except CheckpointFileError as e:
                raise EDLoRAFileError(str(e)) from None
        if up.ndim not in (2, 4) or down.ndim != up.ndim or up.shape[1] != down.shape[0]:
            raise EDLoRAFileError(
                f"{where}: {module} has mismatched LoRA shapes up {list(up.shape)} / down {list(down.shape)}"
            )
        if up.ndim == 4 and (up.shape[2:] != (1, 1) or down.shape[2:] != (1, 1)):
            raise EDLoRAFileError(f"{where}: {module} is a conv LoRA with a kernel other than 1x1")
        pairs[module] = LoRAPair(up=up.detach().contiguous(), down=down.detach().contiguous())
    return pairs


# ---------------------------------------------------------------------------------------------- writing


def to_safetensors_dict(weights: EDLoRAWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten to our documented safetensors layout (keys + string metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    group_of = {v: k for k, v in EMBEDDING_GROUPS.items()}
    for word in weights.words:
        for clip_key, emb in weights.embeddings[word].items():
            tensors[f"{group_of[clip_key]}.{word}"] = emb.contiguous()
    for group, pairs in weights.text_encoder_lora.items():
        for module, pair in pairs.items():
            tensors[f"{group}.{module}.lora_down.weight"] = pair.down.contiguous()
            tensors[f"{group}.{module}.lora_up.weight"] = pair.up.contiguous()
    for module, pair in weights.unet_lora.items():
        tensors[f"unet.{module}.lora_down.weight"] = pair.down.contiguous()
        tensors[f"unet.{module}.lora_up.weight"] = pair.up.contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "concept_words": json.dumps(list(weights.words)),
        "class_word": weights.class_word,
        "base_model": weights.base_model,
        "layer_tokens": str(weights.layer_tokens),
        "lora_scale": "delta = alpha * up @ down (no division by rank); alpha is the loader strength",
    }
    return tensors, metadata


def write_edlora_safetensors(weights: EDLoRAWeights, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``weights`` to ``path`` in our layout. Never replaces an existing file unless asked."""
    tensors, metadata = to_safetensors_dict(weights)
    try:  # whole or not at all, never through a link planted at the name
        return write_safetensors(path, tensors, metadata, overwrite=overwrite)
    except OutputExistsError:
        raise EDLoRAFileError(
            f"{os.fspath(path)} already exists; choose another name (existing files are never overwritten)"
        ) from None


def default_safetensors_name(source_path: str | os.PathLike) -> str:
    base = os.path.splitext(os.path.basename(os.fspath(source_path)))[0]
    return base + ".safetensors"
