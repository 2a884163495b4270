"""The shipped fusion workflow (two ED-LoRA concepts -> Fuse Concepts -> Mix-of-Show Regional -> KSampler) runs
end to end on a real server, saves the fused file, and loads from the template browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.builders.edlora import official_edlora
from tests.support.server import PACK_DIR_NAME
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "fusion_two_concepts.json"
W, H = 128, 96  # the test size (the workflow's own is 768x512: same boxes, as fractions of the image)
CKPT, MAN, DOG, FUSE, REGIONS, REGIONAL, LATENT, SAMPLER = "1", "2", "3", "4", "5", "6", "7", "8"
SAVE, BOXES, RESIDUALS, REPORT = "10", "11", "12", "13"


@pytest.fixture(scope="module")
def server_edloras(comfy_server):
    d = Path(comfy_server.base_dir) / "models" / "loras"
    d.mkdir(parents=True, exist_ok=True)
    names = {}
    for key, words, seed in ((MAN, ("<potter1>", "<potter2>"), 71), (DOG, ("<dog1>", "<dog2>"), 72)):
        name = f"e2e_fu_{words[0].strip('<>1')}.pth"
        torch.save(official_edlora(words=words, seed=seed, lora_scale=0.2), d / name)
        names[key] = name
    return names


def test_fusion_workflow_runs_end_to_end(comfy_server, tiny_checkpoint, server_edloras):
    loras = Path(comfy_server.base_dir) / "models" / "loras"
    before = {p.name for p in loras.iterdir()}
    workflow = json.loads(WORKFLOW.read_text())
    small = {"width": W, "height": H}
    prompt = workflow_to_api(
        workflow,
        comfy_server.object_info(),
        overrides={
            CKPT: {"ckpt_name": tiny_checkpoint},
            MAN: {"edlora_name": server_edloras[MAN]},
            DOG: {"edlora_name": server_edloras[DOG]},
            FUSE: {"sample_steps": 2, "sample_size": 64, "save_name": "e2e_fused"},
            REGIONS: dict(small),
            LATENT: dict(small),
            SAMPLER: {"steps": 4},
            SAVE: {"filename_prefix": "fusion_two_concepts"},
        },
    )
    # the graph is what the workflow promises
    fuse = prompt[FUSE]["inputs"]
    assert fuse["solver"] == "closed form" and fuse["concepts"] == [DOG, 0] and fuse["model"] == [CKPT, 0]
    regional = prompt[REGIONAL]["inputs"]
    assert regional["model"] == [FUSE, 0] and regional["clip"] == [FUSE, 1] and regional["concepts"] == [FUSE, 2]
    assert prompt[SAMPLER]["inputs"]["model"] == [REGIONAL, 0]
    boxes = json.loads(prompt[REGIONS]["inputs"]["regions"])["boxes"]
    for box, node in zip(boxes, (MAN, DOG), strict=True):
        assert prompt[node]["inputs"]["region_label"] == box["label"]
        assert prompt[node]["inputs"]["concept_words"] in box["prompt"]

    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = comfy_server.output_image(entry, SAVE)
    assert image.shape == (H, W, 3) and image.std() > 5, image.std()
    residuals = comfy_server.output_image(entry, RESIDUALS)
    assert residuals.std() > 5
    report = entry["outputs"][REPORT]["text"][0]
    assert "e2e_fused.safetensors" in report and "plain sum" in report
    assert {p.name for p in loras.iterdir()} - before == {"e2e_fused.safetensors"}

    # the saved file loads back through Load Fused Concepts into the same regional graph
    prompt.pop(FUSE)
    prompt["load"] = {
        "class_type": "MultiConceptLoadFusedConcepts",
        "inputs": {"fused_name": "e2e_fused.safetensors", "model": [CKPT, 0], "clip": [CKPT, 1]},
    }
    prompt[REGIONAL]["inputs"].update(model=["load", 0], clip=["load", 1], concepts=["load", 2])
    for node in (RESIDUALS, REPORT):
        prompt.pop(node)
    again = comfy_server.run(prompt, timeout=600)
    assert again["status"]["status_str"] == "success", again["status"]
    reloaded = comfy_server.output_image(again, SAVE)
    assert np.array_equal(reloaded, image)  # identical weights and words: identical picture


def test_fusion_workflow_is_a_template(comfy_server):
    served = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/fusion_two_concepts.json")
    assert served.status_code == 200 and served.json()["nodes"]
    thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/fusion_two_concepts.jpg")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
