"""The fused-concepts file: one ``.safetensors`` with the fused weights and every concept's words (pure torch).

Layout::

    unet.<ComfyUI weight key>            W_fused − W0 of a fused UNet layer     (e.g. unet.diffusion_model.…to_q.weight)
    clip.<ComfyUI CLIP weight key>       W_fused − W0 of a fused text-encoder layer
    embedding.<n>.<word>.<clip key>      concept n's layer-wise token embeddings [L, width] (ED-LoRA concepts)

String metadata: ``format = "multiconcept.fused"``, ``format_version = "1"``, ``fusion_id``, ``base_model``
(``sd15`` / ``sdxl``), ``concepts`` (JSON list: kind, source, words, class_word, label, strengths),
``solver``, ``residuals`` (JSON: per layer the relative errors, fused and plain sum) and ``base_fingerprint``
(sums of a few base weights, to notice a different checkpoint). The weights are differences to the base
checkpoint they were fused on, so the file is small next to a checkpoint and needs that base.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from .weights import CheckpointFileError, OutputExistsError, check_weight_tensor, read_tensor_file, write_safetensors

FORMAT_NAME = "multiconcept.fused"
FORMAT_VERSION = "1"
BASE_MODELS = ("sd15", "sdxl")  # the families Fuse Concepts writes


class FusedFileError(ValueError):
    """A file that is not a usable fused-concepts file; the message says what to do."""


@dataclass(frozen=True)
class FusedConceptInfo:
    kind: str  # "edlora" / "lora"
    source: str
    words: tuple[str, ...]
    class_word: str = ""
    label: str = ""
    strength_unet: float = 1.0
    strength_text: float = 1.0
    embeddings: dict = field(default_factory=dict, repr=False)  # word -> clip key -> [L, width] (ED-LoRA)

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "words": list(self.words),
            "class_word": self.class_word,
            "label": self.label,
            "strength_unet": self.strength_unet,
            "strength_text": self.strength_text,
        }


@dataclass(frozen=True)
class FusedConcepts:
    """Everything a fusion produced: weight differences (the dtype they are applied in) and the concepts."""

    fusion_id: str
    base_model: str
    unet: dict  # ComfyUI weight key -> W_fused − W0
    clip: dict  # ComfyUI CLIP weight key -> W_fused − W0
    concepts: tuple[FusedConceptInfo, ...]
    solver: str = ""
    residuals: list = field(default_factory=list)  # [{"layer", "stage", "fused": [...], "sum": [...]}]
    base_fingerprint: dict = field(default_factory=dict)  # weight key -> float sum of W0


def to_safetensors_dict(fused: FusedConcepts) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for key, t in fused.unet.items():
        tensors[f"unet.{key}"] = t.detach().cpu().contiguous()
    for key, t in fused.clip.items():
        tensors[f"clip.{key}"] = t.detach().cpu().contiguous()
    for n, c in enumerate(fused.concepts):
        for word, per_key in c.embeddings.items():
            for clip_key, t in per_key.items():
                tensors[f"embedding.{n}.{word}.{clip_key}"] = t.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fusion_id": fused.fusion_id,
        "base_model": fused.base_model,
        "concepts": json.dumps([c.meta() for c in fused.concepts]),
        "solver": fused.solver,
        "residuals": json.dumps(fused.residuals),
        "base_fingerprint": json.dumps(fused.base_fingerprint),
    }
    return tensors, metadata


def write_fused(fused: FusedConcepts, path: str | os.PathLike) -> str:
    """Write ``fused`` to ``path`` (never over an existing file; complete or not at all)."""
    tensors, metadata = to_safetensors_dict(fused)
    try:  # whole or not at all, never through a link planted at the name
        return write_safetensors(path, tensors, metadata)
    except OutputExistsError:
        raise FusedFileError(f"{os.fspath(path)} already exists; existing files are never overwritten") from None


def is_fused_metadata(metadata: dict | None) -> bool:
    return bool(metadata) and metadata.get("format") == FORMAT_NAME


def read_fused(path: str | os.PathLike) -> FusedConcepts:
    """Read a fused-concepts file; FusedFileError when it is something else or damaged."""
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        tensors, metadata, kind = read_tensor_file(path, what="fused-concepts file")
    except CheckpointFileError as e:
        raise FusedFileError(str(e)) from None
    if kind != "safetensors" or not is_fused_metadata(metadata):
        raise FusedFileError(
            f"{name} is not a fused-concepts file (it has no '{FORMAT_NAME}' format tag). Load ED-LoRAs with the "
            "ED-LoRA Loader or a Concept Stack node, and LoRAs with a LoRA loader; fused files come from Fuse Concepts."
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise FusedFileError(f"{name} has format version {metadata.get('format_version')!r}; this pack reads 1")
    base_model = str(metadata.get("base_model", ""))
    if base_model not in BASE_MODELS:
        raise FusedFileError(
            f"{name}: its base_model is {base_model!r}, not one of {', '.join(BASE_MODELS)}; the file is damaged or "
            "from another tool. Fuse the concepts again with Fuse Concepts."
        )
    try:
        concepts_meta = json.loads(metadata.get("concepts", "[]"))
        residuals = json.loads(metadata.get("residuals", "[]"))
        fingerprint = json.loads(metadata.get("base_fingerprint", "{}"))
    except json.JSONDecodeError:
        raise FusedFileError(f"{name}: its metadata is not valid JSON; the file is damaged") from None
    if not isinstance(concepts_meta, list) or not all(isinstance(m, dict) for m in concepts_meta):
        raise FusedFileError(
            f"{name}: its 'concepts' metadata is a {type(concepts_meta).__name__}, not a list of concepts; the file "
            "is damaged. Fuse the concepts again."
        )
    if not isinstance(residuals, list) or not isinstance(fingerprint, dict):
        raise FusedFileError(
            f"{name}: its 'residuals' / 'base_fingerprint' metadata has the wrong shape; the file is damaged"
        )
    unet, clip, emb = {}, {}, {}
    for key, t in tensors.items():
        # weight differences and embeddings: finite floats of a trained weight's magnitude (a 1e30 difference
        # would give a black picture), with the rank their use needs
        try:
            check_weight_tensor(t, f"{name}: {key}")
        except CheckpointFileError as e:
            raise FusedFileError(f"{e}; fuse the concepts again") from None
        if key.startswith("embedding.") and t.ndim != 2:
            raise FusedFileError(f"{name}: {key} has shape {list(t.shape)}, not [layers, width]; the file is damaged")
        if t.ndim < 1:
            raise FusedFileError(f"{name}: {key} is a single number, not a weight difference; the file is damaged")
        if key.startswith("unet."):
            unet[key[len("unet.") :]] = t
        elif key.startswith("clip."):
            clip[key[len("clip.") :]] = t
        elif key.startswith("embedding."):
            rest = key[len("embedding.") :]
            n, _, tail = rest.partition(".")
            word, _, clip_key = tail.rpartition(".")
            if not n.isdigit() or not word or not clip_key:
                raise FusedFileError(f"{name}: unexpected entry {key!r}")
            emb.setdefault(int(n), {}).setdefault(word, {})[clip_key] = t
        else:
            raise FusedFileError(f"{name}: unexpected entry {key!r}")
    try:
        concepts = [_concept_info(n, m, emb.get(n, {}), name) for n, m in enumerate(concepts_meta)]
    except (TypeError, ValueError) as e:
        if isinstance(e, FusedFileError):
            raise
        raise FusedFileError(f"{name}: its 'concepts' metadata is damaged ({e}); fuse the concepts again") from None
    if not concepts:
        raise FusedFileError(f"{name} lists no concepts")
    return FusedConcepts(
        fusion_id=str(metadata.get("fusion_id", "")),
        base_model=base_model,
        unet=unet,
        clip=clip,
        concepts=tuple(concepts),
        solver=str(metadata.get("solver", "")),
        residuals=residuals,
        base_fingerprint=fingerprint,
    )


def _concept_info(n: int, m: dict, embeddings: dict, name: str) -> FusedConceptInfo:
    """Concept ``n`` of the metadata list, with its stored embeddings."""
    words = m.get("words", ())
    if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
        raise FusedFileError(f"{name}: concept {n + 1}'s words are {words!r}, not a list of words; the file is damaged")
    words = tuple(words)
    if m.get("kind") == "edlora" and set(embeddings) != set(words):
        raise FusedFileError(
            f"{name}: concept {n + 1} lists words {words} but stores embeddings for {sorted(embeddings)}"
        )
    strengths = float(m.get("strength_unet", 1.0)), float(m.get("strength_text", 1.0))
    if not all(math.isfinite(v) for v in strengths):
        raise FusedFileError(f"{name}: concept {n + 1}'s strengths are {strengths}, not numbers; the file is damaged")
    return FusedConceptInfo(
        kind=str(m.get("kind", "")),
        source=str(m.get("source", "")),
        words=words,
        class_word=str(m.get("class_word", "")),
        label=str(m.get("label", "")),
        strength_unet=strengths[0],
        strength_text=strengths[1],
        embeddings=embeddings,
    )
