"""The shipped Regional LoRA workflow (two ordinary LoRAs, two boxes) runs end to end on a real server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from tests.support.server import PACK_DIR_NAME
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "regional_lora.json"


@pytest.fixture(scope="module")
def server_loras(comfy_server, comfy, tiny_models):
    from tests.support.builders.lora import SD15_ALL, make_lora

    model = tiny_models[0]
    d = Path(comfy_server.base_dir) / "models" / "loras"
    names = []
    for i, name in enumerate(("e2e_left.safetensors", "e2e_right.safetensors")):
        save_file(make_lora(model, SD15_ALL, seed=40 + i, scale=0.6), str(d / name))
        names.append(name)
    return names


def test_regional_lora_workflow_runs_and_places_each_lora(comfy_server, tiny_checkpoint, server_loras):
    workflow = json.loads(WORKFLOW.read_text())
    small = {"width": 128, "height": 96}
    overrides = {
        "1": {"ckpt_name": tiny_checkpoint},
        "2": {"lora_name": server_loras[0]},
        "3": {"lora_name": server_loras[1]},
        "4": dict(small),
        "8": dict(small),
        "9": {"steps": 3},
    }
    prompt = workflow_to_api(workflow, comfy_server.object_info(), overrides=overrides)
    assert [b["label"] for b in json.loads(prompt["4"]["inputs"]["regions"])["boxes"]] == ["left", "right"]
    assert prompt["5"]["inputs"]["model"] == ["1", 0] and prompt["9"]["inputs"]["model"] == ["5", 0]
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    both = comfy_server.output_image(entry, "11")
    assert both.std() > 5, "the picture must have range"
    assert comfy_server.output_image(entry, "12").std() > 2  # the which-concept-goes-where preview

    # the same graph without the right LoRA: the right half changes far more than the left
    prompt["5"]["inputs"]["concepts"] = ["2", 0]
    prompt["11"]["inputs"]["filename_prefix"] = "regional_left_only"
    prompt["4"]["inputs"]["regions"] = prompt["4"]["inputs"]["regions"]
    left_only = comfy_server.run(prompt, timeout=300)
    assert left_only["status"]["status_str"] == "success", left_only["status"]
    d = np.abs(both - comfy_server.output_image(left_only, "11")).mean(axis=(0, 2))
    assert d[72:].mean() > 1.5 * d[:56].mean() and d[72:].mean() > 0.5, (d[:56].mean(), d[72:].mean())


def test_regional_lora_workflow_is_a_template(comfy_server):
    templates = comfy_server.get("/workflow_templates").json()
    assert "regional_lora" in templates.get(PACK_DIR_NAME, [])
    thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/regional_lora.jpg")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
