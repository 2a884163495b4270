"""A ControlNet (and any stock conditioning) reaching OMG, LoRA-Composer and Concept Conductor through their
positive_conditioning / negative_conditioning inputs, where each official method runs its ControlNet; and the bad
input: conditioning of another family, a ControlNet made for another family. The ControlNet is the tiny SD1.5
one of test_mixofshow_controlnet.py (tests/support/builders/controlnet.py), loaded by ComfyUI's own loader."""

from __future__ import annotations

import pytest
import torch

from tests.support.builders.controlnet import build_controlnet_state_dict
from tests.support.builders.lora import SD15_ALL, make_lora

W, H = 128, 96
SCENE = "a photo of a cat and a dog on a sofa"


@pytest.fixture(scope="module")
def base(comfy, tiny_models):
    from safetensors.torch import save_file

    model, clip, vae = tiny_models[:3]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    save_file(make_lora(model, SD15_ALL, seed=91, scale=0.6), str(d / "scene_cond_a.safetensors"))
    return model, clip, vae


@pytest.fixture(scope="module")
def controlnet(base, tmp_path_factory):
    import comfy.controlnet
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("controlnet") / "scene_cn.safetensors"
    save_file(build_controlnet_state_dict(base[0].model.diffusion_model.state_dict(), seed=5), str(path))
    return comfy.controlnet.load_controlnet(str(path))


def encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def hint():
    image = torch.zeros(1, H, W, 3)
    image[:, 16:80, 24:72] = 1.0
    return image


def with_control(cn, clip, positive=SCENE, negative="blurry"):
    import nodes

    return nodes.ControlNetApplyAdvanced().apply_controlnet(
        encode(clip, positive), encode(clip, negative), cn, hint(), 1.0, 0.0, 1.0
    )


class RowCounter:
    """The batch rows of every forward of a ControlNet's network."""

    def __init__(self, cn):
        self.rows: list[int] = []
        self.handle = cn.control_model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs):
        x = kwargs.get("x", args[0] if args else None)
        self.rows.append(int(x.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def stack_of(comfy, label="cat"):
    node = comfy.node_class("MultiConceptStackLoRA")
    return node.execute("scene_cond_a.safetensors", 1.0, 1.0, label, class_word="cat").result[0]


def left_half():
    m = torch.zeros(1, H, W)
    m[:, :, : W // 2] = 1.0
    return m


def far_from(a, b, floor=1e-2):
    return float((a - b).abs().mean()) > floor


# ------------------------------------------------------------------------------------------------ OMG


def run_omg(comfy, base, **kw):
    model, clip, vae = base
    args = dict(seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", scene_prompt=SCENE,
                negative="blurry", start=0.5, masks=left_half())  # fmt: skip
    args.update(kw)
    latent = {"samples": torch.zeros(1, 4, H // 8, W // 8)}
    return comfy.node_class("MultiConceptOMG").execute(model, clip, vae, stack_of(comfy), latent, **args).result


def test_omg_runs_the_controlnet_in_stage_one_and_the_scene_branch_only(comfy, base, controlnet):
    _, clip, _ = base
    pos, neg = with_control(controlnet, clip)
    plain = run_omg(comfy, base)
    with RowCounter(controlnet) as counter:
        controlled = run_omg(comfy, base, positive_conditioning=pos, negative_conditioning=neg)
    final, stage1 = controlled[0]["samples"], controlled[1]["samples"]
    assert torch.isfinite(final).all() and float(final.std()) > 1e-3
    assert far_from(stage1, plain[1]["samples"]), "the ControlNet must change stage 1"
    # 3 stage-1 calls + 1 blended call (start 0.5 of 3 steps: step 2, euler): the ControlNet sees the scene's rows
    # (cond + uncond) at every one of them, never a concept's rows (the official OMG gives concepts no control)
    assert counter.rows == [2] * 4
    # the same conditioning without the ControlNet is the plain run: the inputs replace the encoding exactly
    same = run_omg(comfy, base, positive_conditioning=encode(clip, SCENE), negative_conditioning=encode(clip, "blurry"))
    assert torch.equal(same[0]["samples"], plain[0]["samples"])


# ------------------------------------------------------------------------------------------ LoRA-Composer

CAT_BOX = [{"x": 0, "y": 0, "w": 0.5, "h": 1, "label": "cat", "prompt": "a photo of a cat"}]


def regions(comfy):
    import json

    return comfy.node_class("MultiConceptRegions").execute(W, H, json.dumps({"boxes": CAT_BOX})).result[0]


def run_composer(comfy, base, **kw):
    import importlib

    sample, samplers = (importlib.import_module(f"comfy.{m}") for m in ("sample", "samplers"))
    model, clip, _ = base
    node = comfy.node_class("MultiConceptLoRAComposer")
    args = dict(concepts=stack_of(comfy), step_size=0.0, reinitialise=False)
    args.update(kw)
    guider = node.execute(model, clip, regions(comfy), SCENE, "blurry", 5.0, **args).result[0]
    latent = torch.zeros(1, 4, H // 8, W // 8)
    sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    noise = sample.prepare_noise(latent, 5)
    return guider.sample(noise, latent, samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=5)


def test_lora_composer_runs_the_controlnet_on_the_whole_call_and_keeps_its_boxes(comfy, base, controlnet):
    _, clip, _ = base
    pos, neg = with_control(controlnet, clip)
    plain = run_composer(comfy, base)
    with RowCounter(controlnet) as counter:
        controlled = run_composer(comfy, base, positive_conditioning=pos, negative_conditioning=neg)
    assert torch.isfinite(controlled).all() and float(controlled.std()) > 1e-3
    assert far_from(controlled, plain) and len(counter.rows) == 3  # one call (cond + uncond) per step
    # the plain encodings given as conditioning: the same picture, boxes and all (the regions ride on them)
    same = run_composer(
        comfy, base, positive_conditioning=encode(clip, SCENE), negative_conditioning=encode(clip, "blurry")
    )
    assert torch.equal(same, plain)


# ------------------------------------------------------------------------------------ Concept Conductor


def run_conductor(comfy, base, **kw):
    model, clip, vae = base
    args = dict(noise_seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", concepts=stack_of(comfy),
                scene_prompt=SCENE, negative="blurry", masks=left_half(), shape_masks=False,
                alignment_scale="per step")  # fmt: skip
    args.update(kw)
    latent = {"samples": torch.zeros(1, 4, H // 8, W // 8)}
    node = comfy.node_class("MultiConceptConceptConductor")
    return node.execute(model, clip, vae, latent, **args).result[0]["samples"]


def test_concept_conductor_runs_the_controlnet_in_the_reference_and_every_branch(comfy, base, controlnet):
    _, clip, _ = base
    pos, neg = with_control(controlnet, clip)
    plain = run_conductor(comfy, base)
    with RowCounter(controlnet) as counter:
        controlled = run_conductor(comfy, base, positive_conditioning=pos, negative_conditioning=neg)
    assert torch.isfinite(controlled).all() and float(controlled.std()) > 1e-3
    assert far_from(controlled, plain)
    # the reference run (scene cond + uncond) and every step's one batched call of all branches (the base's and
    # the concept's, cond + uncond each: the branches share a call, so the control acts on all of them)
    assert 2 in counter.rows and 4 in counter.rows
    same = run_conductor(
        comfy, base, positive_conditioning=encode(clip, SCENE), negative_conditioning=encode(clip, "blurry")
    )
    assert torch.equal(same, plain)


# ------------------------------------------------------------------------------------------- bad input


def wrong_width(width=2048):
    return [[torch.zeros(1, 77, width), {"pooled_output": torch.zeros(1, 1280)}]]


def sdxl_controlnet(base):
    """A ControlNet network for 2048-wide prompts (SDXL's), otherwise the tiny SD1.5 shape, random weights."""
    import comfy.cldm.cldm as cldm
    import comfy.controlnet

    from tests.support.builders.controlnet import HINT_CHANNELS
    from tests.support.builders.sd15 import UNET_CONFIG

    config = {k: v for k, v in UNET_CONFIG.items() if k != "out_channels"}
    config["context_dim"] = 2048
    return comfy.controlnet.ControlNet(cldm.ControlNet(hint_channels=HINT_CHANNELS, device="cpu", **config))


@pytest.mark.parametrize("node", ["omg", "composer", "conductor"])
def test_conditioning_or_controlnet_of_another_family_is_refused_by_name(comfy, base, node):
    _, clip, _ = base
    run = {
        "omg": lambda **kw: run_omg(comfy, base, **kw),
        "composer": lambda **kw: run_composer(comfy, base, **kw),
        "conductor": lambda **kw: run_conductor(comfy, base, **kw),
    }[node]
    name = {"omg": "OMG Sampler", "composer": "LoRA-Composer", "conductor": "Concept Conductor Sampler"}[node]
    with pytest.raises(ValueError, match=rf"^{name}: positive_conditioning is 2048 wide, as SDXL's, but this SD1.5 "):
        run(positive_conditioning=wrong_width())
    with pytest.raises(ValueError, match=rf"^{name}: negative_conditioning is 1024 wide, as SD2's"):
        run(negative_conditioning=wrong_width(1024))
    pos, neg = with_control(sdxl_controlnet(base), clip)
    with pytest.raises(ValueError, match=rf"^{name}: a ControlNet in positive_conditioning reads prompts 2048 wide.*"
                       "Load a ControlNet made for SD1.5"):  # fmt: skip
        run(positive_conditioning=pos, negative_conditioning=neg)
