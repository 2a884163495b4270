"""The shipped OMG workflow (two ED-LoRA concepts, automatic masks refined by SAM, stage 1 and stage 2 in
one node) runs end to end on a real server; the concepts change the picture only where their masks are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.builders.edlora import official_edlora
from tests.support.builders.sam import save_tiny_sam
from tests.support.server import PACK_DIR_NAME
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "omg_two_concepts.json"
W, H = 128, 96  # the test size (the workflow's own is 768x512)
CKPT, MAN, DOG, SAM, LATENT, OMG, DECODE, SAVE, PREVIEW, DECODE1, STAGE1 = (str(i) for i in range(1, 12))


@pytest.fixture(scope="module")
def server_files(comfy_server):
    base = Path(comfy_server.base_dir) / "models"
    (base / "loras").mkdir(parents=True, exist_ok=True)
    (base / "sams").mkdir(parents=True, exist_ok=True)
    names = {}
    for key, words, seed in ((MAN, ("<potter1>", "<potter2>"), 61), (DOG, ("<dog1>", "<dog2>"), 62)):
        name = f"e2e_omg_{words[0].strip('<>1')}.pth"
        torch.save(official_edlora(words=words, seed=seed, lora_scale=0.08), base / "loras" / name)
        names[key] = name
    save_tiny_sam(base / "sams" / "e2e_omg_sam.pth")
    names[SAM] = "e2e_omg_sam.pth"
    return names


def _prompt(comfy_server, tiny_checkpoint, files) -> dict:
    workflow = json.loads(WORKFLOW.read_text())
    return workflow_to_api(
        workflow,
        comfy_server.object_info(),
        overrides={
            CKPT: {"ckpt_name": tiny_checkpoint},
            MAN: {"edlora_name": files[MAN]},
            DOG: {"edlora_name": files[DOG]},
            SAM: {"sam_name": files[SAM]},
            LATENT: {"width": W, "height": H},
            OMG: {"steps": 6},
            SAVE: {"filename_prefix": "omg_two_concepts"},
        },
    )


def test_omg_workflow_runs_stage_one_masks_and_stage_two(comfy_server, tiny_checkpoint, server_files):
    prompt = _prompt(comfy_server, tiny_checkpoint, server_files)
    omg = prompt[OMG]["inputs"]
    assert omg["concepts"] == [DOG, 0] and omg["sam"] == [SAM, 0] and omg.get("regions") is None
    assert "<" not in omg["scene_prompt"] and " man " in omg["scene_prompt"] and " dog " in omg["scene_prompt"]
    assert prompt[MAN]["inputs"]["class_word"] == "man" and prompt[DOG]["inputs"]["class_word"] == "dog"

    entry = comfy_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    final, stage1 = comfy_server.output_image(entry, SAVE), comfy_server.output_image(entry, STAGE1)
    preview = comfy_server.output_image(entry, PREVIEW)
    for image in (final, stage1, preview):
        assert image.shape == (H, W, 3) and image.std() > 5, image.std()
    diff = np.abs(final - stage1).mean(axis=2)
    assert diff.mean() > 2, f"the concepts must change the picture: {diff.mean():.2f}"

    # the same graph once more with the concepts at strength 0 and the scene prompt as their prompts: stage 2
    # then predicts what stage 1 did everywhere, and the picture is stage 1's
    off = json.loads(json.dumps(prompt))
    for node in (MAN, DOG):
        off[node]["inputs"].update(strength_unet=0.0, strength_text=0.0)
    scene = omg["scene_prompt"]
    off[OMG]["inputs"]["concept_prompts"] = f"man: {scene}\ndog: {scene}"
    off[SAVE]["inputs"]["filename_prefix"] = "omg_concepts_off"
    entry = comfy_server.run(off, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    same = np.abs(comfy_server.output_image(entry, SAVE) - comfy_server.output_image(entry, STAGE1)).mean()
    assert same < 0.5, f"with every concept off, stage 2 must reproduce stage 1: {same:.2f}"


def test_omg_workflow_is_a_template(comfy_server):
    templates = comfy_server.get("/workflow_templates").json()
    assert "omg_two_concepts" in templates.get(PACK_DIR_NAME, [])
    thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/omg_two_concepts.jpg")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
