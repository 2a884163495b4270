"""Bad ED-LoRA input: a clear error naming the node and the fix, and ComfyUI goes on serving."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.edlora import official_edlora
from tests.support.graphs import edlora_txt2img, plain_txt2img


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


@pytest.fixture(scope="module")
def bad_files(comfy, tmp_path_factory):
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    sentinel = tmp_path_factory.mktemp("evil") / "was_executed"
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)},
        str(d / "bad_kohya.safetensors"),
    )
    good = official_edlora(seed=21)
    torch.save(good, d / "bad_full.pth")
    raw = (d / "bad_full.pth").read_bytes()
    (d / "bad_truncated.pth").write_bytes(raw[: len(raw) // 3])
    evil = official_edlora(seed=22)
    evil["params"]["payload"] = _Payload(str(sentinel))
    torch.save(evil, d / "bad_evil.pth")
    torch.save(official_edlora(seed=23, sdxl=True, unet_modules={}, te_modules={}), d / "bad_sdxl.pth")
    return sentinel


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bad_kohya.safetensors", ["not an ED-LoRA", "Load LoRA"]),
        ("bad_truncated.pth", ["truncated or corrupt"]),
        ("bad_evil.pth", ["pickle code execution", "refused"]),
        ("bad_sdxl.pth", ["SDXL ED-LoRA", "SD1.5"]),
    ],
)
def test_bad_file_fails_clearly_and_next_prompt_runs(comfy, tiny_checkpoint, bad_files, name, expected):
    result = comfy.run(edlora_txt2img(tiny_checkpoint, [name], "a photo of <cat1> <cat2>"))
    assert not result.success
    message = result.error["exception_message"]
    assert message.startswith("ED-LoRA Loader:"), message
    for part in expected:
        assert part in message, message
    assert result.error["node_type"] == "MultiConceptEDLoRALoader"
    assert not bad_files.exists()  # the pickle payload never ran
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_bad"))
    assert after.success, after.error


def test_missing_file_is_a_validation_error_saying_where_it_goes(comfy, tiny_checkpoint):
    ok, error = comfy.validate(edlora_txt2img(tiny_checkpoint, ["nowhere.pth"], "a <cat1> <cat2>"))
    assert not ok
    text = str(error)
    assert "ED-LoRA Loader" in text and "models/loras" in text and "nowhere.pth" in text
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_missing"))
    assert after.success, after.error
