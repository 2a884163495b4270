"""The shipped Concept Conductor workflow (two ED-LoRA concepts placed by a Regions node -> Concept Conductor
Sampler -> VAE Decode -> Save Image, the final masks previewed) runs end to end on a real server and changes
the plain picture; the Concept Conductor Guider runs in a SamplerCustomAdvanced graph; a stack whose boxes do
not match its concepts is refused by name and the server goes on serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.builders.edlora import official_edlora
from tests.support.graphs import plain_txt2img
from tests.support.server import PACK_DIR_NAME
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "concept_conductor_two_concepts.json"
W, H = 64, 64  # the test size (the workflow's own is 512x512: same boxes, as fractions of the image)
STEPS, KMEANS = 4, 4
GUIDER_STEPS = 2  # still aligns and refines the masks at both steps
CKPT, MAN, DOG, REGIONS, LATENT, CONDUCTOR, DECODE, SAVE, PREVIEW = (str(i) for i in range(1, 10))


@pytest.fixture(scope="module")
def server_edloras(comfy_server):
    d = Path(comfy_server.base_dir) / "models" / "loras"
    d.mkdir(parents=True, exist_ok=True)
    names = {}
    for key, words, seed in ((MAN, ("<potter1>", "<potter2>"), 81), (DOG, ("<dog1>", "<dog2>"), 82)):
        name = f"e2e_cc_{words[0].strip('<>1')}.pth"
        torch.save(official_edlora(words=words, seed=seed, lora_scale=0.08), d / name)
        names[key] = name
    return names


def _prompt(comfy_server, tiny_checkpoint, edloras) -> dict:
    small = {"width": W, "height": H}
    return workflow_to_api(
        json.loads(WORKFLOW.read_text()),
        comfy_server.object_info(),
        overrides={
            CKPT: {"ckpt_name": tiny_checkpoint},
            MAN: {"edlora_name": edloras[MAN]},
            DOG: {"edlora_name": edloras[DOG]},
            REGIONS: dict(small),
            LATENT: dict(small),
            CONDUCTOR: {"steps": STEPS, "kmeans_restarts": KMEANS, "alignment_scale": "per step"},
            SAVE: {"filename_prefix": "concept_conductor_two_concepts"},
        },
    )


def _has_range(image: np.ndarray, what: str) -> None:
    assert image.shape == (H, W, 3), (what, image.shape)
    assert np.isfinite(image).all(), what
    assert image.std() > 5, f"{what} is flat: std {image.std():.2f}"


def _execution_error(entry) -> dict:
    errors = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, entry["status"]
    return errors[0]


def _plain(tiny_checkpoint, conductor: dict, prefix: str) -> dict:
    """Plain txt2img of the conductor's scene prompt, negative, seed, steps and cfg, at the test size."""
    plain = plain_txt2img(
        tiny_checkpoint,
        positive=conductor["scene_prompt"],
        negative=conductor["negative"],
        seed=conductor["noise_seed"],
        steps=conductor["steps"],
        cfg=conductor["cfg"],
        prefix=prefix,
    )
    plain["4"]["inputs"].update(width=W, height=H)
    return plain


def test_concept_conductor_workflow_runs_end_to_end(comfy_server, tiny_checkpoint, server_edloras):
    prompt = _prompt(comfy_server, tiny_checkpoint, server_edloras)
    # the graph is what the workflow promises
    conductor = prompt[CONDUCTOR]["inputs"]
    assert conductor["concepts"] == [DOG, 0] and conductor["regions"] == [REGIONS, 0]
    assert conductor["model"] == [CKPT, 0] and conductor["latent_image"] == [LATENT, 0]
    assert conductor["sampler_name"] == "euler" and conductor["scheduler"] == "normal" and conductor["cfg"] == 7.5
    assert conductor["scene_prompt"] == "a photo of a man and a dog in a park" and conductor["shape_masks"] is True
    assert prompt[DECODE]["inputs"]["samples"] == [CONDUCTOR, 0]
    assert prompt[PREVIEW]["inputs"]["images"] == [CONDUCTOR, 2]  # the final masks over the picture
    boxes = json.loads(prompt[REGIONS]["inputs"]["regions"])["boxes"]
    assert [b["label"] for b in boxes] == [prompt[n]["inputs"]["region_label"] for n in (MAN, DOG)] == ["man", "dog"]
    for node in (MAN, DOG):
        assert f" {prompt[node]['inputs']['class_word']} " in conductor["scene_prompt"]

    log_start = len(comfy_server.log_path.read_text(errors="replace"))
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = comfy_server.output_image(entry, SAVE)
    _has_range(image, "the Concept Conductor picture")
    preview = comfy_server.output_image(entry, PREVIEW)
    _has_range(preview, "the mask preview")

    entry = comfy_server.run(_plain(tiny_checkpoint, conductor, "concept_conductor_plain"), timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    plain = comfy_server.output_image(entry, "7")
    _has_range(plain, "the plain picture")
    diff = np.abs(image - plain).mean()
    assert diff > 2, f"the concepts must change the plain picture of the same seed: mean |diff| {diff:.2f}"
    # the preview is the masks tinted over the picture: not the picture itself
    tint = np.abs(preview - image).mean()
    assert tint > 2, f"the preview shows no masks: mean |preview - picture| {tint:.2f}"

    # a NaN anywhere in a saved picture makes numpy warn when SaveImage casts it to uint8
    log = comfy_server.log_path.read_text(errors="replace")[log_start:]
    assert "invalid value encountered" not in log, log
    print(f"concept conductor: |out-plain| {diff:.2f}, |preview-out| {tint:.2f}, std out {image.std():.2f}")


def _stack(edlora: str, label: str, concepts=None) -> dict:
    """A Concept Stack: ED-LoRA node whose region label and class word are both ``label``."""
    inputs = {
        "edlora_name": edlora,
        "strength_unet": 0.7,
        "strength_text": 0.7,
        "region_label": label,
        "class_word": label,
    }
    if concepts is not None:
        inputs["concepts"] = concepts
    return {"class_type": "MultiConceptStackEDLoRA", "inputs": inputs}


def _guider_prompt(tiny_checkpoint, edloras, regions: str) -> dict:
    """By hand: Concept Conductor Guider + RandomNoise + KSamplerSelect + BasicScheduler -> SamplerCustomAdvanced."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": _stack(edloras[MAN], "man"),
        "3": _stack(edloras[DOG], "dog", concepts=["2", 0]),
        "4": {"class_type": "MultiConceptRegions", "inputs": {"width": W, "height": H, "regions": regions}},
        "5": {
            "class_type": "MultiConceptConceptConductorGuider",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "cfg": 7.5,
                "width": W,
                "height": H,
                "concepts": ["3", 0],
                "scene_prompt": "a photo of a man and a dog in a park",
                "negative": "lowres, blurry",
                "regions": ["4", 0],
                "kmeans_restarts": KMEANS,
                "alignment_scale": "per step",  # the default repeats the alignment 30x at 2 steps
            },
        },
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": GUIDER_STEPS, "denoise": 1.0},
        },
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "10": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["6", 0],
                "guider": ["5", 0],
                "sampler": ["7", 0],
                "sigmas": ["8", 0],
                "latent_image": ["9", 0],
            },
        },
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {
            "class_type": "SaveImage",
            "inputs": {"images": ["11", 0], "filename_prefix": "concept_conductor_guider"},
        },
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
    }


def _workflow_regions() -> str:
    workflow = json.loads(WORKFLOW.read_text())
    return next(n for n in workflow["nodes"] if n["type"] == "MultiConceptRegions")["widgets_values"][2]


def test_concept_conductor_guider_with_sampler_custom_advanced(comfy_server, tiny_checkpoint, server_edloras):
    entry = comfy_server.run(_guider_prompt(tiny_checkpoint, server_edloras, _workflow_regions()), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    _has_range(comfy_server.output_image(entry, "12"), "the SamplerCustomAdvanced picture")
    _has_range(comfy_server.output_image(entry, "13"), "the guider's starting-mask preview")


def test_boxes_that_do_not_match_the_concepts_are_refused_then_the_server_serves(
    comfy_server, tiny_checkpoint, server_edloras
):
    regions = json.loads(_workflow_regions())
    regions["boxes"] = regions["boxes"][:1]  # only the man's box for the man and the dog
    one_box = json.dumps(regions)

    # the workflow's sampler with regions: the dog finds no box labelled 'dog'
    prompt = _prompt(comfy_server, tiny_checkpoint, server_edloras)
    prompt[REGIONS]["inputs"]["regions"] = one_box
    error = _execution_error(comfy_server.run(prompt, timeout=120))
    message = error["exception_message"]
    assert error["node_type"] == "MultiConceptConceptConductor"
    assert message.startswith("Concept Conductor Sampler: concept 2 ("), message
    assert "labelled 'dog', but no region has that label" in message and "Region labels: " in message
    assert "Rename the box or the concept's region_label so they match" in message

    # the guider fed the one box's masks instead: one mask for two concepts
    guider = _guider_prompt(tiny_checkpoint, server_edloras, one_box)
    inputs = guider["5"]["inputs"]
    del inputs["regions"]
    inputs["masks"] = ["4", 1]
    error = _execution_error(comfy_server.run(guider, timeout=120))
    message = error["exception_message"]
    assert error["node_type"] == "MultiConceptConceptConductorGuider"
    assert message.startswith("Concept Conductor Guider: 1 mask(s) for 2 concept(s)"), message
    assert "give exactly one mask (or labelled box) per concept, in stack order" in message

    entry = comfy_server.run(plain_txt2img(tiny_checkpoint, prefix="concept_conductor_after_error"), timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = comfy_server.output_image(entry, "7")
    assert np.isfinite(image).all() and image.std() > 5, image.std()


def test_concept_conductor_workflow_is_a_template(comfy_server):
    served = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/concept_conductor_two_concepts.json")
    assert served.status_code == 200 and served.json()["nodes"]
    thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/concept_conductor_two_concepts.jpg")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
