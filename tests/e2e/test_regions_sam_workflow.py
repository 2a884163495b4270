"""The shipped boxes -> SAM -> preview workflow runs end to end on a real server (tiny SAM in models/sams)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.builders.sam import (
    REFERENCE_BOXES,
    REFERENCE_H,
    REFERENCE_W,
    assert_matches_reference,
    assert_reference_is_telling,
    build_tiny_sam,
    predictor_reference,
    reference_prompt,
    save_reference_image,
    save_tiny_sam,
)
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


def _execution_error(entry) -> dict:
    errors = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, entry["status"]
    return errors[0]


def test_sam_masks_over_http_after_bad_input_equal_sam_predictor(comfy_server, tiny_sam_on_server):
    """Over HTTP: a broken SAM file and a BBOX that is not boxes are clear errors, and the next prompt on the
    same server gives exactly SamPredictor's mask for each box alone (read back from the preview PNGs)."""
    base = Path(comfy_server.base_dir)
    image = save_reference_image(base / "input")
    (base / "models" / "sams" / "e2e_empty_sam.pth").write_bytes(b"")

    error = _execution_error(comfy_server.run(reference_prompt("e2e_empty_sam.pth"), timeout=120))
    assert error["node_type"] == "MultiConceptSAMLoader"
    assert error["exception_message"].startswith("SAM Loader: e2e_empty_sam.pth is empty (0 bytes)")

    error = _execution_error(comfy_server.run(reference_prompt(tiny_sam_on_server, via="value", bboxes="junk")))
    assert error["node_type"] == "MultiConceptSAMMasks"
    assert "bboxes is a str ('junk'), not a list. Give boxes as [x0, y0, x1, y1]" in error["exception_message"]

    entry = comfy_server.run(reference_prompt(tiny_sam_on_server, via="value", bboxes=REFERENCE_BOXES), timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = entry["outputs"]["6"]["images"]
    assert len(files) == len(REFERENCE_BOXES)
    served = torch.stack(
        [
            torch.from_numpy(
                np.array(Image.open(comfy_server.output_file(f["filename"], f["subfolder"], f["type"])))[..., 0]
            ).float()
            / 255
            for f in files
        ]
    )
    sam = build_tiny_sam()
    reference, logits, _ = predictor_reference(sam, image, REFERENCE_BOXES, multimask=True)
    full, _, _ = predictor_reference(sam, image, [[0, 0, REFERENCE_W, REFERENCE_H]], multimask=True)
    assert_reference_is_telling(reference, full[0])
    assert_matches_reference(served, reference, logits, "mask served over HTTP")
