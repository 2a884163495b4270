"""Mix-of-Show regional sampling composed with ComfyUI's stock ControlNet, as the node's help page says to
use it: the node's positive/negative go through the stock Apply ControlNet (ControlNetApplyAdvanced), its
MODEL and those conditionings into a stock sampler. The ControlNet is an SD1.5-layout ControlNet file for
the tiny checkpoint (tests/support/builders/controlnet.py), loaded by ComfyUI's own loader."""

from __future__ import annotations

import pytest
import torch

from tests.integration.test_mixofshow_regional import LEFT, RIGHT, plain_conds, regional, sample
from tests.support.builders.controlnet import build_controlnet_state_dict

H, W = 96, 128
STEPS = 2


@pytest.fixture(scope="module")
def base(comfy, tiny_models):

    model, clip, vae = tiny_models[:3]
    return model, clip, vae


@pytest.fixture(scope="module")
def controlnet(base, tmp_path_factory):
    """The tiny ControlNet written as an fp16 safetensors file and loaded by ``comfy.controlnet.load_controlnet``
    (what the stock ControlNetLoader node calls with the file's path)."""
    import comfy.controlnet as controlnet_mod
    from safetensors.torch import save_file

    sd = build_controlnet_state_dict(base[0].model.diffusion_model.state_dict(), seed=7)
    path = tmp_path_factory.mktemp("controlnet") / "mc_tiny_controlnet.safetensors"
    save_file(sd, str(path))
    cn = controlnet_mod.load_controlnet(str(path))
    assert type(cn) is controlnet_mod.ControlNet, type(cn)
    # ComfyUI detected the SD1.5 layout and loaded every tensor of the file: none missing, none left over
    loaded = cn.control_model.state_dict()
    assert set(loaded) == {k.removeprefix("control_model.") for k in sd}
    assert all(torch.equal(loaded[k.removeprefix("control_model.")].to(v.dtype), v) for k, v in sd.items())
    assert cn.control_model.model_channels == 320 and len(cn.control_model.zero_convs) == 12
    return cn


def hint_image():
    """A white square on black, ``[1, H, W, 3]`` (an IMAGE), off-centre."""
    image = torch.zeros(1, H, W, 3)
    image[:, 24:72, 56:104] = 1.0
    return image


def apply_controlnet(cn, pos, neg, strength=1.0):
    import nodes

    return nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, hint_image(), strength, 0.0, 1.0)


@pytest.fixture(scope="module")
def graphs(comfy, base, controlnet):
    """The regional node's outputs and the plain global prompt, each with and without the ControlNet."""
    model, clip, _ = base
    m, pos, neg, _ = regional(comfy, model, clip, [LEFT, RIGHT])
    ppos, pneg = plain_conds(clip)
    return {
        "regional+cn": (m, *apply_controlnet(controlnet, pos, neg)),
        "regional": (m, pos, neg),
        "plain+cn": (model, *apply_controlnet(controlnet, ppos, pneg)),
        "plain": (model, ppos, pneg),
    }


@pytest.fixture(scope="module")
def runs(graphs, controlnet):
    """``{graph: (x0 at the first step, final latent)}``, plus ``"controlnet contexts"``: the context every
    cross-attention layer of the ControlNet's own network projected during the regional+ControlNet run."""
    seen = []
    handles = [
        module.to_k.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0].detach().clone()))
        for name, module in controlnet.control_model.named_modules()
        if name.endswith("attn2")
    ]
    out = {}
    try:
        out["regional+cn"] = sample(*graphs["regional+cn"], steps=STEPS)
    finally:
        for h in handles:
            h.remove()
    for name in ("regional", "plain+cn", "plain"):
        out[name] = sample(*graphs[name], steps=STEPS)
    out["controlnet contexts"] = seen
    return out


def test_apply_controlnet_keeps_the_regions_and_adds_the_control(comfy, graphs, controlnet):
    from comfy.controlnet import ControlNet

    key = comfy.pack_module("samplers.mixofshow.sampling").REGIONAL_KEY
    _, pos, neg = graphs["regional"]
    _, cpos, cneg = graphs["regional+cn"]
    for before, after in ((pos, cpos), (neg, cneg)):
        assert len(after) == len(before) == 1
        assert after[0][0] is before[0][0]  # the global encoding, untouched
        assert after[0][1][key] is before[0][1][key]  # the very same RegionalSide object
        control = after[0][1]["control"]
        assert isinstance(control, ControlNet) and control.strength == 1.0
        assert torch.equal(control.cond_hint_original, hint_image().movedim(-1, 1))
        assert control.control_model is controlnet.control_model  # a copy sharing the loaded network
        assert "control" not in before[0][1]  # the node's own outputs are not modified
    assert cpos[0][1]["control"] is cneg[0][1]["control"]  # one ControlNet for both sides (one batch)
    assert cpos[0][1][key] is not cneg[0][1][key]  # each side still has its own region encodings
    assert cpos[0][1][key].layout is cneg[0][1][key].layout


def test_the_controlnet_and_the_regions_both_act_when_composed(base, runs):
    _, _, vae = base
    for name in ("regional+cn", "regional", "plain+cn", "plain"):
        x0, final = runs[name]
        assert torch.isfinite(x0).all() and torch.isfinite(final).all(), name
        assert float(x0.std()) > 0.05 and float(final.std()) > 0.05, name
    with torch.inference_mode():  # as VAEDecode runs in ComfyUI's executor
        image = vae.decode(runs["regional+cn"][1])
    assert image.shape == (1, H, W, 3) and torch.isfinite(image).all()
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.02

    def effects(i):
        """Mean absolute differences, relative to the std of the composed result."""
        x = {name: runs[name][i] for name in ("regional+cn", "regional", "plain+cn", "plain")}
        scale = float(x["regional+cn"].std())

        def d(a, b):
            return float((x[a] - x[b]).abs().mean()) / scale

        return {
            "controlnet": d("regional+cn", "regional"),  # the ControlNet acts on the regional graph
            "controlnet, plain": d("plain+cn", "plain"),  # ... as it does on plain sampling
            "regions": d("regional+cn", "plain+cn"),  # the regions act under the ControlNet
            "regions, no controlnet": d("regional", "plain"),  # ... as they do without it
        }

    # Measured (2 steps, the same to 0.001 for x0 at the first step and the final latent): the ControlNet moves
    # the result by 0.26 of its std (0.27 on plain sampling), the regions by 0.56 (0.58 without the
    # ControlNet). A ControlNet that did not act, or regions lost in Apply ControlNet, would give 0.
    for i, what in enumerate(("x0", "final")):
        e = effects(i)
        print(f"\n{what}: " + ", ".join(f"{k} {v:.3f}" for k, v in e.items()))
        assert e["controlnet"] > 0.1, (what, e)
        assert e["regions"] > 0.3, (what, e)
        # composed, each keeps about its own strength: neither switches the other off
        assert 0.7 < e["controlnet"] / e["controlnet, plain"] < 1.4, (what, e)
        assert 0.7 < e["regions"] / e["regions, no controlnet"] < 1.4, (what, e)


def test_the_controlnet_reads_the_global_prompt_not_the_region_prompts(comfy, graphs, runs):
    """What happens: ComfyUI calls the ControlNet's network with the batch's ``c_crossattn`` (here the global
    prompt and the global negative, batched) and without transformer_options, so the node's regional
    attention patch never runs inside it; the region prompts reach the UNet only. (The help page says so.)"""
    key = comfy.pack_module("samplers.mixofshow.sampling").REGIONAL_KEY
    _, pos, neg = graphs["regional"]
    seen = runs["controlnet contexts"]
    # 6 input-block + 1 middle-block cross-attention layers, once per step (cond and uncond in one batch)
    assert len(seen) == 7 * STEPS
    regions = [c[:, 0] for side in (pos[0][1][key], neg[0][1][key]) for c in side.contexts]
    for ctx in seen:
        assert ctx.shape == (2, *pos[0][0].shape[1:])
        rows = list(ctx)
        assert any(torch.equal(r, pos[0][0][0].to(r)) for r in rows)  # the global prompt
        assert any(torch.equal(r, neg[0][0][0].to(r)) for r in rows)  # the global negative
        # no row is a region's prompt or negative (the right box has none of its own: it uses the global one)
        own = [rc[0] for rc in regions if not torch.equal(rc[0], neg[0][0][0])]
        assert own and not any(torch.allclose(r, rc.to(r), atol=1e-4) for r in rows for rc in own)


def official_map(boxes, weights, outside, fh, fw):
    """The official spatial adaptor weight (Mix-of-Show pipeline_regionally_t2iadapter.py l. 492-511): ``outside``
    everywhere, each box's weight on rows ceil(y0 * fh) .. floor(y1 * fh), columns likewise (later boxes win)."""
    import math

    out = torch.full((fh, fw), float(outside))
    for box, w in zip(boxes, weights, strict=True):
        y0, x0, y1, x1 = box["y"], box["x"], box["y"] + box["h"], box["x"] + box["w"]
        out[math.ceil(y0 * fh) : math.floor(y1 * fh), math.ceil(x0 * fw) : math.floor(x1 * fw)] = w
    return out


def test_control_weights_scale_each_box_as_the_official_spatial_map(comfy, base, controlnet):
    """What the UNet receives (an APPLY_MODEL wrapper inside the node's) is the ControlNet's residuals times the
    official map at each residual's grid; weights of 1 change nothing, bit for bit."""
    import importlib

    apply_model = importlib.import_module("comfy.patcher_extension").WrappersMP.APPLY_MODEL
    model, clip, _ = base
    seen: dict[str, list] = {}

    def run(weights, outside):
        m, pos, neg, _ = regional(comfy, model, clip, [LEFT, RIGHT], control_weights=weights,
                                  control_weight_outside=outside)  # fmt: skip
        m = m.clone()
        got = seen.setdefault(f"{weights}|{outside}", [])

        def capture(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
            got.append([r.clone() for name in ("input", "middle", "output") for r in control[name] if r is not None])
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

        m.add_wrapper_with_key(apply_model, "test_capture", capture)
        return sample(m, *apply_controlnet(controlnet, pos, neg), steps=1)

    plain = run("", 1.0)
    ones = run("cat=1, dog=1", 1.0)
    assert torch.equal(plain[1], ones[1])
    weighted = run("cat=0, dog=0.5", 2.0)
    assert float((weighted[1] - plain[1]).abs().mean()) > 1e-3
    before, after = seen["|1.0"][0], seen["cat=0, dog=0.5|2.0"][0]
    assert len(before) == len(after) >= 12
    for r0, r1 in zip(before, after, strict=True):
        expected = r0 * official_map([LEFT, RIGHT], [0.0, 0.5], 2.0, *r0.shape[-2:])
        torch.testing.assert_close(r1, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^Mix-of-Show Regional: control_weights names 'horse'"):
        regional(comfy, model, clip, [LEFT, RIGHT], control_weights="horse=1")
    with pytest.raises(ValueError, match="control_weights: the weight of 'cat' must be a number from 0 up"):
        regional(comfy, model, clip, [LEFT, RIGHT], control_weights="cat=nan")
