"""The shared validation layer (nodes/validation.py) in a real ComfyUI: bad values, bad files, bad names.

Every case must end in a message that starts with the node's name and says what to do, never in a raw
Python error, and ComfyUI must run the next plain prompt.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from tests.support.builders.edlora import official_edlora
from tests.support.graphs import edlora_txt2img, plain_txt2img

RAW_ERRORS = ("Traceback", "IndexError", "TypeError", "KeyError", "list index out of range", "Exception when")


def _assert_clear(message: str, node: str, *parts: str):
    assert message.startswith(f"{node}: "), message
    for part in parts:
        assert part in message, message
    assert not any(raw in message for raw in RAW_ERRORS), message


@pytest.fixture(scope="module")
def bad_edloras(comfy):
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vb_empty.pth").write_bytes(b"")
    (d / "vb_random.pth").write_bytes(bytes((i * 37 + 11) % 256 for i in range(4096)))
    (d / "vb_html.pth").write_bytes(b"<!DOCTYPE html><html><body>Not Found</body></html>")
    nan = official_edlora(seed=31)
    nan["params"]["unet"][next(iter(nan["params"]["unet"]))][0, 0] = float("nan")
    torch.save(nan, d / "vb_nan_lora.pth")
    huge = official_edlora(seed=32)
    key = next(k for k in huge["params"]["text_encoder"] if k.endswith("lora_up.weight"))
    huge["params"]["text_encoder"][key][1, 1] = 3.0e7
    torch.save(huge, d / "vb_huge_lora.pth")
    torch.save(official_edlora(seed=33), d / "vb_good.pth")
    return d


@pytest.mark.parametrize(
    "name, parts",
    [
        ("vb_empty.pth", ["vb_empty.pth is empty (0 bytes)"]),
        ("vb_random.pth", ["is not a PyTorch or safetensors file", "starts with the bytes"]),
        ("vb_html.pth", ["is not a PyTorch or safetensors file", "<!DOCTYPE"]),
        ("vb_nan_lora.pth", ["NaN or infinite", "unet"]),
        ("vb_huge_lora.pth", ["values up to 3e+07", "text_encoder"]),
    ],
)
def test_broken_edlora_files_are_named_for_what_they_are(comfy, tiny_checkpoint, bad_edloras, name, parts):
    result = comfy.run(edlora_txt2img(tiny_checkpoint, [name], "a photo of <cat1> <cat2>"))
    assert not result.success and result.error["node_type"] == "MultiConceptEDLoRALoader"
    message = result.error["exception_message"]
    _assert_clear(message, "ED-LoRA Loader", *parts)
    assert "pickle code" not in message and "safety" not in message  # not alarming about a broken download
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_broken_file"))
    assert after.success, after.error


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["strength_unet", "strength_text"])
def test_non_finite_strengths_are_refused(comfy, tiny_checkpoint, bad_edloras, value, which):
    prompt = edlora_txt2img(tiny_checkpoint, ["vb_good.pth"], "a photo of <cat1> <cat2>")
    prompt["10"]["inputs"][which] = value
    result = comfy.run(prompt)
    assert not result.success
    if math.isnan(value):
        # ComfyUI's own min/max checks let NaN through (nan < min is False): the node refuses it when it runs
        assert result.executor is not None
        _assert_clear(result.error["exception_message"], "ED-LoRA Loader", which, "finite number between -4 and 4")
    else:  # ComfyUI's max/min check catches infinities before anything runs
        assert result.executor is None and which in str(result.error["node_errors"]["10"])
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_nan"))
    assert after.success, after.error


@pytest.mark.parametrize(
    "name, parts",
    [
        (123, ["is a int", "Pick a file from the list"]),
        (None, ["is a NoneType"]),
        ("../../checkpoints/mc_tiny_sd15.safetensors", ["'..'"]),
        ("/etc/passwd", ["absolute path"]),
        ("vb_good.pth\n", ["control characters"]),
        ("x" * 300 + ".pth", ["304 characters long"]),
    ],
)
def test_file_names_that_are_not_plain_names_are_validation_errors(comfy, tiny_checkpoint, bad_edloras, name, parts):
    prompt = edlora_txt2img(tiny_checkpoint, ["vb_good.pth"], "a photo of <cat1> <cat2>")
    prompt["10"]["inputs"]["edlora_name"] = name
    ok, error = comfy.validate(prompt)
    assert not ok
    errors = error["node_errors"]["10"]["errors"]
    assert len(errors) == 1 and errors[0]["type"] == "custom_validation_failed", errors
    _assert_clear(errors[0]["details"].split(" - ", 1)[1], "ED-LoRA Loader", *parts)


def _convert_prompt(src: str, output_name: str) -> dict:
    return {
        "1": {
            "class_type": "MultiConceptEDLoRAConvert",
            "inputs": {"edlora_name": src, "output_name": output_name},
        }
    }


@pytest.mark.parametrize(
    "output_name, parts",
    [
        ("two\nlines", ["control characters"]),
        ("nul\x00name", ["NUL"]),
        ("y" * 300, ["300 characters"]),
        ("../escaped", ["folder separator"]),
        ("sub/dir", ["folder separator"]),
        ("/abs/path", ["folder separator"]),
        ("what?", ["one of the characters"]),
        ("c:stuff", ["absolute path"]),
        ("CON", ["reserved device name"]),
        (".hidden", ["starts with a dot"]),
    ],
)
def test_convert_refuses_output_names_that_are_not_plain_file_names(comfy, bad_edloras, output_name, parts):
    before = sorted(p.name for p in bad_edloras.parent.rglob("*"))
    result = comfy.run(_convert_prompt("vb_good.pth", output_name))
    assert not result.success and result.error["node_type"] == "MultiConceptEDLoRAConvert"
    _assert_clear(result.error["exception_message"], "ED-LoRA Convert", "output_name", *parts)
    assert sorted(p.name for p in bad_edloras.parent.rglob("*")) == before, "nothing may be written"


def test_convert_never_overwrites(comfy, bad_edloras):
    first = comfy.run(_convert_prompt("vb_good.pth", "vb_converted"))
    assert first.success, first.error
    written = bad_edloras / "vb_converted.safetensors"
    stamp = written.stat().st_mtime_ns, written.read_bytes()
    again = comfy.run(_convert_prompt("vb_good.pth", "vb_converted.safetensors"))
    assert not again.success
    _assert_clear(again.error["exception_message"], "ED-LoRA Convert", "already exists")
    assert (written.stat().st_mtime_ns, written.read_bytes()) == stamp


def test_guarded_validation_turns_exceptions_into_messages_and_keeps_the_signature(comfy):
    validation = comfy.pack_module("nodes.validation")

    class Probe:
        @classmethod
        @validation.guarded_validation("Probe Node", "regions", "Redraw the boxes.")
        def validate_inputs(cls, regions, other=None):
            raise RecursionError("maximum recursion depth exceeded")

    message = Probe.validate_inputs("x")
    assert message == (
        "Probe Node: regions could not be checked (RecursionError: maximum recursion depth exceeded). Redraw the boxes."
    )
    # ComfyUI decides which inputs to hand over with getfullargspec: it must see the real parameters
    spec = inspect.getfullargspec(Probe.validate_inputs)
    assert spec.args[-2:] == ["regions", "other"] and spec.varkw is None


def test_every_pack_validate_inputs_takes_one_widget_input(comfy):
    """A message returned by validate_inputs is repeated per input it takes, and those inputs lose
    ComfyUI's own range checks: ours take one input (plus Regions' linked-JSON switch)."""
    for node_id in comfy.pack_node_ids:
        cls = comfy.node_class(node_id)
        fn = getattr(cls, "validate_inputs", None)
        if fn is None or "validate_inputs" not in vars(cls):
            continue
        args = [a for a in inspect.getfullargspec(fn).args if a != "cls"]
        spec = inspect.getfullargspec(fn)
        assert spec.varkw is None, node_id
        assert len(args) == 1 or (node_id == "MultiConceptRegions" and args == ["regions", "regions_json"]), (
            node_id,
            args,
        )
