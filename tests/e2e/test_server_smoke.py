"""The harness itself, against a real ComfyUI server: the pack is installed, graphs run over HTTP, bad
prompts are refused with 400 and the server keeps serving."""

from __future__ import annotations

import pytest

from tests.support.graphs import plain_txt2img
from tests.support.server import PACK_DIR_NAME, PromptRejected


def test_server_has_the_pack_and_the_checkpoint(comfy_server, tiny_checkpoint):
    stats = comfy_server.get("/system_stats").json()
    assert stats["system"]["comfyui_version"]
    assert all(d["type"] == "cpu" for d in stats["devices"])
    info = comfy_server.object_info()
    ckpt_names = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert tiny_checkpoint in ckpt_names
    ours = sorted(k for k in info if k.startswith("MultiConcept"))
    assert ours == comfy_server.pack_node_ids
    assert (comfy_server.base_dir / "custom_nodes" / PACK_DIR_NAME / "__init__.py").is_file()


def test_txt2img_over_http_saves_an_image(comfy_server, tiny_checkpoint):
    from PIL import Image

    entry = comfy_server.run(plain_txt2img(tiny_checkpoint, prefix="http_smoke"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = comfy_server.output_file(images[0]["filename"], images[0]["subfolder"], images[0]["type"])
    assert path.is_file()
    with Image.open(path) as im:
        assert im.size == (64, 64)
        lo, hi = im.convert("L").getextrema()
        assert hi > lo, "the saved image is constant"
    served = comfy_server.get("/view", params=images[0])
    assert served.status_code == 200 and served.content == path.read_bytes()


def test_invalid_prompt_gets_400_and_server_then_runs_a_valid_one(comfy_server, tiny_checkpoint):
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(plain_txt2img("no_such_checkpoint.safetensors", prefix="never"))
    assert rejected.value.status == 400
    body = rejected.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert "1" in body["node_errors"]
    assert body["node_errors"]["1"]["class_type"] == "CheckpointLoaderSimple"
    assert "no_such_checkpoint.safetensors" in str(body["node_errors"]["1"]["errors"])

    entry = comfy_server.run(plain_txt2img(tiny_checkpoint, seed=3, prefix="after_400"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert comfy_server.running
