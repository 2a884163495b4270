"""Every composition method of the pack on the same prompts, boxes and seeds: one table of CLIP-I / CLIP-T per
prompt, time against plain sampling and locality, in Markdown and CSV.

    python benchmarks/compare_methods.py --suite DIR [--out DIR] [--repeats 1] [--methods a,b] [--quick]
                                         [--device auto|cpu|cuda] [--figures FILE]
    python benchmarks/compare_methods.py [--demo] [--quick]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv; runs ComfyUI in this process (no server), on
``--device`` (cuda when a GPU is present; where ComfyUI already runs in this process, e.g. under a test, its
device unless another is named, which is refused).
Nothing is downloaded: ``--suite`` reads the user's own weights from ComfyUI's models folders (and the
folders of its extra_model_paths.yaml, as ComfyUI does), the demo builds random ones.

Rows (a method's row appears only if the nodes it needs are in the loaded pack):

* plain: CLIP Text Encode of the global prompt + KSampler, no concept. The time reference (ratio 1).
* merged LoRAs: every concept merged the usual way (ED-LoRA Loader, or core Load LoRA for an ordinary LoRA),
  then the global prompt with each concept's words put before its class word, KSampler. Leaks everywhere.
* Regional LoRA: each concept's UNet LoRA scoped to its box (``MultiConceptRegionalLoRA``); the global prompt
  (with the trigger words of ordinary LoRAs; ED-LoRA words mean nothing without their text encoder), KSampler.
* Mix-of-Show Regional (``MultiConceptMixOfShowRegional``): global prompt + each box's prompt, KSampler.
* fused (Mix-of-Show fusion): ``MultiConceptFuseConcepts`` (closed form; untimed, a one-off step like
  training; its seconds are in the notes) -> the fused file -> ``MultiConceptLoadFusedConcepts`` -> Mix-of-Show
  Regional -> KSampler.
* OMG (``MultiConceptOMG``): the global prompt as the scene, the boxes as masks (no SAM), box prompts as the
  concepts' prompts; the node samples both stages.
* LoRA-Composer (``MultiConceptLoRAComposer``): its GUIDER (official defaults) with RandomNoise,
  KSamplerSelect and BasicScheduler into SamplerCustomAdvanced.
* Response-Weighted Mix (``MultiConceptResponseWeightedMix``): the prompt with every concept's words; its
  MODEL/CONDITIONING into KSampler.
* Concept Conductor (``MultiConceptConceptConductor``, official defaults): the global prompt as the scene, box
  prompts as branch prompts.

Every method gets the same checkpoint, negative prompt, size, steps, CFG, sampler, scheduler and seeds.

Columns, per prompt: **CLIP-I** and **CLIP-T** (x100, ``evaluation/scores.py`` ``score_images``): CLIP-I the
cosine of the CLIP image embeddings of each concept's box crop and its reference images (masked where the suite
gives reference masks), averaged over the prompt's concepts; CLIP-T the cosine of the image and the global
prompt (class words, no concept words). Each averaged over the seeds. Then the averages over the prompts, and:

* **time x plain**: a method's run (everything its node does, prompt encodings included, plus the sampler;
  not the VAE decode, except where the method's node decodes itself: OMG's stage-1 image, Concept Conductor's
  preview) over plain's run at the same prompt and seed; the median over prompts, seeds and ``--repeats``.
  The models are loaded: each method first runs once untimed (ComfyUI patches merged weights into the model
  then; ``--quick``: one plain step with the method's MODEL and CLIP, which is what loading needs); plain runs
  before and after all methods (``--quick``: before) and its median is the reference; the clock waits for the
  GPU. Response-Weighted Mix makes a new merged MODEL for every prompt, so its runs include patching the weights:
  that is what it costs. Before a run's time counts, its image must be finite and not flat, and a method's must
  differ from plain's at the same prompt and seed (benchmarks/harness.py ``check_did_work``); a method that
  fails the check gets no row values (its error is in the notes) and the exit status is 1.
* **locality** (DESIGN.md §6, ``samplers/scoped_lora/locality.py``): each prompt's first concept (in suite
  order) is switched off (both strengths 0, everything else the same: its words, box, prompts; Fuse Concepts
  refuses a concept with both strengths 0, so the fusion is redone with 1e-6 instead) and the final images at
  the first seed compared: ``leak = mean |change| outside the concept's box, past --margin px / mean |change|
  inside``, averaged over the prompts. Merged LoRAs act everywhere (near 1); a scoped method should be well
  below. ED-LoRA token embeddings do not have a strength, so they stay: locality is the adapters' leak.

Suite (``--suite DIR``: ``DIR/suite.json``, or the JSON file itself; relative paths are relative to its folder;
see ``benchmarks/compare_suite_example/``)::

    {
      "name": "potter and dog",                       # optional, the table's title
      "checkpoint": "v1-5-pruned-emaonly.safetensors", # in ComfyUI/models/checkpoints
      "clip": {"file": "open_clip_vit_b32.safetensors", # in ComfyUI/models/open_clip, or a path
               "architecture": "ViT-B-32"},            # or "auto" (the evaluation library reads the shapes)
      "concepts": [
        {"label": "man", "kind": "edlora", "file": "potter.pth",   # in ComfyUI/models/loras
         "class_word": "man", "words": "<potter1> <potter2>",      # words: optional for an ED-LoRA (the
         "strength_unet": 0.7, "strength_text": 0.7,               # file's own), a LoRA's trigger words
         "references": "refs/potter", "masks": "refs/potter_masks"} # images; masks optional, same file stems
      ],
      "prompts": [
        {"prompt": "a photo of a man and a dog in a garden",       # class words only: the scene
         "negative": "lowres, blurry",                             # optional (default: the suite's)
         "boxes": [{"label": "man", "x": 0.06, "y": 0.06, "w": 0.44, "h": 0.9,  # fractions of the image
                    "prompt": "a photo of <potter1> <potter2>, a man"}]}       # optional box prompt
      ],
      "seeds": [0, 1], "width": 512, "height": 512, "steps": 30, "cfg": 7.0,   # or "size": 512
      "sampler": "euler", "scheduler": "normal", "negative": "lowres, blurry",
      "methods": ["plain", "mixofshow", "omg"]                                  # optional subset
    }

A box's label names the concept that goes in it (its ``label``); a box without a concept of that label is a
plain regional prompt (Mix-of-Show, LoRA-Composer). A box without a ``negative`` of its own gets the prompt's
negative, as the official Mix-of-Show example script (``regionally_sample.sh``) writes it into every box. A concept box without a prompt gets ``a photo of <words>,
a <class word>``. Strengths default to 0.7 (ED-LoRA) and 1.0 (LoRA); ``kind`` to ``edlora``. A missing weight
file stops the run before anything is sampled, naming the file and the folder it belongs in.

``--demo`` (the default without ``--suite``): the random tiny SD1.5-shaped test checkpoint
(tests/support/builders/sd15.py), two random ED-LoRAs (tests/support/builders/edlora.py), random reference images and
a random tiny open_clip (tests/support/builders/open_clip.py), written into a temporary suite that then runs like any
other. The numbers then mean nothing (the table says so): the run checks that every method runs and the table
is filled. ``--quick``: one prompt, one seed, one repeat; the demo at 128x64 and 2 steps with two full-height
boxes (the smallest LoRA-Composer's attention losses accept), a suite at a shorter side of 128 px and 3 steps;
Fuse Concepts records 1 step at 64 px from one prompt template instead of its 20 steps at the suite's size
from two. The demo's text encoder keeps 3 of the random CLIP-L's 12 layers: every prompt naming an ED-LoRA is
encoded once per cross-attention layer (16 rows), which at full depth was two thirds of the demo's time.

Output: ``<out>/comparison.md`` and ``<out>/comparison.csv`` (``--out``, default benchmarks/results/), every
scored image in ``<out>/comparison_images/`` (``<method>_p<prompt>_seed<seed>.png``), the Markdown printed
too, and at the end one JSON figure per line (benchmarks/figures.py; ``--figures FILE`` appends them there too):
each method's time ratio (with the spread of its per-run ratios), locality, CLIP-I and CLIP-T (named
``compare_demo_*`` in the demo). The exit status is 1 when a method failed (its row
says so and the notes give the error), 2 when the suite or its weights are wrong.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.figures import Figures  # noqa: E402
from benchmarks.harness import BenchmarkError, Clock, add_common_arguments, check_did_work, resolve_device  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KINDS = ("edlora", "lora")
DEFAULT_STRENGTH = {"edlora": 0.7, "lora": 1.0}
QUICK_SIDE, QUICK_STEPS = 128, 3  # --quick on a suite: shorter side 128 px, 3 steps
DEMO_TEXT_LAYERS = 3  # the demo's CLIP-L depth (load_demo_checkpoint)
QUICK_DEMO_SIZE, QUICK_DEMO_STEPS = (128, 64), 2  # --quick demo: the smallest LoRA-Composer accepts two boxes in
OFF_FUSION_STRENGTH = 1e-6  # Fuse Concepts refuses a concept with both strengths 0: this stands for 0
DEMO_NOTE = (
    "**Demo run: random tiny checkpoint, random ED-LoRAs, random reference images and a random CLIP. The CLIP-I, "
    "CLIP-T and locality numbers mean nothing, and the time ratios are those of a toy model; this run only checks "
    "that every method runs and that the table is filled.**"
)


class SuiteError(ValueError):
    """A suite that cannot run; the message names the file, field or folder to fix."""


# ------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    key: str
    title: str
    nodes: tuple[str, ...]  # pack node ids the method needs (beyond the concept stack and Regions nodes)
    regional: bool = True  # reads the Regions node


METHODS = (
    Method("plain", "plain (no concepts)", (), regional=False),
    Method("merged", "merged LoRAs", ("MultiConceptEDLoRALoader",), regional=False),
    Method("regional_lora", "Regional LoRA", ("MultiConceptRegionalLoRA",)),
    Method("mixofshow", "Mix-of-Show Regional", ("MultiConceptMixOfShowRegional",)),
    Method(
        "fusion",
        "fused + Mix-of-Show Regional",
        ("MultiConceptFuseConcepts", "MultiConceptLoadFusedConcepts", "MultiConceptMixOfShowRegional"),
    ),
    Method("omg", "OMG", ("MultiConceptOMG",)),
    Method("lora_composer", "LoRA-Composer", ("MultiConceptLoRAComposer",)),
    Method("response_mix", "Response-Weighted Mix", ("MultiConceptResponseWeightedMix",), regional=False),
    Method("concept_conductor", "Concept Conductor", ("MultiConceptConceptConductor",)),
)
METHOD_KEYS = tuple(m.key for m in METHODS)
STACK_NODES = {"edlora": "MultiConceptStackEDLoRA", "lora": "MultiConceptStackLoRA"}


def available_methods(node_ids, kinds=("edlora",)) -> list[Method]:
    """The methods whose nodes are all registered. ``kinds``: the suite's concept kinds (which stack nodes, and
    whether merging needs the ED-LoRA Loader)."""
    have = set(node_ids)
    stack_ok = all(STACK_NODES[k] in have for k in kinds)
    out = []
    for m in METHODS:
        if m.key == "plain":
            out.append(m)
            continue
        if m.key == "merged":
            if "edlora" not in kinds or "MultiConceptEDLoRALoader" in have:
                out.append(m)
            continue
        if stack_ok and all(n in have for n in m.nodes) and (not m.regional or "MultiConceptRegions" in have):
            out.append(m)
    return out


# --------------------------------------------------------------------------------------------- suite


@dataclass(frozen=True)
class SuiteConcept:
    label: str
    kind: str
    file: str
    class_word: str
    words: str
    strength_unet: float
    strength_text: float
    references: Path
    masks: Path | None


@dataclass(frozen=True)
class SuiteBox:
    label: str
    x: float
    y: float
    w: float
    h: float
    prompt: str = ""
    negative: str = ""


@dataclass(frozen=True)
class SuitePrompt:
    prompt: str
    negative: str
    boxes: tuple[SuiteBox, ...]


@dataclass(frozen=True)
class Suite:
    name: str
    root: Path
    checkpoint: str
    clip_file: str
    clip_architecture: str
    concepts: tuple[SuiteConcept, ...]
    prompts: tuple[SuitePrompt, ...]
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str = "euler"
    scheduler: str = "normal"
    methods: tuple[str, ...] = ()
    demo: bool = False

    def concepts_of(self, prompt: SuitePrompt) -> list[SuiteConcept]:
        """The prompt's concepts, in suite order: those whose label is one of its boxes'."""
        labels = {b.label for b in prompt.boxes}
        return [c for c in self.concepts if c.label in labels]


def _need(d: dict, key: str, where: str):
    if key not in d or d[key] in (None, ""):
        raise SuiteError(f"{where}: '{key}' is missing")
    return d[key]


def _number(value, where: str, lo: float | None = None, hi: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SuiteError(f"{where} is {value!r}, not a number") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SuiteError(f"{where} is {value!r}; it must lie in [{lo}, {hi}]")
    return v


def _int(value, where: str, lo: int = 0, multiple: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or float(value) != int(value):
        raise SuiteError(f"{where} is {value!r}, not a whole number")
    v = int(value)
    if v < lo or v % multiple:
        raise SuiteError(
            f"{where} is {v}; it must be at least {lo}" + (f" and a multiple of {multiple}" if multiple > 1 else "")
        )
    return v


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite description (a folder with suite.json, or the JSON file). Pure Python: the weight
    files are looked up later, when ComfyUI's folders are known."""
    path = Path(path).expanduser()
    file = path / "suite.json" if path.is_dir() else path
    if not file.is_file():
        raise SuiteError(f"no suite description at {file} (give a folder with suite.json, or the JSON file)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise SuiteError(f"{file} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{file}: the suite must be a JSON object")
    root = file.parent.resolve()

    clip = _need(data, "clip", "suite")
    if isinstance(clip, str):
        clip = {"file": clip}
    if not isinstance(clip, dict):
        raise SuiteError('suite: \'clip\' must be {"file": ..., "architecture": ...}')

    concepts = []
    for i, c in enumerate(_need(data, "concepts", "suite")):
        where = f"concept {i + 1}"
        if not isinstance(c, dict):
            raise SuiteError(f"{where} must be a JSON object")
        kind = str(c.get("kind", "edlora")).strip().lower()
        if kind not in KINDS:
            raise SuiteError(f"{where}: kind is {kind!r}; use 'edlora' or 'lora'")
        label = str(_need(c, "label", where)).strip()
        where = f"concept {i + 1} ('{label}')"
        refs = root / str(_need(c, "references", where))
        masks = root / str(c["masks"]) if c.get("masks") else None
        concepts.append(
            SuiteConcept(
                label=label,
                kind=kind,
                file=str(_need(c, "file", where)),
                class_word=str(_need(c, "class_word", where)).strip(),
                words=" ".join(str(c.get("words", "") or "").split()),
                strength_unet=_number(c.get("strength_unet", DEFAULT_STRENGTH[kind]), f"{where} strength_unet", -4, 4),
                strength_text=_number(c.get("strength_text", DEFAULT_STRENGTH[kind]), f"{where} strength_text", -4, 4),
                references=refs,
                masks=masks,
            )
        )
    if not concepts:
        raise SuiteError("suite: 'concepts' is empty")
    labels = [c.label for c in concepts]
    if len(set(labels)) != len(labels):
        raise SuiteError(f"suite: concept labels must differ, got {labels}")
    words = [w for c in concepts for w in c.words.split() if c.kind == "edlora"]
    if len(set(words)) != len(words):
        raise SuiteError(f"suite: two ED-LoRA concepts share words ({' '.join(words)}); give each its own words")

    prompts = []
    default_negative = str(data.get("negative", "") or "")
    for i, p in enumerate(_need(data, "prompts", "suite")):
        where = f"prompt {i + 1}"
        if not isinstance(p, dict):
            raise SuiteError(f"{where} must be a JSON object")
        boxes = []
        for j, b in enumerate(_need(p, "boxes", where)):
            bw = f"{where} box {j + 1}"
            if not isinstance(b, dict):
                raise SuiteError(f"{bw} must be a JSON object")
            x, y = _number(_need(b, "x", bw), f"{bw} x", 0, 1), _number(_need(b, "y", bw), f"{bw} y", 0, 1)
            w, h = _number(_need(b, "w", bw), f"{bw} w", 0, 1), _number(_need(b, "h", bw), f"{bw} h", 0, 1)
            if w <= 0 or h <= 0 or x + w > 1 + 1e-6 or y + h > 1 + 1e-6:
                raise SuiteError(f"{bw}: the box must have a size and lie inside the image (x + w <= 1, y + h <= 1)")
            boxes.append(
                SuiteBox(
                    label=str(_need(b, "label", bw)).strip(),
                    x=x, y=y, w=w, h=h,
                    prompt=str(b.get("prompt", "") or ""),
                    negative=str(b.get("negative", "") or ""),
                )
            )  # fmt: skip
        box_labels = [b.label for b in boxes]
        if len(set(box_labels)) != len(box_labels):
            raise SuiteError(f"{where}: box labels must differ, got {box_labels}")
        if not set(box_labels) & set(labels):
            raise SuiteError(f"{where}: no box carries a concept's label (concepts: {', '.join(labels)})")
        prompts.append(
            SuitePrompt(str(_need(p, "prompt", where)), str(p.get("negative", default_negative) or ""), tuple(boxes))
        )
    if not prompts:
        raise SuiteError("suite: 'prompts' is empty")

    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds:
        raise SuiteError("suite: 'seeds' must be a list of whole numbers")
    size = data.get("size")
    width = _int(data.get("width", size or 512), "suite width", 64, 8)
    height = _int(data.get("height", size or 512), "suite height", 64, 8)
    methods = tuple(data.get("methods") or ())
    unknown = [m for m in methods if m not in METHOD_KEYS]
    if unknown:
        raise SuiteError(f"suite: unknown methods {unknown}; known: {', '.join(METHOD_KEYS)}")
    return Suite(
        name=str(data.get("name", file.parent.name)),
        root=root,
        checkpoint=str(_need(data, "checkpoint", "suite")),
        clip_file=str(_need(clip, "file", "suite clip")),
        clip_architecture=str(clip.get("architecture", "auto") or "auto"),
        concepts=tuple(concepts),
        prompts=tuple(prompts),
        seeds=tuple(_int(s, "suite seed") for s in seeds),
        width=width,
        height=height,
        steps=_int(data.get("steps", 30), "suite steps", 2),
        cfg=_number(data.get("cfg", 7.0), "suite cfg", 0, 100),
        sampler=str(data.get("sampler", "euler")),
        scheduler=str(data.get("scheduler", "normal")),
        methods=methods,
        demo=bool(data.get("demo", False)),
    )


def quick_suite(suite: Suite) -> Suite:
    """One prompt, one seed, a shorter side of 128 px (multiples of 8), 3 steps."""
    scale = QUICK_SIDE / min(suite.width, suite.height)
    width, height = (max(64, int(round(s * scale / 8)) * 8) for s in (suite.width, suite.height))
    return replace(suite, prompts=suite.prompts[:1], seeds=suite.seeds[:1], width=width, height=height,
                   steps=min(suite.steps, QUICK_STEPS))  # fmt: skip


# ------------------------------------------------------------------------------------- prompt words


def with_words(prompt: str, concepts) -> str:
    """``prompt`` with each concept's words put before (the next unused mention of) its class word, or appended:
    how a merged LoRA is usually called. ``concepts``: (words, class word) pairs."""
    out = prompt
    taken = 0  # never insert inside text inserted earlier
    for words, class_word in concepts:
        if not words:
            continue
        m = re.search(rf"\b{re.escape(class_word)}\b", out[taken:]) if class_word else None
        if m is None:
            out = f"{out}, {words}" + (f" {class_word}" if class_word else "")
            taken = len(out)
        else:
            at = taken + m.start()
            out = f"{out[:at]}{words} {out[at:]}"
            taken = at + len(words) + 1 + len(class_word)
    return out


# ---------------------------------------------------------------------------------------- the demo


def write_demo_suite(folder: Path, models_dir: Path, quick: bool) -> Path:
    """A suite of random weights: the tiny SD1.5 checkpoint and two random ED-LoRAs in ``models_dir``, random
    reference images (and masks for the first concept) and a tiny open_clip in ``folder``."""
    import torch
    from PIL import Image

    from tests.support.builders.edlora import clip_te_modules, official_edlora
    from tests.support.builders.open_clip import save_tiny_open_clip
    from tests.support.builders.sd15 import build_tiny_sd15

    ckpt = "mc_tiny_sd15.safetensors"  # the test suite's name: a session's build is reused when it is current
    build_tiny_sd15(models_dir / "checkpoints" / ckpt, seed=0)
    clip_name = "compare_demo_open_clip.safetensors"  # looked up in models/open_clip like a user's file
    save_tiny_open_clip(models_dir / "open_clip" / clip_name, seed=0)
    concepts = []
    # seeds 85 / 185: the demo prompt responds to both random concepts (Response-Weighted Mix gives each about
    # half the weight; with other seeds it may give one all of it, and switching the other off changes nothing)
    for i, (label, class_word, words, seed) in enumerate((("man", "man", ("<man1>", "<man2>"), 85),
                                                           ("dog", "dog", ("<dog1>", "<dog2>"), 185))):  # fmt: skip
        name = f"compare_demo_{label}.pth"
        torch.save(official_edlora(words=words, seed=seed, lora_scale=0.2, te_modules=clip_te_modules(DEMO_TEXT_LAYERS, 768)),
                   models_dir / "loras" / name)  # fmt: skip
        refs = folder / "refs" / label
        refs.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(90 + i)
        for k in range(3):  # smooth random colour fields: something for the image encoder to see
            small = torch.rand(1, 3, 6, 6, generator=gen)
            img = torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)[0]
            Image.fromarray((img.movedim(0, -1).numpy() * 255).astype("uint8")).save(refs / f"ref_{k}.png")
        entry = {"label": label, "kind": "edlora", "file": name, "class_word": class_word, "words": " ".join(words),
                 "references": f"refs/{label}"}  # fmt: skip
        if i == 0:  # one concept with reference masks, so the masked path runs too
            masks = folder / "refs" / f"{label}_masks"
            masks.mkdir(parents=True, exist_ok=True)
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
            ellipse = ((xx / 0.6) ** 2 + (yy / 0.85) ** 2 <= 1).numpy().astype("uint8") * 255
            for k in range(3):
                Image.fromarray(ellipse).save(masks / f"ref_{k}.png")
            entry["masks"] = f"refs/{label}_masks"
        concepts.append(entry)
    left = {"label": "man", "x": 0.05, "y": 0.1, "w": 0.4, "h": 0.8}
    right = {"label": "dog", "x": 0.55, "y": 0.3, "w": 0.4, "h": 0.6}
    if quick:  # 128x64: LoRA-Composer's losses need boxes of 64x64 px (2x2 cells of its 32 px attention map)
        left = {"label": "man", "x": 0.03, "y": 0.05, "w": 0.44, "h": 0.9}
        right = {"label": "dog", "x": 0.53, "y": 0.05, "w": 0.44, "h": 0.9}
    prompts = [
        {"prompt": "a photo of a man and a dog in a garden",
         "boxes": [{**left, "prompt": "a photo of <man1> <man2>, a man, standing"},
                   {**right, "prompt": "a photo of <dog1> <dog2>, a dog"}]},
        {"prompt": "a man and a dog on a beach, sunny day",
         "boxes": [{**left, "label": "dog"}, {**right, "label": "man", "y": 0.1, "h": 0.8}]},
    ]  # fmt: skip
    suite = {
        "name": "demo (random weights)", "demo": True, "checkpoint": ckpt,
        "clip": {"file": clip_name, "architecture": "auto"},
        "concepts": concepts, "prompts": prompts[:1] if quick else prompts,
        "seeds": [0] if quick else [0, 1], "width": QUICK_DEMO_SIZE[0] if quick else 256,
        "height": QUICK_DEMO_SIZE[1] if quick else 256, "steps": QUICK_DEMO_STEPS if quick else 6,
        "cfg": 7.0, "sampler": "euler", "scheduler": "normal", "negative": "lowres, blurry",
    }  # fmt: skip
    (folder / "suite.json").write_text(json.dumps(suite, indent=2))
    return folder


def load_demo_checkpoint(name: str) -> tuple:
    """(MODEL, CLIP, VAE) of the demo's random checkpoint with the first ``DEMO_TEXT_LAYERS`` of its 12 CLIP-L
    layers: the text encoder is most of the demo's time (each prompt naming an ED-LoRA is encoded 16 times),
    and on random weights a deeper one only costs more. SD1.5 reads the last layer, so any depth works; the
    depth goes in through ComfyUI's own text-model options, and the layers beyond are not read."""
    import folder_paths
    from comfy.sd import load_checkpoint_guess_config

    path = folder_paths.get_full_path_or_raise("checkpoints", name)
    options = {"clip_l_model_config": {"num_hidden_layers": DEMO_TEXT_LAYERS}}
    loaded = load_checkpoint_guess_config(path, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                          te_model_options=options)  # fmt: skip
    return tuple(loaded[:3])


# --------------------------------------------------------------------------------------- weights


def check_weights(suite: Suite) -> dict:
    """Every weight file of the suite, or SuiteError naming the missing file and where it belongs."""
    import folder_paths

    found = {}

    def model_file(folder: str, name: str, what: str) -> str:
        path = folder_paths.get_full_path(folder, name)
        if path is None:
            where = ", ".join(folder_paths.get_folder_paths(folder)) or f"ComfyUI/models/{folder}"
            raise SuiteError(f"{what} '{name}' not found: put it in models/{folder} ({where})")
        return path

    found["checkpoint"] = model_file("checkpoints", suite.checkpoint, "checkpoint")
    for c in suite.concepts:
        found[c.label] = model_file(
            "loras", c.file, f"concept '{c.label}': {'ED-LoRA' if c.kind == 'edlora' else 'LoRA'} file"
        )
    clip = Path(suite.clip_file).expanduser()
    folders = [Path(folder_paths.models_dir) / "open_clip"]
    try:  # registered by the pack's evaluation nodes (ComfyUI/models/open_clip and any extra paths)
        folders = [Path(p) for p in folder_paths.get_folder_paths("open_clip")] + folders
    except KeyError:
        pass
    candidates = [clip] if clip.is_absolute() else [suite.root / clip, *(f / clip for f in folders)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SuiteError(
            f"open_clip file '{suite.clip_file}' not found: put it in models/open_clip "
            f"({', '.join(dict.fromkeys(map(str, folders)))}) or give its path (relative to {suite.root})"
        )
    found["clip"] = path
    for c in suite.concepts:
        if not c.references.is_dir() or not _images_in(c.references):
            raise SuiteError(f"concept '{c.label}': no reference images in {c.references}")
        if c.masks is not None and not c.masks.is_dir():
            raise SuiteError(f"concept '{c.label}': the reference mask folder {c.masks} does not exist")
    return found


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_references(concept: SuiteConcept, size: int):
    """``(images [N, size, size, 3], masks [N, size, size] | None)``: centre-cropped squares, resized."""
    import numpy as np
    import torch
    from PIL import Image

    def square(img: Image.Image) -> Image.Image:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)

    files = _images_in(concept.references)
    images = [np.asarray(square(Image.open(f).convert("RGB")), dtype=np.float32) / 255 for f in files]
    masks = None
    if concept.masks is not None:
        by_stem = {p.stem: p for p in _images_in(concept.masks)}
        missing = [f.name for f in files if f.stem not in by_stem]
        if missing:
            raise SuiteError(f"concept '{concept.label}': no mask in {concept.masks} for {', '.join(missing)}")
        masks = torch.from_numpy(
            np.stack(
                [np.asarray(square(Image.open(by_stem[f.stem]).convert("L")), dtype=np.float32) / 255 for f in files]
            )
        )
    return torch.from_numpy(np.stack(images)), masks


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Row:
    method: Method
    scores: dict = field(default_factory=dict)  # prompt index -> (clip_i, clip_t) x100
    ratios: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    leaks: dict = field(default_factory=dict)  # prompt index -> leak
    error: str = ""

    def mean_score(self, k: int) -> float:
        vals = [s[k] for s in self.scores.values()]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan

    @property
    def locality(self) -> float:
        vals = [v for v in self.leaks.values() if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else math.nan


class Runner:
    """Builds each method's graph from the pack's nodes (called as ComfyUI's executor calls them) and samples."""

    def __init__(self, session, suite: Suite, quick: bool = False):
        import nodes

        self.session, self.suite, self.quick = session, suite, quick
        self.nodes = nodes
        self.clock = Clock()
        if suite.demo:
            self.model, self.clip, self.vae = load_demo_checkpoint(suite.checkpoint)
        else:
            self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(suite.checkpoint)[:3]
        self.latent = nodes.EmptyLatentImage().generate(suite.width, suite.height, 1)[0]
        self.regions = [self.node("MultiConceptRegions", suite.width, suite.height, self._regions_json(p))[0]
                        for p in suite.prompts]  # fmt: skip
        self._stacks: dict = {}
        self._merged: dict = {}
        self._fused: dict = {}
        self.fuse_seconds: list[float] = []
        self.made_files: list[Path] = []

    # -- helpers ----------------------------------------------------------------------------------

    def node(self, node_id: str, *args, **kwargs) -> tuple:
        """A pack (V3) node's outputs."""
        return tuple(self.session.node_class(node_id).execute(*args, **kwargs).result)

    def now(self) -> float:
        return self.clock.now()

    def _regions_json(self, p: SuitePrompt) -> str:
        by_label = {c.label: c for c in self.suite.concepts}
        boxes = []
        for b in p.boxes:
            prompt = b.prompt.strip()
            if not prompt:  # filled in with the concept's (stack) words once the stack exists; see stack()
                prompt = p.prompt if b.label not in by_label else "{words}"
            # a box without a negative of its own gets the prompt's, as the official Mix-of-Show example script
            # (regionally_sample.sh) writes the scene's negative into every box
            boxes.append({"x": b.x, "y": b.y, "w": b.w, "h": b.h, "label": b.label, "prompt": prompt,
                          "negative": b.negative or p.negative})  # fmt: skip
        return json.dumps({"version": 1, "units": "fraction", "boxes": boxes})

    def stack(self, pi: int, off: bool = False):
        """The prompt's concept stack (Concept Stack nodes); ``off``: its first concept at strengths 0."""
        key = (pi, off)
        if key not in self._stacks:
            stack = None
            for i, c in enumerate(self.suite.concepts_of(self.suite.prompts[pi])):
                su, st = (0.0, 0.0) if off and i == 0 else (c.strength_unet, c.strength_text)
                stack = self.node(STACK_NODES[c.kind], c.file, su, st, c.label, concepts=stack,
                                  **{"concept_words" if c.kind == "edlora" else "trigger_words": c.words},
                                  class_word=c.class_word)[0]  # fmt: skip
            self._stacks[key] = stack
            self._fill_box_prompts(pi, stack)
        return self._stacks[key]

    def _fill_box_prompts(self, pi: int, stack) -> None:
        """Concept boxes without a prompt: 'a photo of <words>, a <class word>' with the stack's words."""
        regions = self.regions[pi]
        if not any(r.prompt == "{words}" for r in regions.regions):
            return
        by_label = {c.label: c for c in stack}
        new = []
        for r in regions.regions:
            if r.prompt == "{words}":
                c = by_label[r.label]
                words = f"{c.prompt_words}, a {c.class_word}" if c.prompt_words else f"a {c.class_word}"
                r = replace(r, prompt=f"a photo of {words}")
            new.append(r)
        self.regions[pi] = replace(regions, regions=tuple(new))

    def named_prompt(self, pi: int, kinds=KINDS) -> str:
        stack = self.stack(pi)
        return with_words(self.suite.prompts[pi].prompt, [(c.prompt_words, c.class_word) for c in stack
                                                           if c.kind in kinds])  # fmt: skip

    def encode(self, clip, text: str):
        return self.nodes.CLIPTextEncode().encode(clip, text)[0]

    def ksampler(self, model, seed: int, positive, negative):
        s = self.suite
        return self.nodes.KSampler().sample(model, seed, s.steps, s.cfg, s.sampler, s.scheduler, positive, negative,
                                            self.latent)[0]  # fmt: skip

    def decode(self, latent):
        return self.nodes.VAEDecode().decode(self.vae, latent)[0]

    # -- untimed preparation (loading, merging, fusing) ---------------------------------------------

    def prepare(self, key: str, pi: int, off: bool) -> dict:
        ctx = {"stack": self.stack(pi, off)}
        if key == "merged":
            ctx["model"], ctx["clip"] = self._merged_model(pi, off)
        elif key == "fusion":
            ctx["model"], ctx["clip"], ctx["stack"] = self._fused_model(pi, off)
        return ctx

    def _merged_model(self, pi: int, off: bool):
        if (pi, off) not in self._merged:
            model, clip = self.model, self.clip
            for i, c in enumerate(self.suite.concepts_of(self.suite.prompts[pi])):
                su, st = (0.0, 0.0) if off and i == 0 else (c.strength_unet, c.strength_text)
                if c.kind == "edlora":
                    model, clip = self.node("MultiConceptEDLoRALoader", model, clip, c.file, su, st,
                                            concept_words=c.words, class_word=c.class_word)[:2]  # fmt: skip
                else:
                    model, clip = self.nodes.LoraLoader().load_lora(model, clip, c.file, su, st)
            self._merged[(pi, off)] = (model, clip)
        return self._merged[(pi, off)]

    def _fused_model(self, pi: int, off: bool):
        if (pi, off) not in self._fused:
            import folder_paths

            stack = self.stack(pi, off)
            if off:  # Fuse Concepts refuses a concept with both strengths 0
                first = replace(stack[0], strength_unet=OFF_FUSION_STRENGTH, strength_text=OFF_FUSION_STRENGTH)
                stack = replace(stack, concepts=(first, *stack.concepts[1:]))
            loras = Path(folder_paths.get_folder_paths("loras")[0])
            before = set(loras.iterdir()) if loras.is_dir() else set()
            t0 = time.perf_counter()
            # the recording runs: the node's defaults (20 steps, both prompt templates) at the suite's size;
            # --quick: 1 step at 64 px and one template (each template is a layer-wise text encoding per concept)
            size = 64 if self.quick else max(64, min(512, (min(self.suite.width, self.suite.height) // 64) * 64))
            steps, templates = (1, {"prompt_templates": "photo of a {}"}) if self.quick else (20, {})
            self.node("MultiConceptFuseConcepts", self.model, self.clip, stack, "closed form",
                      f"compare_methods_fused_p{pi + 1}{'_off' if off else ''}", steps, size, 0, **templates)  # fmt: skip
            self.fuse_seconds.append(time.perf_counter() - t0)
            made = sorted(set(loras.iterdir()) - before)
            if len(made) != 1:
                raise RuntimeError(f"Fuse Concepts wrote {len(made)} files into {loras}, expected one")
            self.made_files.append(made[0])
            self._fused[(pi, off)] = self.node("MultiConceptLoadFusedConcepts", made[0].name, self.model, self.clip)[:3]
        return self._fused[(pi, off)]

    # -- the timed part: prompt encodings and sampling ----------------------------------------------

    def run(self, key: str, ctx: dict, pi: int, seed: int) -> dict:
        s, p, regions, stack = self.suite, self.suite.prompts[pi], self.regions[pi], ctx["stack"]
        if key == "plain":
            return self.ksampler(self.model, seed, self.encode(self.clip, p.prompt), self.encode(self.clip, p.negative))
        if key == "merged":
            clip = ctx["clip"]
            return self.ksampler(
                ctx["model"], seed, self.encode(clip, self.named_prompt(pi)), self.encode(clip, p.negative)
            )
        if key == "regional_lora":
            model = self.node("MultiConceptRegionalLoRA", self.model, stack, regions)[0]
            prompt = self.named_prompt(pi, kinds=("lora",))
            return self.ksampler(model, seed, self.encode(self.clip, prompt), self.encode(self.clip, p.negative))
        if key in ("mixofshow", "fusion"):
            model, clip = (ctx["model"], ctx["clip"]) if key == "fusion" else (self.model, self.clip)
            model, pos, neg = self.node("MultiConceptMixOfShowRegional", model, clip, regions, p.prompt, p.negative,
                                        concepts=stack)[:3]  # fmt: skip
            return self.ksampler(model, seed, pos, neg)
        if key == "omg":
            return self.node("MultiConceptOMG", self.model, self.clip, self.vae, stack, self.latent, seed, s.steps,
                             s.cfg, s.sampler, s.scheduler, p.prompt, p.negative, regions=regions)[0]  # fmt: skip
        if key == "lora_composer":
            import comfy_extras.nodes_custom_sampler as custom

            guider = self.node("MultiConceptLoRAComposer", self.model, self.clip, regions, p.prompt, p.negative, s.cfg,
                               concepts=stack)[0]  # fmt: skip
            noise = custom.RandomNoise().get_noise(seed)[0]
            sampler = custom.KSamplerSelect().get_sampler(s.sampler)[0]
            sigmas = custom.BasicScheduler().get_sigmas(self.model, s.scheduler, s.steps, 1.0)[0]
            return custom.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, self.latent)[0]
        if key == "response_mix":
            model, clip, positive = self.node("MultiConceptResponseWeightedMix", self.model, self.clip, stack,
                                              self.named_prompt(pi))[:3]  # fmt: skip
            return self.ksampler(model, seed, positive, self.encode(clip, p.negative))
        if key == "concept_conductor":
            # --quick (2-3 steps): one alignment step per aligned step; the default repeats it to the official 200
            # steps' count of gradient steps, which at 2 steps is 100 gradient passes
            scale = {"alignment_scale": "per step"} if self.quick else {}
            return self.node("MultiConceptConceptConductor", self.model, self.clip, self.vae, self.latent, seed,
                             s.steps, s.cfg, s.sampler, s.scheduler, stack, p.prompt, p.negative,
                             regions=regions, **scale)[0]  # fmt: skip
        raise KeyError(key)

    def warm(self, key: str, pi: int, seed: int) -> float:
        """Untimed run that loads the method's model (merged weights are patched in then). --quick: one plain
        step with the method's MODEL and CLIP (that is what loading needs), else a whole run."""
        if not self.quick:
            return self.timed(key, pi, seed)[1]
        ctx = self.prepare(key, pi, False)
        model, clip, p = ctx.get("model", self.model), ctx.get("clip", self.clip), self.suite.prompts[pi]
        t0 = self.now()
        s = self.suite
        self.nodes.KSampler().sample(model, seed, 1, s.cfg, s.sampler, s.scheduler, self.encode(clip, p.prompt),
                                     self.encode(clip, p.negative), self.latent)  # fmt: skip
        return self.now() - t0

    def timed(self, key: str, pi: int, seed: int, off: bool = False):
        """``(image [1, H, W, 3], seconds)``; preparation untimed, the decode untimed."""
        ctx = self.prepare(key, pi, off)
        t0 = self.now()
        latent = self.run(key, ctx, pi, seed)
        seconds = self.now() - t0
        return self.decode(latent), seconds

    def cleanup(self) -> None:
        for f in self.made_files:
            f.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- scoring


def concept_references(evaluation, suite: Suite, image_size: int) -> dict:
    out = {}
    for c in suite.concepts:
        images, masks = load_references(c, image_size)
        out[c.label] = evaluation.ConceptReference(label=c.label, references=images, masks=masks,
                                                   class_word=c.class_word, words=tuple(c.words.split()))  # fmt: skip
    return out


def score(evaluation, clip, images, runner: Runner, pi: int, refs: dict) -> tuple[float, float]:
    """(CLIP-I, CLIP-T) x100 of a prompt's images (one per seed)."""
    regions, stack = runner.regions[pi], runner.stack(pi)
    words = {c.label: c for c in stack}
    references, boxes = [], {}
    for r, box in zip(regions.regions, regions.bboxes(), strict=True):
        if r.label in words:
            c = words[r.label]  # the stack's words (what the prompts use) and the box's prompt
            references.append(replace(refs[r.label], words=tuple(c.words), prompt=r.prompt))
            boxes[r.label] = tuple(box)
    s = evaluation.score_images(clip, images, runner.suite.prompts[pi].prompt, references, boxes)
    return 100 * float(s.clip_i), math.nan if s.clip_t is None else 100 * float(s.clip_t)


# --------------------------------------------------------------------------------------------- table


def _fmt(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) and math.isfinite(v) else "–"


def table_rows(rows: list[Row], n_prompts: int) -> tuple[list[str], list[list]]:
    """The header and the rows as numbers (NaN where a value does not exist)."""
    head = ["method"]
    for i in range(n_prompts):
        head += [f"P{i + 1} CLIP-I", f"P{i + 1} CLIP-T"]
    head += ["avg CLIP-I", "avg CLIP-T", "time x plain", "run s", "locality"]
    out = []
    for r in rows:
        line = [r.method.title]
        for i in range(n_prompts):
            line += list(r.scores.get(i, (math.nan, math.nan)))
        line += [r.mean_score(0), r.mean_score(1), r.ratio,
                 statistics.median(r.seconds) if r.seconds else math.nan, r.locality]  # fmt: skip
        out.append(line)
    return head, out


def markdown(suite: Suite, rows: list[Row], header_lines: list[str], notes: list[str]) -> str:
    head, body = table_rows(rows, len(suite.prompts))
    lines = [f"## Multi-concept methods compared: {suite.name}", ""]
    if suite.demo:
        lines += [DEMO_NOTE, ""]
    lines += header_lines + [""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r, line in zip(rows, body, strict=True):
        cells = [line[0]] + [_fmt(v, 3 if h == "run s" else 2) for h, v in zip(head[1:], line[1:], strict=True)]
        if r.error:
            cells[0] += " (failed)"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for i, p in enumerate(suite.prompts):
        boxes = "; ".join(f"{b.label} ({b.x:.2f}, {b.y:.2f}, {b.w:.2f}x{b.h:.2f})" for b in p.boxes)
        lines.append(f'- P{i + 1}: "{p.prompt}"; boxes {boxes}')
    lines += [
        "- CLIP-I / CLIP-T: x100; CLIP-I each concept's box crop vs its references, CLIP-T the image vs the prompt "
        "(class words); averaged over the prompt's concepts and the seeds.",
        "- time x plain: the method's prompt encodings + sampling over plain's at the same prompt and seed, median "
        "over runs (models loaded). run s: the method's median run in seconds.",
        "- locality: the first concept's adapter switched off (strengths 0): mean |image change| outside its box "
        "(past the margin) / inside; merged LoRAs are near 1, lower is more local. Plain has no concept.",
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def csv_text(suite: Suite, rows: list[Row]) -> str:
    head, body = table_rows(rows, len(suite.prompts))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", *head, "error"])
    for r, line in zip(rows, body, strict=True):
        values = [("" if not math.isfinite(v) else round(v, 4)) if isinstance(v, float) else v for v in line]
        writer.writerow([r.method.key, *values, r.error])
    return buf.getvalue()


def save_images(folder: Path, images: dict) -> None:
    """Every scored image as ``<method>_p<prompt>_seed<seed>.png`` (earlier ones of this folder replaced)."""
    import numpy as np
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for (key, pi, seed), image in images.items():
        pixels = (image[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{key}_p{pi + 1}_seed{seed}.png")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--suite", type=Path, help="a folder with suite.json (or the JSON file): the user's weights")
    mode.add_argument("--demo", action="store_true", help="random test weights (the default without --suite)")
    add_common_arguments(parser, "one prompt, one seed, 128 px, 3 steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where comparison.md and .csv go")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and seed (median)")
    parser.add_argument("--methods", default="", help=f"comma-separated subset of: {', '.join(METHOD_KEYS)}")
    parser.add_argument("--margin", type=int, default=16,
                        help="locality: pixels around the box left out (16: the reach of the TAESD decoder)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    wanted = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in wanted if m not in METHOD_KEYS]
    if bad:
        parser.error(f"--methods: unknown {bad}; known: {', '.join(METHOD_KEYS)}")
    args.methods = wanted
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.suite is not None:
        try:
            suite = load_suite(args.suite)
        except SuiteError as e:
            print(f"compare_methods: {e}")
            return 2

    from tests.support import comfy_inprocess
    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return 2
    owned = comfy_inprocess._SESSION is None  # a test may have started ComfyUI in this process already
    try:
        if owned:
            args.device = resolve_device(args.device)
        elif args.device == "auto":
            args.device = comfy_inprocess._SESSION.device
        elif args.device != comfy_inprocess._SESSION.device:
            raise BenchmarkError(f"--device {args.device}: ComfyUI already runs on {comfy_inprocess._SESSION.device} "
                                 "in this process")  # fmt: skip
    except BenchmarkError as e:
        print(f"compare_methods: {e}")
        return 2
    base = Path(tempfile.mkdtemp(prefix="mc_compare_")) if owned else None
    session = comfy_inprocess.make_session(comfy_path, base or Path(tempfile.gettempdir()), device=args.device)
    demo_dir = None
    try:
        if args.suite is None:
            demo_dir = Path(tempfile.mkdtemp(prefix="mc_compare_demo_"))
            print("building the demo's random weights ...", flush=True)
            suite = load_suite(write_demo_suite(demo_dir, session.models_dir, args.quick))
        elif owned and (comfy_path / "extra_model_paths.yaml").is_file():
            # what ComfyUI's main.py does at start-up, so the user's weights are found where ComfyUI finds them
            import utils.extra_config

            utils.extra_config.load_extra_path_config(str(comfy_path / "extra_model_paths.yaml"))
        if args.quick and args.suite is not None:  # the demo writes its quick suite itself
            suite = quick_suite(suite)
        try:
            weights = check_weights(suite)
        except SuiteError as e:
            print(f"compare_methods: {e}")
            return 2
        kinds = tuple(sorted({c.kind for c in suite.concepts}))
        methods = available_methods(session.pack_node_ids, kinds)
        wanted = args.methods or suite.methods
        if wanted:
            methods = [m for m in methods if m.key in wanted or m.key == "plain"]  # plain is the time reference
        missing = [m.title for m in METHODS if m not in methods and (not wanted or m.key in wanted)]
        return _compare(args, session, suite, weights, methods, missing, t_start)
    finally:
        if demo_dir is not None:
            shutil.rmtree(demo_dir, ignore_errors=True)
        if owned and base is not None:
            shutil.rmtree(base, ignore_errors=True)


def _compare(
    args, session, suite: Suite, weights: dict, methods: list[Method], missing: list[str], t_start: float
) -> int:
    import comfy.model_management
    import torch

    evaluation = session.pack_module("evaluation.scores")
    clip_files = session.pack_module("evaluation.open_clip_model")
    try:
        eval_clip = clip_files.load_open_clip(weights["clip"], suite.clip_architecture)
    except clip_files.OpenClipFileError as e:
        print(f"compare_methods: {e}")
        return 2
    refs = concept_references(evaluation, suite, max(eval_clip.image_size))
    locality = session.pack_module("samplers.scoped_lora.locality")

    t0 = time.perf_counter()
    runner = Runner(session, suite, quick=args.quick)
    print(f"checkpoint {suite.checkpoint} loaded in {time.perf_counter() - t0:.1f}s; methods: "
          f"{', '.join(m.key for m in methods)}", flush=True)  # fmt: skip
    rows: list[Row] = []
    plain_times: dict = {}
    images: dict = {}  # (method, prompt, seed) -> image
    notes: list[str] = []
    runs = [(pi, seed) for pi in range(len(suite.prompts)) for seed in suite.seeds]
    try:
        with torch.inference_mode():
            order = [m for m in methods if m.key == "plain"] + [m for m in methods if m.key != "plain"]
            if not args.quick:  # plain again at the end: its reference is both blocks (the machine drifts)
                order += [m for m in methods if m.key == "plain"]
            for bi, method in enumerate(order):
                again = method.key == "plain" and bi > 0
                row = next((r for r in rows if r.method.key == method.key), None) or Row(method)
                if not again:
                    rows.append(row)
                try:
                    warm = runner.warm(method.key, *runs[0])  # loads and patches: untimed
                    print(f"  {method.key:18} warm-up {warm:7.2f}s", flush=True)
                    for pi, seed in runs:
                        for _ in range(args.repeats):
                            image, seconds = runner.timed(method.key, pi, seed)
                            # before the time counts: a picture, and a method's differs from plain's
                            plain_image = None if method.key == "plain" else images.get(("plain", pi, seed))
                            check_did_work(f"{method.title}, P{pi + 1} seed {seed}", image, plain_image)
                            row.seconds.append(seconds)
                            if method.key == "plain":
                                plain_times.setdefault((pi, seed), []).append(seconds)
                            images.setdefault((method.key, pi, seed), image)
                            print(f"  {method.key:18} P{pi + 1} seed {seed}  {seconds:7.2f}s", flush=True)
                    if method.key == "plain":
                        continue
                    for pi in range(len(suite.prompts)):  # locality: the first concept switched off
                        seed = suite.seeds[0]
                        try:
                            off, _ = runner.timed(method.key, pi, seed, off=True)
                            first = runner.stack(pi)[0]
                            box = [r.label for r in runner.regions[pi].regions].index(first.label)
                            mask = runner.regions[pi].masks()[box]
                            change = (images[(method.key, pi, seed)] - off).movedim(-1, 1)
                            if float(change.abs().amax()) == 0.0:
                                row.leaks[pi] = math.nan
                                notes.append(f"{method.title}: switching the first concept off changed nothing in "
                                             f"P{pi + 1} (the method gave it no weight): no locality")  # fmt: skip
                                continue
                            row.leaks[pi] = locality.leak(change, mask, args.margin)
                            print(f"  {method.key:18} P{pi + 1} locality {row.leaks[pi]:.3f}", flush=True)
                        except ValueError as e:  # the box grown by the margin covers the picture
                            row.leaks[pi] = math.nan
                            notes.append(f"{method.title}: no locality for P{pi + 1} ({e})")
                except Exception as e:  # noqa: BLE001 - one failing method must not hide the others' results
                    row.error = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  {method.key:18} FAILED {row.error}", flush=True)
    finally:
        runner.cleanup()

    plain_ref = {k: statistics.median(v) for k, v in plain_times.items()}
    for row in rows:
        if row.error:
            continue
        # the ratio of each timed run to plain's median at the same prompt and seed (runs are in `runs` order)
        per_run = [k for k in runs for _ in range(args.repeats)]
        if row.method.key == "plain":
            row.ratios = [1.0]
        elif plain_ref:  # (plain failed: no ratios)
            row.ratios = [t / plain_ref[k] for t, k in zip(row.seconds, per_run, strict=True)]
        try:
            for pi in range(len(suite.prompts)):
                batch = torch.cat([images[(row.method.key, pi, seed)] for seed in suite.seeds])
                row.scores[pi] = score(evaluation, eval_clip, batch, runner, pi, refs)
        except evaluation.EvaluationError as e:  # e.g. NaN pixels: the method's images are broken
            row.error = f"scoring: {e}"
        if row.method.key == "plain":
            row.seconds = [statistics.median(v) for v in plain_times.values()]

    if runner.fuse_seconds:
        notes.append(f"Fuse Concepts took {statistics.median(runner.fuse_seconds):.1f}s per fusion (untimed, a "
                     "one-off step like training; the locality run fuses again with the first concept off).")  # fmt: skip
    for m in missing:
        notes.append(f"{m}: not in the loaded pack (its nodes are missing), no row.")
    for row in rows:
        if row.error:
            notes.append(f"{row.method.title} failed: {row.error}")
    device = comfy.model_management.get_torch_device()
    header = [
        f"checkpoint `{suite.checkpoint}`, CLIP `{Path(suite.clip_file).name}` ({eval_clip.architecture}); "
        f"{suite.width}x{suite.height}, {suite.steps} steps {suite.sampler}/{suite.scheduler}, CFG {suite.cfg:g}, "
        f"seeds {', '.join(map(str, suite.seeds))}; {len(suite.concepts)} concepts; {args.repeats} timed run(s) per "
        f"prompt and seed after a warm-up ({'one step' if args.quick else 'a whole run'}); locality margin "
        f"{args.margin} px; {device}, ComfyUI {session.version}, torch {torch.__version__}; run took "
        f"{time.perf_counter() - t_start:.0f}s."
    ]
    text = markdown(suite, rows, header, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(text)
    (args.out / "comparison.csv").write_text(csv_text(suite, rows))
    save_images(args.out / "comparison_images", images)
    print()
    print(text)
    print(f"written to {args.out / 'comparison.md'} and {args.out / 'comparison.csv'}; the images in "
          f"{args.out / 'comparison_images'}")  # fmt: skip

    figures = Figures(args.device)
    prefix = "compare_demo" if suite.demo else "compare"
    for row in rows:
        if row.error:
            continue
        k = row.method.key
        if k != "plain":
            spread = (min(row.ratios), max(row.ratios)) if row.ratios else None
            figures.add(f"{prefix}_{k}_time_ratio", row.ratio, spread=spread)
            if math.isfinite(row.locality):
                figures.add(f"{prefix}_{k}_locality", row.locality)
        for name, value in (("clip_i", row.mean_score(0)), ("clip_t", row.mean_score(1))):
            if math.isfinite(value):
                figures.add(f"{prefix}_{k}_{name}", value, better="higher")
    figures.add_peak_memory(f"{prefix}_peak_rss")
    figures.print(args.figures)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
