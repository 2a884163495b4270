"""The harness itself, against real ComfyUI in-process: the tiny checkpoint, graph runs, determinism, errors."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from tests.support.graphs import plain_txt2img
from tests.support.tensors import same_bits

# The one tensor ComfyUI's SD1.5 checkpoint loader cannot fill from any key (see tests/support/builders/sd15.py).
UNLOADABLE_CLIP = ["clip_l.transformer.text_projection.weight"]


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _attention_layers(diffusion_model, name: str) -> dict[str, list[str]]:
    found = {"input": [], "middle": [], "output": []}
    for module_name, _ in diffusion_model.named_modules():
        if module_name.endswith(f".{name}"):
            found[module_name.split("_", 1)[0]].append(module_name)
    return found


def test_session_is_cpu_only_with_temporary_folders(comfy):
    import comfy.model_management as model_management
    import folder_paths

    assert model_management.get_torch_device().type == "cpu"
    assert folder_paths.get_output_directory() == str(comfy.output_dir)
    assert folder_paths.get_input_directory() == str(comfy.base_dir / "input")
    assert folder_paths.get_temp_directory() == str(comfy.base_dir / "temp")
    for kind in ("checkpoints", "loras", "sams", "clip_vision"):
        assert str(comfy.models_dir / kind) == folder_paths.get_folder_paths(kind)[0], kind


def test_pack_is_loaded_the_way_comfyui_loads_custom_nodes(comfy):
    import nodes

    assert comfy.version and comfy.version != "unknown"
    pack = sys.modules[comfy.pack_module_name]
    assert hasattr(pack, "comfy_entrypoint") and pack.WEB_DIRECTORY
    module = comfy.pack_module("samplers.edlora.layerwise")
    assert module.__name__ == f"{comfy.pack_module_name}.samplers.edlora.layerwise"
    assert module is not sys.modules.get("multiconcept.samplers.edlora.layerwise")  # ComfyUI's copy, not ours
    assert all(node_id.startswith("MultiConcept") for node_id in comfy.pack_node_ids)
    assert set(comfy.pack_node_ids) <= set(nodes.NODE_CLASS_MAPPINGS)


def test_tiny_checkpoint_is_detected_as_sd15(comfy, tiny_checkpoint_path):
    import comfy.sd as comfy_sd
    from comfy.taesd.taesd import TAESD

    model, clip, vae = comfy_sd.load_checkpoint_guess_config(str(tiny_checkpoint_path))[:3]
    assert type(model.model.model_config).__name__ == "SD15"
    unet_config = model.model.model_config.unet_config
    assert unet_config["model_channels"] == 320 and list(unet_config["channel_mult"]) == [1, 1, 1, 1]
    assert unet_config["context_dim"] == 768 and unet_config["num_heads"] == 8
    cross = _attention_layers(model.model.diffusion_model, "attn2")
    assert {k: len(v) for k, v in cross.items()} == {"input": 6, "middle": 1, "output": 9}
    text = clip.cond_stage_model.clip_l.transformer.text_model
    assert len(text.encoder.layers) == 12
    assert tuple(text.embeddings.token_embedding.weight.shape) == (49408, 768)
    assert isinstance(vae.first_stage_model, TAESD)
    assert float(vae.first_stage_model.vae_scale.detach()) == pytest.approx(0.18215, rel=1e-3)


def test_stock_checkpoint_loader_node_loads_it(comfy, tiny_checkpoint):
    import folder_paths

    import nodes

    assert tiny_checkpoint in folder_paths.get_filename_list("checkpoints")
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint)
    assert type(model.model.model_config).__name__ == "SD15"
    cond = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    assert tuple(cond[0][0].shape) == (1, 77, 768) and torch.isfinite(cond[0][0]).all()


def _loaded_tensors(module) -> dict:
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def _unfilled(module, file_key_of, file: dict, used: set, what: str) -> list[str]:
    """Check every parameter/buffer of ``module`` against the file; return those with no file tensor."""
    missing = []
    for name, t in _loaded_tensors(module).items():
        key = file_key_of.get(name)
        if key is None:
            missing.append(name)
            continue
        want = file[key]
        assert torch.isfinite(want).all(), key
        assert same_bits(t.detach().cpu(), want.to(t.dtype)), f"{what} {name} is not the file's {key}"
        used.add(key)
    return missing


def _encode(clip, text="a photo of a cat on a sofa"):
    import nodes

    cond = nodes.CLIPTextEncode().encode(clip, text)[0]
    return cond[0][0], cond[0][1]["pooled_output"]


def test_every_loaded_tensor_comes_from_the_checkpoint(comfy, tiny_checkpoint_path, tiny_checkpoint):
    """Nothing of the loaded UNet, CLIP or VAE is left uninitialised (random memory, sometimes NaN)."""
    import comfy.utils as comfy_utils
    from safetensors.torch import load_file

    import nodes

    file = load_file(str(tiny_checkpoint_path))
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint)
    config = model.model.model_config
    names = {k: k for k in file}
    # file key of each loaded tensor, through ComfyUI's own key conversions (as load_state_dict_guess_config)
    unet_keys = {k[len("model.diffusion_model.") :]: k for k in file if k.startswith("model.diffusion_model.")}
    clip_keys = config.process_clip_state_dict(dict(names))
    vae_keys = config.process_vae_state_dict(
        comfy_utils.state_dict_prefix_replace(dict(names), {k: "" for k in config.vae_key_prefix}, filter_keys=True)
    )
    used: set = set()
    assert _unfilled(model.model.diffusion_model, unet_keys, file, used, "UNet") == []
    assert _unfilled(vae.first_stage_model, vae_keys, file, used, "VAE") == []
    assert _unfilled(clip.cond_stage_model, clip_keys, file, used, "CLIP") == UNLOADABLE_CLIP
    assert sorted(set(file) - used) == [], "tensors in the file that the loaded models do not use"

    # the one tensor the loader cannot fill has no effect: SD1.5's CLIP returns the unprojected pooled output
    cond, pooled = _encode(clip)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all() and pooled.abs().sum() > 0
    projection = clip.cond_stage_model.clip_l.transformer.text_projection.weight
    with torch.no_grad():
        projection.fill_(float("nan"))
    cond_nan, pooled_nan = _encode(clip)
    assert same_bits(cond_nan, cond) and same_bits(pooled_nan, pooled)

    # ... so two fresh loads encode bit-identically, pooled output included
    del model, clip, vae
    cond_again, pooled_again = _encode(nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint)[1])
    assert same_bits(cond_again, cond) and same_bits(pooled_again, pooled)


def test_build_is_deterministic(comfy, tiny_checkpoint_path, tmp_path):
    from tests.support.builders.sd15 import build_tiny_sd15, is_current_build

    again = build_tiny_sd15(tmp_path / "again.safetensors", seed=0)
    assert _sha256(again) == _sha256(tiny_checkpoint_path)
    assert is_current_build(again, seed=0) and not is_current_build(again, seed=1)


def test_plain_txt2img_gives_a_finite_varied_image(comfy, tiny_checkpoint):
    result = comfy.run(plain_txt2img(tiny_checkpoint, prefix="smoke"))
    assert result.success, result.error
    assert [event for event, _ in result.messages][-1] == "execution_success"
    image = result.value("6")  # VAEDecode's IMAGE
    assert tuple(image.shape) == (1, 64, 64, 3) and image.dtype == torch.float32
    assert torch.isfinite(image).all()
    assert image.std() > 0.05, "the image is (nearly) constant"
    assert ((image <= 0) | (image >= 1)).float().mean() < 0.5, "the image is mostly saturated"
    saved = result.outputs["7"]["images"]
    assert len(saved) == 1 and comfy.output_path(saved[0]).is_file()


def test_fresh_executors_give_bit_identical_images(comfy, tiny_checkpoint):
    prompt = plain_txt2img(tiny_checkpoint, prefix="repeat")
    first, second = comfy.run(prompt), comfy.run(prompt)
    assert first.success and second.success, (first.error, second.error)
    # a fresh executor caches nothing: every node ran again the second time
    assert [d["nodes"] for e, d in second.messages if e == "execution_cached"] == [[]]
    assert torch.equal(first.value("6"), second.value("6"))
    assert torch.equal(first.value("5")["samples"], second.value("5")["samples"])


def test_prompt_and_seed_change_the_image(comfy, tiny_checkpoint):
    base = comfy.run(plain_txt2img(tiny_checkpoint, prefix="base"))
    other_prompt = comfy.run(plain_txt2img(tiny_checkpoint, positive="a red car in the rain", prefix="car"))
    other_seed = comfy.run(plain_txt2img(tiny_checkpoint, seed=8, prefix="seed8"))
    images = [r.value("6") for r in (base, other_prompt, other_seed)]
    assert (images[0] - images[1]).abs().mean() > 0.01, "the prompt does not reach the image"
    assert (images[0] - images[2]).abs().mean() > 0.01, "the seed does not reach the image"


def test_validation_failure_is_reported_and_nothing_runs(comfy, tiny_checkpoint):
    prompt = plain_txt2img("no_such_checkpoint.safetensors")
    ok, error = comfy.validate(prompt)
    assert not ok and "1" in error["node_errors"]
    assert "no_such_checkpoint.safetensors" in str(error["node_errors"]["1"])
    result = comfy.run(prompt)
    assert not result.success and result.executor is None and result.error["node_errors"]


def test_execution_error_is_reported_then_next_prompt_runs(comfy, tiny_checkpoint):
    broken = comfy.models_dir / "checkpoints" / "mc_broken_for_test.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    try:
        result = comfy.run(plain_txt2img(broken.name, prefix="broken"))
    finally:
        broken.unlink()
    assert not result.success
    assert result.error["node_id"] == "1" and result.error["node_type"] == "CheckpointLoaderSimple"
    assert result.error["exception_message"]
    assert [event for event, _ in result.messages][-1] == "execution_error"
    after = comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_broken"))
    assert after.success, after.error


def test_client_id_records_node_messages(comfy, tiny_checkpoint):
    result = comfy.run(plain_txt2img(tiny_checkpoint, prefix="messages"), client_id="harness")
    assert result.success, result.error
    events = [event for event, _ in result.sent]
    assert "executing" in events and "executed" in events
    executed = [data["node"] for event, data in result.sent if event == "executed"]
    assert executed == ["7"]  # only output nodes report ui output
