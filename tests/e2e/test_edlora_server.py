"""The shipped ED-LoRA workflow, the help pages and bad input, through a real ComfyUI server over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.builders.edlora import official_edlora
from tests.support.graphs import plain_txt2img
from tests.support.workflow_api import workflow_to_api

PACK_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = PACK_ROOT / "workflows" / "edlora_single_concept.json"
PACK_DIR_NAME = "comfyui-multiconcept"


@pytest.fixture(scope="module")
def server_loras(comfy_server):
    d = Path(comfy_server.base_dir) / "models" / "loras"
    d.mkdir(parents=True, exist_ok=True)
    from multiconcept.formats.edlora import read_edlora, write_edlora_safetensors

    torch.save(official_edlora(words=("<cat1>", "<cat2>"), seed=31), d / "e2e_cat.pth")
    if not (d / "e2e_cat.safetensors").exists():
        write_edlora_safetensors(read_edlora(d / "e2e_cat.pth"), d / "e2e_cat.safetensors")
    evil = official_edlora(seed=32)
    evil["params"]["payload"] = torch.nn.Linear(2, 2)  # a module object: needs pickle code to rebuild
    torch.save(evil, d / "e2e_pickled_module.pth")
    return d


def _workflow_prompt(comfy_server, tiny_checkpoint, prefix: str) -> dict:
    """The shipped workflow as the Queue button would send it, sized down for the tiny checkpoint."""
    workflow = json.loads(WORKFLOW.read_text())
    return workflow_to_api(
        workflow,
        comfy_server.object_info(),
        overrides={
            "1": {"ckpt_name": tiny_checkpoint},
            "2": {"edlora_name": "e2e_cat.safetensors"},
            "5": {"width": 64, "height": 64},
            "6": {"steps": 3},
            "8": {"filename_prefix": prefix},
        },
    )


def _without_edlora(prompt: dict) -> dict:
    """The same graph with the ED-LoRA loader taken out: its consumers get the checkpoint's MODEL/CLIP."""
    out = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items() if k != "2"}
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[:1] == ["2"]:
                node["inputs"][name] = ["1", value[1]]
    return out


def _saved_image(comfy_server, prompt: dict) -> np.ndarray:
    """Run ``prompt`` over HTTP; the one PNG its SaveImage wrote, as float pixels 0..255."""
    from PIL import Image  # comes with torchvision / ComfyUI's requirements

    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1
    path = comfy_server.output_file(images[0]["filename"], images[0]["subfolder"], images[0]["type"])
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 10, f"{path.name} is (nearly) flat: std {pixels.std():.2f}"  # comparable pictures
    return pixels


def test_single_concept_workflow_runs_on_the_server(comfy_server, tiny_checkpoint, server_loras):
    """The workflow's ED-LoRA loader changes the saved picture, and its concept words matter."""
    assert "MultiConceptEDLoRALoader" in comfy_server.object_info()
    concept = _workflow_prompt(comfy_server, tiny_checkpoint, "e2e_concept")
    assert "<cat1> <cat2>" in concept["3"]["inputs"]["text"]
    plain = _without_edlora(_workflow_prompt(comfy_server, tiny_checkpoint, "e2e_plain"))
    assert all(node["class_type"] != "MultiConceptEDLoRALoader" for node in plain.values())
    class_word = _workflow_prompt(comfy_server, tiny_checkpoint, "e2e_class_word")
    class_word["3"]["inputs"]["text"] = concept["3"]["inputs"]["text"].replace("<cat1> <cat2>", "cat")

    image = _saved_image(comfy_server, concept)
    # the same graph, seed and prompt text without the loader: the ED-LoRA's weights and words must show
    assert np.abs(image - _saved_image(comfy_server, plain)).mean() > 5.0
    # the concept words are not just text: with the loader, the class word gives another picture
    assert np.abs(image - _saved_image(comfy_server, class_word)).mean() > 5.0


def test_workflow_is_listed_in_the_template_browser(comfy_server):
    templates = comfy_server.get("/workflow_templates").json()
    assert "edlora_single_concept" in templates.get(PACK_DIR_NAME, [])
    served = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/edlora_single_concept.json")
    assert served.status_code == 200 and served.json()["nodes"]
    for name in templates[PACK_DIR_NAME]:  # the template browser shows <name>.jpg as the card picture
        thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff", name


def test_every_node_has_a_help_page_and_tooltips(comfy_server):
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("MultiConcept")}
    assert ours
    for node_id, spec in ours.items():
        page = comfy_server.get(f"/extensions/{PACK_DIR_NAME}/docs/{node_id}.md")
        assert page.status_code == 200 and len(page.text) > 200, node_id
        assert spec["description"], node_id
        assert spec["category"].startswith("multi-concept"), node_id
        for section in ("required", "optional"):
            for name, input_spec in spec["input"].get(section, {}).items():
                opts = input_spec[1] if len(input_spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_bad_file_errors_then_server_serves_next_prompt(comfy_server, tiny_checkpoint, server_loras):
    from tests.support.graphs import edlora_txt2img

    prompt_id = comfy_server.post_prompt(edlora_txt2img(tiny_checkpoint, ["e2e_pickled_module.pth"], "<cat1> <cat2>"))
    entry = comfy_server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    errors = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "MultiConceptEDLoRALoader"
    assert "pickle code execution" in errors[0]["exception_message"]
    ok_id = comfy_server.post_prompt(plain_txt2img(tiny_checkpoint, prefix="after_error"))
    assert comfy_server.wait(ok_id, timeout=120)["status"]["status_str"] == "success"
