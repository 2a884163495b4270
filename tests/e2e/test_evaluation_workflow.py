"""The shipped evaluation workflow (the Mix-of-Show two-concept picture, scored by Score Concepts against a
reference picture per concept on each concept's box) runs end to end on a real server: a table with a row per
concept and a chart; a reference label that matches no box is refused by name and the server goes on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.builders.edlora import official_edlora
from tests.support.builders.open_clip import save_tiny_open_clip
from tests.support.workflow_api import workflow_to_api

pytestmark = pytest.mark.e2e

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "evaluation_scores.json"
W, H = 128, 96  # the test size (the workflow's own is 768x512: same boxes, as fractions of the image)
CKPT, MAN, DOG, REGIONS, LATENT, SAMPLER, SAVE = "1", "2", "3", "4", "6", "7", "9"
OPEN_CLIP, REF_MAN_IMAGE, REF_DOG_IMAGE, REF_MAN, REF_DOG, SCORE, CHART = (str(i) for i in range(12, 19))
OC = "e2e_tiny_oc.safetensors"


@pytest.fixture(scope="module")
def server_files(comfy_server):
    base = Path(comfy_server.base_dir)
    names = {}
    for key, words, seed in ((MAN, ("<potter1>", "<potter2>"), 91), (DOG, ("<dog1>", "<dog2>"), 92)):
        name = f"e2e_ev_{words[0].strip('<>1')}.pth"
        torch.save(official_edlora(words=words, seed=seed, lora_scale=0.08), base / "models" / "loras" / name)
        names[key] = name
    save_tiny_open_clip(base / "models" / "open_clip" / OC, seed=9)
    rng = np.random.default_rng(0)
    for key, size in ((REF_MAN_IMAGE, (40, 64)), (REF_DOG_IMAGE, (48, 48))):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        names[key] = f"e2e_ref_{key}.png"
        Image.fromarray(pixels).save(base / "input" / names[key])
    return names


def _prompt(comfy_server, tiny_checkpoint, files) -> dict:
    small = {"width": W, "height": H}
    return workflow_to_api(
        json.loads(WORKFLOW.read_text()),
        comfy_server.object_info(),
        overrides={
            CKPT: {"ckpt_name": tiny_checkpoint},
            MAN: {"edlora_name": files[MAN]},
            DOG: {"edlora_name": files[DOG]},
            REGIONS: dict(small),
            LATENT: dict(small),
            SAMPLER: {"steps": 3},
            SAVE: {"filename_prefix": "evaluation_scores"},
            OPEN_CLIP: {"clip_name": OC, "architecture": "auto"},
            REF_MAN_IMAGE: {"image": files[REF_MAN_IMAGE]},
            REF_DOG_IMAGE: {"image": files[REF_DOG_IMAGE]},
        },
    )


def test_evaluation_workflow_scores_the_picture_per_concept(comfy_server, tiny_checkpoint, server_files):
    prompt = _prompt(comfy_server, tiny_checkpoint, server_files)
    score = prompt[SCORE]["inputs"]
    assert score["images"] == ["8", 0] and score["regions"] == [REGIONS, 0] and score["concepts"] == [DOG, 0]
    assert score["references"] == [REF_DOG, 0] and prompt[REF_DOG]["inputs"]["references"] == [REF_MAN, 0]
    assert [prompt[REF_MAN]["inputs"]["label"], prompt[REF_DOG]["inputs"]["label"]] == ["man", "dog"]

    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    picture = comfy_server.output_image(entry, SAVE)
    assert picture.shape == (H, W, 3) and picture.std() > 5  # a picture with range was scored
    table = entry["outputs"][SCORE]["text"][0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| Mix-of-Show |")]
    assert [r[1].strip() for r in rows] == ["man", "dog", "**mean**"]
    values = [float(r[2].strip(" *")) for r in rows]  # CLIP-I x100
    assert all(-100 <= v <= 100 for v in values) and values[2] == pytest.approx((values[0] + values[1]) / 2, abs=0.02)
    assert 'CLIP-T text "a photo of a man and a dog in a garden, sunny day, best quality"' in table
    chart = comfy_server.output_image(entry, CHART)
    assert chart.shape == (400, 768, 3) and chart.std() > 10


def test_a_reference_without_a_box_is_refused_and_the_server_goes_on(comfy_server, tiny_checkpoint, server_files):
    prompt = _prompt(comfy_server, tiny_checkpoint, server_files)
    prompt[REF_DOG]["inputs"]["label"] = "cat"
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "error"
    error = next(m for kind, m in entry["status"]["messages"] if kind == "execution_error")
    assert error["node_id"] == SCORE and error["exception_message"].startswith("Score Concepts: ")
    assert "the concept 'dog' has no references" in error["exception_message"]
    good = _prompt(comfy_server, tiny_checkpoint, server_files)
    good[SCORE]["inputs"]["run_name"] = "again"
    assert comfy_server.run(good, timeout=300)["status"]["status_str"] == "success"
