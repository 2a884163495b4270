"""The shipped LoRA-Composer workflow (two ED-LoRA concepts, two boxes, the LoRA-Composer Guider driving a
stock SamplerCustomAdvanced, the attention-map picture) runs end to end on a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.builders.edlora import official_edlora
from tests.support.server import PACK_DIR_NAME
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "lora_composer_two_concepts.json"
W, H = 256, 192  # the test size (the workflow's own is 768x512: same boxes, as fractions of the image)
CKPT, MAN, DOG, REGIONS, COMPOSER, LATENT, NOISE, SAMPLER, SCHEDULER, SAMPLE = (
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
)
SAVE, BOXES, MAPS, MAPS_PREVIEW = "12", "13", "14", "15"


@pytest.fixture(scope="module")
def server_edloras(comfy_server):
    d = Path(comfy_server.base_dir) / "models" / "loras"
    d.mkdir(parents=True, exist_ok=True)
    names = {}
    for key, words, seed in ((MAN, ("<potter1>", "<potter2>"), 61), (DOG, ("<dog1>", "<dog2>"), 62)):
        name = f"e2e_lc_{words[0].strip('<>1')}.pth"
        torch.save(official_edlora(words=words, seed=seed, lora_scale=0.05), d / name)
        names[key] = name
    return names


def test_lora_composer_workflow_runs_end_to_end(comfy_server, tiny_checkpoint, server_edloras):
    workflow = json.loads(WORKFLOW.read_text())
    small = {"width": W, "height": H}
    prompt = workflow_to_api(
        workflow,
        comfy_server.object_info(),
        overrides={
            CKPT: {"ckpt_name": tiny_checkpoint},
            MAN: {"edlora_name": server_edloras[MAN]},
            DOG: {"edlora_name": server_edloras[DOG]},
            REGIONS: dict(small),
            LATENT: dict(small),
            SCHEDULER: {"steps": 4},
            SAVE: {"filename_prefix": "lora_composer_two_concepts"},
        },
    )
    # the graph is what the workflow promises
    boxes = json.loads(prompt[REGIONS]["inputs"]["regions"])["boxes"]
    for box, node in zip(boxes, (MAN, DOG), strict=True):
        assert prompt[node]["inputs"]["region_label"] == box["label"]
        assert prompt[node]["inputs"]["concept_words"] in box["prompt"]
    lc = prompt[COMPOSER]["inputs"]
    assert lc["concepts"] == [DOG, 0] and lc["regions"] == [REGIONS, 0] and lc["model"] == [CKPT, 0]
    assert (lc["enhancement"], lc["fill"], lc["region"], lc["step_size"], lc["refine_until"]) == (
        8.0,
        2.0,
        10.0,
        20.0,
        0.5,
    )
    assert lc["isolation"] and lc["reinitialise"] and lc["stop_when_loss_rises"]
    # the official sampler: DPM-Solver multistep (region_lora_sample.py:173), 50 steps (:23, here 4)
    assert prompt[SAMPLE]["inputs"]["guider"] == [COMPOSER, 0]
    assert (
        prompt[SAMPLER]["inputs"]["sampler_name"] == "dpmpp_2m" and lc["lora_layers"] == "cross-attention k, v and out"
    )
    assert prompt[MAPS]["inputs"]["samples"] == [SAMPLE, 0]

    entry = comfy_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = comfy_server.output_image(entry, SAVE)
    assert image.shape == (H, W, 3) and image.std() > 5, image.std()
    maps = comfy_server.output_image(entry, MAPS_PREVIEW)
    assert maps.shape[1] == 2 * 256 and maps.std() > 5  # two concepts side by side
    boxes_preview = comfy_server.output_image(entry, BOXES)
    assert boxes_preview.shape == (H, W, 3)


def test_lora_composer_workflow_is_a_template(comfy_server):
    served = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/lora_composer_two_concepts.json")
    assert served.status_code == 200 and served.json()["nodes"]
    thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/lora_composer_two_concepts.jpg")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
