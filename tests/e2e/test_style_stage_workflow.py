"""The shipped style-stage workflow (seed 001's second stage, stock nodes only): a picture is re-rendered by
img2img (VAE Encode + KSampler at denoise < 1) while a Canny ControlNet keeps its structure. It runs end to end
on a real server with the tiny checkpoint and a tiny SD1.5 ControlNet; its style-reference group (CLIP vision +
T2I-Adapter style model) is bypassed and never reaches the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.builders.controlnet import COPIED, build_tiny_controlnet
from tests.support.server import PACK_DIR_NAME
from tests.support.workflow_api import workflow_to_api

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "concept_conductor_style_stage.json"
SIZE = 64  # the test picture (the workflow's size is its input picture's)
CKPT, PICTURE, ENCODE, POSITIVE, NEGATIVE, CANNY, CN_LOADER, APPLY_CN, SAMPLER, DECODE, SAVE, EDGES = (
    str(i) for i in range(1, 13)
)
STYLE_GROUP = {"13": "LoadImage", "14": "CLIPVisionLoader", "15": "CLIPVisionEncode"}
STYLE_GROUP |= {"16": "StyleModelLoader", "17": "StyleModelApply"}
CONTROLNET = "mc_tiny_controlnet.safetensors"
PICTURE_NAME = "e2e_style_stage_picture.png"


def _test_picture() -> np.ndarray:
    """A scene with range and edges: a diagonal colour gradient, a tall block (the "man") and a disc (the
    "dog"), uint8 ``[SIZE, SIZE, 3]``."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    image = np.stack([0.2 + 0.5 * x, 0.3 + 0.4 * y, 0.8 - 0.5 * x * y], axis=-1)
    image[(y > 0.12) & (y < 0.88) & (x > 0.15) & (x < 0.45)] = (0.9, 0.2, 0.15)
    disc = (x - 0.68) ** 2 + (y - 0.7) ** 2 < 0.2**2
    image[disc] = (0.1, 0.15, 0.6)
    return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def server_files(comfy_server, tiny_checkpoint_path):
    """The tiny ControlNet (the tiny UNet's encoder copied, as ControlNet training starts) in the server's
    models/controlnet, and the picture to restyle in its input folder."""
    from safetensors import safe_open

    prefix = "model.diffusion_model."
    with safe_open(str(tiny_checkpoint_path), framework="pt") as f:
        unet = {
            k[len(prefix) :]: f.get_tensor(k)
            for k in f.keys()
            if k.startswith(prefix) and k[len(prefix) :].startswith(COPIED)
        }
    base = Path(comfy_server.base_dir)
    build_tiny_controlnet(base / "models" / "controlnet" / CONTROLNET, unet, seed=11)
    picture = _test_picture()
    Image.fromarray(picture).save(base / "input" / PICTURE_NAME)
    return picture.astype(np.float64)


def _workflow() -> dict:
    return json.loads(WORKFLOW.read_text())


def _prompt(comfy_server, tiny_checkpoint, **strength) -> dict:
    return workflow_to_api(
        _workflow(),
        comfy_server.object_info(),
        overrides={
            CKPT: {"ckpt_name": tiny_checkpoint},
            PICTURE: {"image": PICTURE_NAME},
            CN_LOADER: {"control_net_name": CONTROLNET},
            SAMPLER: {"steps": 2},
            SAVE: {"filename_prefix": "style_stage"},
            APPLY_CN: strength,
        },
    )


def _has_range(image: np.ndarray, what: str) -> None:
    assert image.shape == (SIZE, SIZE, 3), (what, image.shape)
    assert np.isfinite(image).all(), what
    assert image.std() > 5, f"{what} is flat: std {image.std():.2f}"


def test_style_stage_restyles_the_picture_with_control(comfy_server, tiny_checkpoint, server_files):
    prompt = _prompt(comfy_server, tiny_checkpoint)
    sampler, apply_cn = prompt[SAMPLER]["inputs"], prompt[APPLY_CN]["inputs"]
    # img2img of the picture, conditioned through the ControlNet on the Canny edges of the same picture
    assert 0 < sampler["denoise"] < 1 and sampler["latent_image"] == [ENCODE, 0]
    assert prompt[ENCODE]["inputs"]["pixels"] == [PICTURE, 0] and prompt[CANNY]["inputs"]["image"] == [PICTURE, 0]
    assert apply_cn["image"] == [CANNY, 0] and apply_cn["strength"] > 0
    assert sampler["positive"] == [APPLY_CN, 0] and sampler["negative"] == [APPLY_CN, 1]

    log_start = len(comfy_server.log_path.read_text(errors="replace"))
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    styled = comfy_server.output_image(entry, SAVE)
    edges = comfy_server.output_image(entry, EDGES)
    _has_range(styled, "the restyled picture")
    _has_range(edges, "the Canny edges")
    _has_range(server_files, "the input picture")

    # img2img re-rendered the picture
    changed = np.abs(styled - server_files).mean()
    assert changed > 10, f"the output is the input: mean |diff| {changed:.2f}"

    # the same run with the ControlNet at strength 0: the control acts
    off = _prompt(comfy_server, tiny_checkpoint, strength=0.0)
    off[SAVE]["inputs"]["filename_prefix"] = "style_stage_no_control"
    entry = comfy_server.run(off, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    uncontrolled = comfy_server.output_image(entry, SAVE)
    _has_range(uncontrolled, "the picture without control")
    control = np.abs(styled - uncontrolled).mean()
    assert control > 2, f"the ControlNet did not change the picture: mean |diff| {control:.2f}"

    # a NaN anywhere in a saved picture makes numpy warn when SaveImage casts it to uint8
    log = comfy_server.log_path.read_text(errors="replace")[log_start:]
    assert "invalid value encountered" not in log, log
    print(
        f"style stage: |out-in| {changed:.2f}, |out-out(strength 0)| {control:.2f}, std out {styled.std():.2f}, "
        f"off {uncontrolled.std():.2f}, edges {edges.std():.2f}, in {server_files.std():.2f}"
    )


def test_style_group_is_bypassed_and_left_out_of_the_prompt(comfy_server):
    workflow = _workflow()
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    group = next(g for g in workflow["groups"] if g["title"].startswith("Style reference"))
    gx, gy, gw, gh = group["bounding"]
    inside = {i for i, n in nodes.items() if gx <= n["pos"][0] < gx + gw and gy <= n["pos"][1] < gy + gh}
    assert inside == set(STYLE_GROUP)
    assert {i: nodes[i]["type"] for i in inside} == STYLE_GROUP
    assert all(nodes[i]["mode"] == 4 for i in inside) and all(
        n["mode"] == 0 for i, n in nodes.items() if i not in inside
    )

    info = comfy_server.object_info()
    # stock ComfyUI only: every node (notes are frontend-only) comes from nodes.py or comfy_extras
    for n in nodes.values():
        if n["type"] != "MarkdownNote":
            assert info[n["type"]]["python_module"] in ("nodes", "comfy_extras.nodes_canny"), n["type"]
    prompt = workflow_to_api(workflow, info)
    assert not set(prompt) & set(STYLE_GROUP)
    assert not {n["class_type"] for n in prompt.values()} & {"CLIPVisionLoader", "StyleModelLoader", "StyleModelApply"}
    # the bypassed Apply Style Model hands the prompt's conditioning straight to Apply ControlNet
    assert prompt[APPLY_CN]["inputs"]["positive"] == [POSITIVE, 0]
    assert prompt[APPLY_CN]["inputs"]["negative"] == [NEGATIVE, 0]
    for node in prompt.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt, (node["class_type"], value)


def test_style_stage_workflow_is_a_template(comfy_server):
    served = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/concept_conductor_style_stage.json")
    assert served.status_code == 200 and served.json()["nodes"]
    thumb = comfy_server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/concept_conductor_style_stage.jpg")
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
