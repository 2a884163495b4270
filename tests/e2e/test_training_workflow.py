"""The shipped training workflow (pictures from a folder -> SAM masks -> Train ED-LoRA -> KSampler with the new
concept) runs end to end on a real server, saves the concept where the loaders find it, and a cancelled run
leaves a resume state that a second prompt continues."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.builders.sam import save_tiny_sam
from tests.support.server import PACK_DIR_NAME
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "edlora_training.json"
CKPT, IMAGES, REGIONS, SAM, MASKS, TRAIN, POS, NEG, LATENT, SAMPLER, DECODE, SAVE, CURVE = (
    str(i) for i in range(1, 14)
)
RES = 64


@pytest.fixture(scope="module")
def server_files(comfy_server):
    from PIL import Image

    from tests.integration.test_training import pictures

    base = Path(comfy_server.base_dir)
    (base / "models" / "sams").mkdir(parents=True, exist_ok=True)
    save_tiny_sam(base / "models" / "sams" / "e2e_train_sam.pth")
    folder = base / "input" / "e2e_cat"
    folder.mkdir(parents=True, exist_ok=True)
    imgs, _ = pictures(size=96)
    for i in range(imgs.shape[0]):
        Image.fromarray((imgs[i].numpy() * 255).astype(np.uint8)).save(folder / f"cat_{i}.png")
    return {"sam": "e2e_train_sam.pth", "folder": "e2e_cat"}


def _prompt(comfy_server, tiny_checkpoint, files, name) -> dict:
    workflow = json.loads(WORKFLOW.read_text())
    return workflow_to_api(
        workflow,
        comfy_server.object_info(),
        overrides={
            CKPT: {"ckpt_name": tiny_checkpoint},
            IMAGES: {"folder": files["folder"]},
            SAM: {"sam_name": files["sam"]},
            # (one preview strength, not the workflow's three: each is a sampling run; the node test covers three)
            TRAIN: {
                "steps": 2,
                "resolution": RES,
                "batch_size": 1,
                "output_name": name,
                "preview_every": 1,
                "preview_strengths": "1.0",
            },
            LATENT: {"width": RES, "height": RES},
            SAMPLER: {"steps": 4},
            SAVE: {"filename_prefix": name},
        },
    )


def test_training_workflow_trains_saves_and_samples_the_concept(comfy_server, tiny_checkpoint, server_files):
    prompt = _prompt(comfy_server, tiny_checkpoint, server_files, "e2e_cat")
    train = prompt[TRAIN]["inputs"]
    assert train["masks"] == [MASKS, 0] and train["images"] == [IMAGES, 0] and train["class_word"] == "cat"
    assert "<TOK>" in train["captions"] and prompt[POS]["inputs"]["clip"] == [TRAIN, 1]

    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image, curve = comfy_server.output_image(entry, SAVE), comfy_server.output_image(entry, CURVE)
    assert image.shape == (RES, RES, 3) and image.std() > 3, image.std()
    assert curve.std() > 5
    saved = Path(comfy_server.base_dir) / "models" / "loras" / "e2e_cat.safetensors"
    assert saved.is_file()
    text = "\n".join(entry["outputs"][TRAIN].get("text", []))
    assert "e2e_cat.safetensors" in text and "<mycat1> <mycat2>" in text
    state = Path(comfy_server.base_dir) / "output" / "edlora_training" / "e2e_cat.state.safetensors"
    assert state.is_file()

    # the node lists the state; resuming it with more steps continues the run (and saves under a new name)
    info = comfy_server.object_info()["MultiConceptTrainEDLoRA"]["input"]["optional"]["resume"]
    options = info[0] if isinstance(info[0], list) else info[1].get("options", [])
    assert "e2e_cat.state.safetensors" in options
    more = json.loads(json.dumps(prompt))
    more[TRAIN]["inputs"].update(steps=3, resume="e2e_cat.state.safetensors")
    more[SAVE]["inputs"]["filename_prefix"] = "e2e_cat_more"
    entry = comfy_server.run(more, timeout=900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (Path(comfy_server.base_dir) / "models" / "loras" / "e2e_cat_2.safetensors").is_file()
    assert saved.is_file()


def test_training_workflow_is_a_template(comfy_server):
    templates = comfy_server.get("/workflow_templates").json()
    assert "edlora_training" in templates.get(PACK_DIR_NAME, [])
