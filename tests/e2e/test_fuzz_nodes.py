"""Fuzzing every node of the pack through a real ComfyUI server.

For each MultiConcept* node the server lists in /object_info, a small valid graph is built around it
(providers for its socket inputs, a PreviewAny on its first output). Then each widget input in turn gets
generated bad values — malformed, wrong type, NaN, infinite, huge, empty, overlong, control characters,
path tricks — one prompt each. Whatever happens, it must be one of:

* the prompt is refused (HTTP 400) with errors attached to *our* node (the node the user must fix), none
  of them an "Exception when validating" crash, and any message of our own starts with the node's name;
* it runs and fails in our node with a ``NodeError`` whose message starts with the node's name;
* it runs successfully (the value was acceptable, e.g. an empty optional text).

Nodes that sample or train (seconds per run) are fuzzed in two passes: each value first in a validation-only
request (the checkpoint loader upstream names a missing file, so ComfyUI validates the whole graph, reports
the fuzzed node's errors beside the loader's, and runs nothing; one request carries a value for every widget,
and ComfyUI names each input it refuses); then the values that validation let through
are packed: each run gives every widget its next such value, all in one prompt; when that combined run fails
(quickly, at the node's own checks), the widget its message names is tried alone and the others together
again. A value ComfyUI converts into one already run ("yes" and 2 both reach the node as True) is not run
again. So a value ComfyUI refuses never runs, and one sampling run covers a value of every widget.

After each prompt the server must still answer, and at the end a plain txt2img prompt must give exactly
the image it gave before the fuzzing started. A node with a socket type that has no provider below fails
the test: add one when adding a node.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.edlora import official_edlora
from tests.support.graphs import plain_txt2img
from tests.support.server import PromptRejected

pytestmark = pytest.mark.e2e

EDLORA = "fz_concept.pth"
LORA = "fz_lora.safetensors"
FUSED = "fz_fused_file.safetensors"
SAM = "fz_tiny_sam.pth"
OPEN_CLIP = "fz_tiny_open_clip.safetensors"
REGIONS_JSON = (
    '{"version": 1, "boxes": [{"x": 0.1, "y": 0.1, "w": 0.4, "h": 0.5, "prompt": "a cat", "label": "cat"},'
    ' {"x": 0.5, "y": 0.2, "w": 0.4, "h": 0.6, "prompt": "a dog", "label": "dog"}]}'
)

# Bad values per widget kind. Lists of length 2 look like links to ComfyUI: ([x] and 3-lists are "bad link").
BAD = {
    "INT": ["abc", None, [1], {"v": 1}, 2**70, -(2**70), math.nan, "1e400", 3.5, True],
    "FLOAT": ["abc", None, [0.5], {"v": 1}, math.nan, math.inf, -math.inf, 1e308, -1e308, "nan"],
    "BOOLEAN": ["yes", None, 2, [True], {"v": 1}],
    "STRING": [
        "",
        " ",
        "x" * 200_001,
        "nul\x00char",
        "\n" * 500,
        "{" * 5000,
        "[" * 5000 + "]" * 5000,
        12345,
        ["a", "b", "c"],
        {"boxes": []},
        "../../etc/passwd",
        "(((((((((((((",
        "<cat1> " * 2000,
    ],
    "COMBO": ["", "nope.pth", 123, None, "../../checkpoints/x.safetensors", "a\nb", "x" * 300, "/etc/passwd"],
}
# Nodes that sample (seconds per accepted value) get one text value per class above instead of all of them:
# empty, blank, overlong, control character, unbalanced weight syntax, not-a-string, token flood.
SAMPLING_NODES = {"MultiConceptMixOfShowRegional", "MultiConceptOMG", "MultiConceptOMGStage1", "MultiConceptOMGGuider",
                  "MultiConceptTrainEDLoRA", "MultiConceptFuseConcepts", "MultiConceptResponseWeightedMix",
                  "MultiConceptConceptConductor",
                  # not sampling, but every accepted text is encoded for every branch/box, in all 16 ED-LoRA layer variants
                  "MultiConceptConceptConductorGuider", "MultiConceptLoRAComposer"}  # fmt: skip
# (not-a-string only as a list: ComfyUI turns 12345 into the text "12345" before the node sees it, which the
# other nodes cover and which here would cost one more sampling run)
BAD_TEXT_SAMPLING = ["", " ", "x" * 200_001, "nul\x00char", "(((((((((((((", ["a", "b", "c"], "<cat1> " * 2000]
# ...and the long ones (an overlong text, a token flood: each an encode of thousands of tokens and a sampling run
# when accepted) on the node's first text widget only: its other text widgets go through the same encoder.
LONG_TEXT = {"x" * 200_001, "<cat1> " * 2000}
# Nodes that encode a concept-word flood twice in all 17 layer variants (minutes on the full-size test CLIP):
# a smaller flood (still several 77-token sections) proves the same.
SHORT_FLOOD_NODES = {"MultiConceptResponseWeightedMix", "MultiConceptConceptConductor",
                     "MultiConceptConceptConductorGuider", "MultiConceptLoRAComposer", "MultiConceptOMGGuider",
                     "MultiConceptOMG", "MultiConceptOMGStage1"}  # fmt: skip
# ...and whole numbers without the values ComfyUI coerces and accepts (3.5 -> 3, True -> 1): those are
# covered by every other node, and here each accepted value costs a sampling or training run.
BAD_INT_SAMPLING = ["abc", None, [1], 2**70, -(2**70), math.nan, "1e400"]


def _kind(spec) -> str | None:
    """The widget kind of an /object_info input spec, or None for a socket (linked) input."""
    t = spec[0]
    if isinstance(t, list):
        return "COMBO"
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if t == "COMBO" or "options" in options:
        return "COMBO"
    if options.get("forceInput"):
        return None
    if t in ("INT", "FLOAT", "BOOLEAN", "STRING"):
        return t
    if t == "MC_REGIONS_EDITOR":  # the region canvas: a JSON string widget
        return "STRING"
    return None


def _providers(ckpt: str) -> dict:
    """Socket type -> (nodes to add, link). Node ids are fixed so graphs stay small and cacheable."""
    return {
        "MODEL": ({"p_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}, ["p_ckpt", 0]),
        "CLIP": ({"p_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}, ["p_ckpt", 1]),
        "VAE": ({"p_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}, ["p_ckpt", 2]),
        "IMAGE": (
            {
                "p_img": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504},
                }
            },
            ["p_img", 0],
        ),
        "REGIONS": (
            {
                "p_reg": {
                    "class_type": "MultiConceptRegions",
                    "inputs": {"width": 64, "height": 64, "regions": REGIONS_JSON},
                }
            },
            ["p_reg", 0],
        ),
        "MASK": (
            {
                "p_reg": {
                    "class_type": "MultiConceptRegions",
                    "inputs": {"width": 64, "height": 64, "regions": REGIONS_JSON},
                }
            },
            ["p_reg", 1],
        ),
        "BBOX": (
            {
                "p_reg": {
                    "class_type": "MultiConceptRegions",
                    "inputs": {"width": 64, "height": 64, "regions": REGIONS_JSON},
                }
            },
            ["p_reg", 2],
        ),
        "SAM_MODEL": ({"p_sam": {"class_type": "MultiConceptSAMLoader", "inputs": {"sam_name": SAM}}}, ["p_sam", 0]),
        "EDLORA_CONCEPT": (
            {
                "p_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                "p_ed": {
                    "class_type": "MultiConceptEDLoRALoader",
                    "inputs": {
                        "model": ["p_ckpt", 0],
                        "clip": ["p_ckpt", 1],
                        "edlora_name": EDLORA,
                        "strength_unet": 0.7,
                        "strength_text": 0.7,
                    },
                },
            },
            ["p_ed", 2],
        ),
        "LATENT": (
            {"p_lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}},
            ["p_lat", 0],
        ),
        "CONDITIONING": (
            {
                "p_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                "p_text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["p_ckpt", 1], "text": "a dog"}},
            },
            ["p_text", 0],
        ),
        "OMG_LAYOUT": (
            {
                "p_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                "p_lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "p_omg1": {
                    "class_type": "MultiConceptOMGStage1",
                    "inputs": {
                        "model": ["p_ckpt", 0],
                        "clip": ["p_ckpt", 1],
                        "vae": ["p_ckpt", 2],
                        "latent_image": ["p_lat", 0],
                        "seed": 0,
                        "steps": 4,
                        "cfg": 5.0,
                        "sampler_name": "euler",
                        "scheduler": "normal",
                        "scene_prompt": "a cat and a dog on a sofa",
                        "negative": "",
                        "start": 0.5,
                    },
                },
            },
            ["p_omg1", 0],
        ),  # fmt: skip
        "GUIDER": (
            {**_LORA_COMPOSER, "p_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}},
            ["p_lc", 0],
        ),  # fmt: skip
        "OPEN_CLIP_MODEL": (
            {
                "p_oc": {
                    "class_type": "MultiConceptOpenCLIPLoader",
                    "inputs": {"clip_name": OPEN_CLIP, "architecture": "auto"},
                }
            },
            ["p_oc", 0],
        ),
        "EVAL_REFERENCES": (
            {
                "p_img": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504},
                },
                "p_refs": {
                    "class_type": "MultiConceptEvalReferences",
                    "inputs": {"label": "cat", "images": ["p_img", 0]},
                },
            },
            ["p_refs", 0],
        ),  # fmt: skip
        "CONCEPT_STACK": (
            {
                "p_stack": {
                    "class_type": "MultiConceptStackEDLoRA",
                    "inputs": {
                        "edlora_name": EDLORA,
                        "strength_unet": 0.7,
                        "strength_text": 0.7,
                        "region_label": "cat",
                    },
                }
            },
            ["p_stack", 0],
        ),
    }


# LoRA-Composer needs the concept's words in its box's prompt
LC_REGIONS = {"p_reg_lc": {"class_type": "MultiConceptRegions",
                           "inputs": {"width": 64, "height": 64, "regions": REGIONS_JSON.replace('"a cat"', '"a <cat1> <cat2> cat"')}}}  # fmt: skip
# A LoRA-Composer guider without latent steps or re-initialisation (the fuzz boxes are too small for them).
_LORA_COMPOSER = {
    **LC_REGIONS,
    "p_stack": {"class_type": "MultiConceptStackEDLoRA",
                "inputs": {"edlora_name": EDLORA, "strength_unet": 0.7, "strength_text": 0.7, "region_label": "cat"}},
    "p_lc": {"class_type": "MultiConceptLoRAComposer",
             "inputs": {"model": ["p_ckpt", 0], "clip": ["p_ckpt", 1], "regions": ["p_reg_lc", 0], "concepts": ["p_stack", 0],
                        "global_prompt": "a cat and a dog", "global_negative": "", "cfg": 5.0, "step_size": 0.0,
                        "reinitialise": False}},
}  # fmt: skip
# Fusion needs two concepts: the ED-LoRA and the LoRA (trigger word "fzdog").
_TWO_CONCEPTS = {
    "p_stack": {"class_type": "MultiConceptStackEDLoRA",
                "inputs": {"edlora_name": EDLORA, "strength_unet": 0.7, "strength_text": 0.7, "region_label": "cat"}},
    "p_stack2": {"class_type": "MultiConceptStackLoRA",
                 "inputs": {"lora_name": LORA, "strength_unet": 1.0, "strength_text": 1.0, "region_label": "dog",
                            "concepts": ["p_stack", 0], "trigger_words": "fzdog"}},
}  # fmt: skip
# Socket inputs that need a particular provider for one node: the maps node reads a guider that sampled.
NODE_LINKS = {
    ("MultiConceptFuseConcepts", "concepts"): (_TWO_CONCEPTS, ["p_stack2", 0]),
    ("MultiConceptLoRAComposer", "regions"): (LC_REGIONS, ["p_reg_lc", 0]),
    ("MultiConceptLoRAComposerAttention", "samples"): (
        {
            **_LORA_COMPOSER,
            "p_noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
            "p_ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "p_sched": {"class_type": "BasicScheduler",
                        "inputs": {"model": ["p_ckpt", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}},
            "p_lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "p_sca": {"class_type": "SamplerCustomAdvanced",
                      "inputs": {"noise": ["p_noise", 0], "guider": ["p_lc", 0], "sampler": ["p_ksel", 0],
                                 "sigmas": ["p_sched", 0], "latent_image": ["p_lat", 0]}},
        },
        ["p_sca", 0],
    ),
}  # fmt: skip

# Valid values for widgets whose default would not run here (file pickers).
GOOD_COMBO = {"edlora_name": EDLORA, "sam_name": SAM, "lora_name": LORA, "fused_name": FUSED, "clip_name": OPEN_CLIP}
# Valid values for text widgets whose default would not run here.
GOOD_TEXT = {
    ("MultiConceptEvalReferences", "label"): "cat",
    ("MultiConceptScoreConcepts", "prompt"): "a photo of a cat",
    ("MultiConceptStackLoRA", "region_label"): "dog",
    ("MultiConceptStackEDLoRA", "region_label"): "cat",
    ("MultiConceptMixOfShowRegional", "global_prompt"): "a cat and a dog on a sofa",
    ("MultiConceptLoRAComposer", "global_prompt"): "a cat and a dog on a sofa",
    ("MultiConceptLoRAComposer", "step_size"): 0.0,  # the fuzz boxes (64 px image) are too small for the losses
    ("MultiConceptLoRAComposer", "reinitialise"): False,
    ("MultiConceptOMG", "scene_prompt"): "a cat and a dog on a sofa",
    ("MultiConceptOMGStage1", "scene_prompt"): "a cat and a dog on a sofa",
    ("MultiConceptOMGModelConcept", "class_word"): "dog",
    ("MultiConceptOMG", "steps"): 2,  # each accepted value samples both stages: keep them short
    ("MultiConceptOMGStage1", "steps"): 2,
    # training: one step on one 64² picture (each accepted value trains)
    ("MultiConceptTrainEDLoRA", "class_word"): "cat",
    ("MultiConceptTrainEDLoRA", "steps"): 1,
    ("MultiConceptTrainEDLoRA", "batch_size"): 1,
    ("MultiConceptTrainEDLoRA", "resolution"): 64,
    ("MultiConceptTrainEDLoRA", "output_name"): "fz_trained",
    # fusion: one recording step at 64², one prompt (each accepted value fuses)
    ("MultiConceptFuseConcepts", "sample_steps"): 1,
    ("MultiConceptFuseConcepts", "sample_size"): 64,
    ("MultiConceptFuseConcepts", "prompt_templates"): "photo of a {}",
    ("MultiConceptFuseConcepts", "save_name"): "fz_fused",
    ("MultiConceptResponseWeightedMix", "prompt"): "a photo of <cat1> <cat2>",
    # Concept Conductor: two steps, few k-means restarts (each accepted value samples)
    ("MultiConceptConceptConductor", "scene_prompt"): "a cat and a dog on a sofa",
    ("MultiConceptConceptConductor", "steps"): 1,  # still aligns (step 1) and runs every branch
    ("MultiConceptConceptConductor", "kmeans_restarts"): 2,
    ("MultiConceptConceptConductor", "alignment_scale"): "per step",  # the default repeats 61x at 1 step
    ("MultiConceptConceptConductorGuider", "scene_prompt"): "a cat and a dog on a sofa",
    ("MultiConceptConceptConductorGuider", "width"): 64,
    ("MultiConceptConceptConductorGuider", "height"): 64,
}
# Optional sockets a node needs one of to run.
OPTIONAL_LINKS = {
    "MultiConceptSAMMasks": ("regions",),
    "MultiConceptOMG": ("regions",),  # the fuzz stack's concept has a region label but no class word
    "MultiConceptOMGGuider": ("regions",),
    "MultiConceptConceptConductor": ("regions",),
    "MultiConceptConceptConductorGuider": ("regions",),
    "MultiConceptLoRAComposer": ("concepts",),  # its box prompt names the concept's words
}


def _base_graph(node_id: str, info: dict, ckpt: str) -> tuple[dict, list[tuple[str, str]]]:
    """A valid prompt around ``node_id`` (as node "n") and the (input, kind) pairs to fuzz."""
    providers = _providers(ckpt)
    prompt: dict = {}
    inputs: dict = {}
    widgets = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            kind = _kind(spec)
            if kind is None:
                if section == "optional" and name not in OPTIONAL_LINKS.get(node_id, ()):
                    continue
                socket = spec[0]
                assert socket in providers, f"{node_id}.{name}: add a provider for socket type {socket} to this test"
                nodes, link = NODE_LINKS.get((node_id, name), providers[socket])
                prompt.update(copy.deepcopy(nodes))
                inputs[name] = link
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if kind == "COMBO":
                choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
                value = GOOD_TEXT.get((node_id, name), GOOD_COMBO.get(name, choices[0] if choices else ""))
            else:
                value = options.get("default", {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}[kind])
                value = GOOD_TEXT.get((node_id, name), value)
            # (an optional combo keeps its default unless set here: GOOD_TEXT's choices must reach the node)
            if section == "required" or kind != "COMBO" or (node_id, name) in GOOD_TEXT:
                inputs[name] = value
            widgets.append((name, kind))
    prompt["n"] = {"class_type": node_id, "inputs": inputs}
    prompt["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["n", 0]}}
    return prompt, widgets


def _plain_pixels(server, ckpt: str, prefix: str) -> np.ndarray:
    from PIL import Image

    entry = server.run(plain_txt2img(ckpt, prefix=prefix), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    item = entry["outputs"]["7"]["images"][0]
    with Image.open(server.output_file(item["filename"], item["subfolder"], item["type"])) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 3, "the plain image is flat: comparing it would prove nothing"
    return pixels


@pytest.fixture(scope="module")
def fuzz_files(comfy_server):
    from tests.support.builders.open_clip import save_tiny_open_clip
    from tests.support.builders.sam import save_tiny_sam

    models = comfy_server.base_dir / "models"
    torch.save(official_edlora(seed=77), models / "loras" / EDLORA)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    gen = torch.Generator().manual_seed(78)
    save_file(
        {f"{prefix}.lora_down.weight": torch.randn(4, 320, generator=gen) * 0.05,
         f"{prefix}.lora_up.weight": torch.randn(320, 4, generator=gen) * 0.05, f"{prefix}.alpha": torch.tensor(4.0)},
        str(models / "loras" / LORA),
    )  # fmt: skip
    save_tiny_sam(models / "sams" / SAM)
    save_tiny_open_clip(models / "open_clip" / OPEN_CLIP, seed=80)
    _save_fused_file(models / "loras" / FUSED)
    return models


def _save_fused_file(path):
    """A fused-concepts file with one concept's words and no weight differences (loads on any SD1.5 model)."""
    from multiconcept.formats.fused import FusedConceptInfo, FusedConcepts, write_fused

    raw = official_edlora(words=("<fz1>", "<fz2>"), seed=79)["params"]["new_concept_embedding"]
    info = FusedConceptInfo("edlora", "fz.pth", ("<fz1>", "<fz2>"), "cat", "cat",
                            embeddings={w: {"l": t} for w, t in raw.items()})  # fmt: skip
    write_fused(FusedConcepts("fz", "sd15", {}, {}, (info,)), path)


def _check_refusal(rejected: PromptRejected, node_id: str, display: str, what: str) -> dict:
    """A refused prompt blames the fuzzed node, without a validation crash, in its own words; returns the
    node errors."""
    body = rejected.body
    assert rejected.status == 400 and isinstance(body, dict), (what, rejected)
    errors = body.get("node_errors") or {}
    ours = errors.get("n")
    assert ours and ours["class_type"] == node_id, (what, body)  # blame lands on the fuzzed node
    for err in ours["errors"]:
        assert not err["type"].startswith("exception_during"), (what, err)
        details = err.get("details", "")
        if err["type"] == "custom_validation_failed":
            text = details.split(" - ", 1)[-1]
            assert display.startswith(text.split(": ", 1)[0]), (what, details)
    return errors


def _check_outcome(server, node_id: str, display: str, prompt: dict, what: str) -> tuple[str, str]:
    """Post one fuzzed prompt; assert the outcome is clean; return "refused", "failed" or "ran", and what the
    node said (the inputs ComfyUI refused, or the error message)."""
    try:
        prompt_id = server.post_prompt(prompt)
    except PromptRejected as rejected:
        errors = _check_refusal(rejected, node_id, display, what)
        refused = [e.get("extra_info", {}).get("input_name", "") for e in errors["n"]["errors"]]
        return "refused", " ".join(refused)
    entry = server.wait(prompt_id, timeout=300)
    status = entry["status"]
    if status["status_str"] == "success":
        return "ran", ""
    failures = [data for event, data in status["messages"] if event == "execution_error"]
    assert len(failures) == 1, (what, status)
    failure = failures[0]
    assert failure["node_id"] == "n" and failure["node_type"] == node_id, (what, failure)
    message = failure["exception_message"].strip()
    prefix = message.split(": ", 1)[0]
    assert display.startswith(prefix) and len(prefix) >= 3, (what, message)
    assert failure["exception_type"].endswith("NodeError"), (what, failure["exception_type"], message)
    assert not what.endswith("baseline"), f"{what} must run, but failed: {message}"
    return "failed", message


# The checkpoint a validation-only request names instead of the real one: ComfyUI refuses the loader, still
# validates every input of the fuzzed node below it (its own errors are reported beside the loader's), and
# runs nothing. Sampling nodes all have the checkpoint loader upstream.
MISSING_CKPT = "fz_missing_so_nothing_runs.safetensors"


def _validate_only(server, node_id: str, display: str, base: dict, changes: dict, what: str) -> str:
    """Whether ComfyUI's validation refuses ``changes`` on the fuzzed node: "refused" (the refusal checked as in
    :func:`_check_outcome`) or "valid" (only the decoy loader is refused). Nothing runs either way."""
    return "valid" if _validate_packed(server, node_id, display, base, changes, what) == set() else "refused"


def _validate_packed(server, node_id: str, display: str, base: dict, changes: dict, what: str) -> set[str] | None:
    """A validation-only request with ``changes`` (several widgets at once): the names of the inputs ComfyUI
    refused (it checks every input and reports each refusal with its input's name; the refusal checked as in
    :func:`_check_outcome`), empty when only the decoy loader is refused, or None when a refusal names no input
    (then the caller validates the widgets one at a time). Nothing runs either way."""
    prompt = copy.deepcopy(base)
    prompt["n"]["inputs"].update(changes)
    loaders = [k for k, node in prompt.items() if node["class_type"] == "CheckpointLoaderSimple"]
    assert loaders, f"{node_id}: a validation-only request needs the checkpoint loader upstream"
    for k in loaders:
        prompt[k]["inputs"]["ckpt_name"] = MISSING_CKPT
    with pytest.raises(PromptRejected) as refused:
        server.post_prompt(prompt)
    errors = refused.value.body.get("node_errors") if isinstance(refused.value.body, dict) else None
    assert errors and set(loaders) <= set(errors), (what, "the decoy loader was not refused", refused.value)
    if "n" not in errors:
        return set()
    _check_refusal(refused.value, node_id, display, what)
    names = [e.get("extra_info", {}).get("input_name") for e in errors["n"]["errors"]]
    return None if not all(names) else set(names)


def _as_comfyui_passes_it(kind: str, value):
    """The value a node receives for a widget input that passed validation: ComfyUI 0.3.64 unwraps
    ``{"__value__": v}`` and converts with int/float/str/bool (execution.validate_inputs)."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    convert = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(kind)
    try:
        return convert(value) if convert else value
    except (TypeError, ValueError, OverflowError):
        return value


def _names(message: str, widget: str) -> bool:
    """Whether a node's error message names ``widget`` ("class_word", or in words: "class word")."""
    return any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", message) for w in {widget, widget.replace("_", " ")})


# Every node of the pack, one test each (so a failure and the durations table name the node). The first test
# checks this list against what the server lists: a new node must be added here.
FUZZED_NODES = [
    "MultiConceptConceptConductor", "MultiConceptConceptConductorGuider", "MultiConceptEDLoRAConvert",
    "MultiConceptEDLoRALoader", "MultiConceptEvalReferences", "MultiConceptFuseConcepts", "MultiConceptLoRAComposer",
    "MultiConceptLoRAComposerAttention", "MultiConceptLoadFusedConcepts", "MultiConceptMixOfShowRegional",
    "MultiConceptOMG", "MultiConceptOMGGuider", "MultiConceptOMGModelConcept", "MultiConceptOMGStage1",
    "MultiConceptOpenCLIPLoader", "MultiConceptScoreConcepts",
    "MultiConceptRegionalLoRA", "MultiConceptRegions", "MultiConceptResponseWeightedMix", "MultiConceptSAMLoader",
    "MultiConceptSAMMasks", "MultiConceptStackEDLoRA", "MultiConceptStackLoRA", "MultiConceptStackLoaded",
    "MultiConceptTrainEDLoRA",
]  # fmt: skip


@pytest.fixture(scope="module")
def plain_before(comfy_server, tiny_checkpoint, fuzz_files):
    """The plain txt2img image before any fuzzing (compared with the one after, in the last test)."""
    return _plain_pixels(comfy_server, tiny_checkpoint, "fuzz_before")


def test_the_fuzzed_nodes_are_every_node_the_server_lists(comfy_server, plain_before):
    ours = {k for k in comfy_server.object_info() if k.startswith("MultiConcept")}
    assert ours == set(FUZZED_NODES), f"add to / remove from FUZZED_NODES: {sorted(ours ^ set(FUZZED_NODES))}"


@pytest.mark.parametrize("node_id", FUZZED_NODES)
def test_node_survives_bad_values(comfy_server, tiny_checkpoint, fuzz_files, plain_before, node_id):
    info = comfy_server.object_info()
    assert node_id in info, f"{node_id} is not listed by the server"
    display = info[node_id]["display_name"]
    base, widgets = _base_graph(node_id, info[node_id], tiny_checkpoint)
    # the untouched graph must run: otherwise every "clean failure" below would prove nothing
    assert _check_outcome(comfy_server, node_id, display, base, f"{node_id} baseline")[0] == "ran"
    counts = {"refused": 0, "failed": 0, "ran": 0}
    first_text = next((name for name, kind in widgets if kind == "STRING"), None)
    cases = []  # (widget, kind, value)
    for name, kind in widgets:
        values = BAD[kind]
        if node_id in SAMPLING_NODES:
            values = {"STRING": BAD_TEXT_SAMPLING, "INT": BAD_INT_SAMPLING}.get(kind, values)
            if name != first_text:
                values = [v for v in values if not (isinstance(v, str) and v in LONG_TEXT)]
        if node_id in SHORT_FLOOD_NODES:
            values = ["<cat1> " * 200 if v == "<cat1> " * 2000 else v for v in values]
        cases += [(name, kind, value) for value in values]

    def post(changes: dict, what: str) -> tuple[str, str]:
        prompt = copy.deepcopy(base)
        prompt["n"]["inputs"].update(changes)
        result = _check_outcome(comfy_server, node_id, display, prompt, what)
        assert comfy_server.get("/system_stats").status_code == 200, what
        return result

    def post_one(name: str, value) -> str:
        outcome = post({name: value}, f"{node_id}.{name} = {value!r:.60}")[0]
        counts[outcome] += 1
        return outcome

    if node_id not in SAMPLING_NODES:  # one prompt per value: each costs milliseconds
        for name, _kind, value in cases:
            post_one(name, value)
    else:
        # A value ComfyUI refuses is found by a validation-only request. The others are packed: each run gives
        # every widget with a value still to try its next one, all in one prompt; when that fails (quickly, at the
        # node's checks), the widget the message names is tried alone and the others together again. So a value
        # ComfyUI refuses never runs, and a sampling run covers one accepted value of every widget at once.
        # Validation is packed the same way: request r carries the r-th value of every widget, and ComfyUI names
        # each input it refuses (a refusal naming none sends that request's widgets through one at a time).
        by_widget: dict[str, list[tuple]] = {}
        for name, kind, value in cases:
            by_widget.setdefault(name, []).append((kind, value))
        accepted = []
        for r in range(max((len(v) for v in by_widget.values()), default=0)):
            batch = {name: values[r] for name, values in by_widget.items() if r < len(values)}
            shown = ", ".join(f"{name}={value!r:.20}" for name, (_k, value) in batch.items())
            refused = _validate_packed(comfy_server, node_id, display, base,
                                       {name: value for name, (_k, value) in batch.items()}, f"{node_id}.{{{shown}}}"[:300])  # fmt: skip
            for name, (kind, value) in batch.items():
                what = f"{node_id}.{name} = {value!r:.60}"
                if refused is None:
                    is_refused = _validate_only(comfy_server, node_id, display, base, {name: value}, what) == "refused"
                else:
                    is_refused = name in refused
                if is_refused:
                    counts["refused"] += 1
                else:
                    accepted.append((name, kind, value))
        queues: dict[str, list[tuple]] = {}  # widget -> [(key, value as posted)] still to run
        covered: list[tuple] = []  # (widget, key): the node gets what a run below gives it
        for name, kind, value in accepted:
            key = (kind, repr(_as_comfyui_passes_it(kind, value)))
            given = base["n"]["inputs"]  # (an optional input left out is not the same as one given as None)
            if name in given and key == (kind, repr(_as_comfyui_passes_it(kind, given[name]))):
                counts["ran"] += 1  # ComfyUI turns it into the baseline's own value ("yes" -> True): ran above
            elif any(k == key for k, _v in queues.get(name, [])):
                covered.append((name, key))  # e.g. 2 after "yes": both reach the node as True
            else:
                queues.setdefault(name, []).append((key, value))
        outcomes: dict[tuple, str] = {}
        while any(queues.values()):
            pending = {name: q.pop(0) for name, q in queues.items() if q}  # widget -> (key, value)
            while len(pending) > 1:
                changes = {name: value for name, (_key, value) in pending.items()}
                shown = ", ".join(f"{name}={value!r:.20}" for name, value in changes.items())
                outcome, said = post(changes, f"{node_id}.{{{shown}}}"[:300])
                if outcome == "ran":
                    outcomes.update({(name, key): "ran" for name, (key, _v) in pending.items()})
                    counts["ran"] += len(pending)
                    pending = {}
                    break
                named = [n for n in pending if _names(said, n)]
                for name in named or list(pending):  # nothing named: each alone
                    key, value = pending.pop(name)
                    outcomes[name, key] = post_one(name, value)
            for name, (key, value) in pending.items():
                outcomes[name, key] = post_one(name, value)
        for name_key in covered:
            counts[outcomes[name_key]] += 1
    assert not widgets or counts["refused"] + counts["failed"] > 0, (node_id, counts)
    print(f"fuzz outcomes of {node_id}:", counts)


def test_plain_sampling_is_unchanged_after_the_fuzzing(comfy_server, tiny_checkpoint, plain_before):
    after = _plain_pixels(comfy_server, tiny_checkpoint, "fuzz_after")
    assert np.array_equal(plain_before, after), "a plain prompt gives another image after the fuzzing"
