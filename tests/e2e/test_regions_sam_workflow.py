"""The shipped boxes -> SAM -> preview workflow runs end to end on a real server (tiny SAM in models/sams)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.tiny_sam import save_tiny_sam
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "regions_sam_masks.json"


@pytest.fixture(scope="module")
def tiny_sam_on_server(comfy_server):
    path = Path(comfy_server.base_dir) / "models" / "sams" / "tiny_sam.pth"
    if not path.exists():
        save_tiny_sam(path)
    return path.name


def test_regions_sam_workflow_runs(comfy_server, tiny_checkpoint, tiny_sam_on_server):
    workflow = json.loads(WORKFLOW.read_text())
    prompt = workflow_to_api(
        workflow,
        comfy_server.object_info(),
        overrides={
            "1": {"ckpt_name": tiny_checkpoint},
            "4": {"width": 64, "height": 64},
            "5": {"steps": 2},
            "7": {"width": 64, "height": 64},
            "8": {"sam_name": tiny_sam_on_server},
        },
    )
    regions = json.loads(prompt["7"]["inputs"]["regions"])
    assert [b["label"] for b in regions["boxes"]] == ["cat", "dog"]
    entry = comfy_server.wait(comfy_server.post_prompt(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(entry["outputs"]["11"]["images"]) == 2  # one SAM mask per box
    assert len(entry["outputs"]["12"]["images"]) == 1  # the boxes drawn over the picture
    for item in entry["outputs"]["11"]["images"] + entry["outputs"]["12"]["images"]:
        assert comfy_server.output_file(item["filename"], item["subfolder"], item["type"]).is_file()
    assert "regions_sam_masks" in comfy_server.get("/workflow_templates").json()["comfyui-multiconcept"]
