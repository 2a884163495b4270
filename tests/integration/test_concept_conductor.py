"""Concept Conductor on the real test checkpoint: with no concept the base branch is plain sampling, the
batched branches equal passes with each adapter merged, the injection stays in its masks, two ED-LoRA
concepts on SD1.5 and on an SDXL-shaped UNet, no gradient reaches the weights, no state survives the run,
reference images, bad input."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from tests.support.builders.edlora import clip_te_modules, official_edlora
from tests.support.builders.lora import SD15_ALL, make_lora
from tests.support.builders.sd15 import SHALLOW_TEXT_LAYERS

SHALLOW_TE = clip_te_modules(SHALLOW_TEXT_LAYERS, 768)  # text LoRA on the 3-layer CLIP of tiny_models_shallow_clip

W, H = 128, 96  # non-square on purpose
STEPS = 6
SCENE = "a photo of a cat and a dog on a sofa"


def core(name):
    return importlib.import_module(f"comfy.{name}")


def has_range(t):
    return bool(torch.isfinite(t).all()) and float(t.std()) > 1e-3


def encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def latent(batch=1, h=H, w=W):
    return torch.zeros(batch, 4, h // 8, w // 8)


@pytest.fixture(scope="module")
def base(comfy, tiny_models_shallow_clip):
    from safetensors.torch import save_file

    model, clip, vae = tiny_models_shallow_clip[:3]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("cc_a", "cc_b")):
        save_file(make_lora(model, SD15_ALL, seed=90 + i, scale=0.6), str(d / f"{name}.safetensors"))
    torch.save(
        official_edlora(words=("<cat1>", "<cat2>"), seed=41, lora_scale=0.05, te_modules=SHALLOW_TE), d / "cc_cat.pth"
    )
    torch.save(
        official_edlora(words=("<dog1>", "<dog2>"), seed=42, lora_scale=0.05, te_modules=SHALLOW_TE), d / "cc_dog.pth"
    )
    return model, clip, vae


@pytest.fixture(scope="module")
def cc(comfy):
    return {
        "guider": comfy.pack_module("samplers.concept_conductor.guider"),
        "setup": comfy.pack_module("samplers.concept_conductor.setup"),
        "masks": comfy.pack_module("samplers.concept_conductor.masks"),
    }


def lora_stack(comfy, *entries):
    node = comfy.node_class("MultiConceptStackLoRA")
    stack = None
    for name, word, label in entries:
        stack = node.execute(name, 1.0, 1.0, label, concepts=stack, class_word=word).result[0]
    return stack


def edlora_stack(comfy):
    node = comfy.node_class("MultiConceptStackEDLoRA")
    stack = node.execute("cc_cat.pth", 1.0, 1.0, "cat", class_word="cat").result[0]
    return node.execute("cc_dog.pth", 1.0, 1.0, "dog", concepts=stack, class_word="dog").result[0]


def two_masks(h=H, w=W):
    m = torch.zeros(2, h, w)
    m[0, 8 : h - 8, 0 : w // 2] = 1.0
    m[1, 8 : h - 8, w // 2 :] = 1.0
    return m


def sample(guider, seed=3, steps=STEPS, sampler="euler", h=H, w=W, sigmas=None):
    model = guider.model_patcher
    if sigmas is None:
        sigmas = core("samplers").calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = core("sample").prepare_noise(latent(h=h, w=w), seed)
    with torch.inference_mode():  # as ComfyUI runs nodes (the alignment leaves it for its gradient)
        return guider.sample(noise, latent(h=h, w=w), core("samplers").sampler_object(sampler), sigmas.float(),
                             disable_pbar=True, seed=seed)  # fmt: skip


def plain(model, pos, neg, cfg=5.0, **kw):
    guider = core("samplers").CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    return sample(guider, **kw)


def settings(cc, **kw):
    kw.setdefault("scale_to_steps", None)  # one alignment step per aligned step (the repeats: their own test)
    return cc["guider"].ConductorSettings(**kw)


# ------------------------------------------------------------------------------------ base branch


def test_with_no_concept_the_base_branch_is_plain_sampling(comfy, base, cc):
    # no concept branch, alignment on: the reference is the same prompt from the same noise, so its keys equal
    # the base branch's and the alignment's gradient is exactly zero; the result is plain sampling
    model, clip, _ = base
    g = cc["guider"]
    pos, neg = encode(clip, SCENE), encode(clip, "blurry")
    clone = model.clone()
    state = g.ConductorState(g.conductor_layers(clone.model.diffusion_model), torch.zeros(0, H, W), settings(cc), "T")
    g.install_conductor(clone, state)
    guider = g.ConductorGuider(clone, state)
    guider.set_cfg(5.0)
    guider.set_conductor_conds(pos, neg, [])
    ours = sample(guider)
    theirs = plain(model, pos, neg)
    assert has_range(theirs)
    assert guider.steps_aligned == len(settings(cc).alignment_steps(STEPS)) >= 2
    assert guider.last_loss < 1e-8  # equal keys up to the rounding of a 2-row vs a 1-row call
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ the branches


def test_batched_branches_equal_passes_with_each_adapter_merged(comfy, base, cc):
    # every branch's prediction at one step, from the one batched call, against a separate pass of that
    # branch's prompt with its LoRA merged by ComfyUI (cfg 1: the pass returns the positive row alone)
    model, clip, _ = base
    stack = lora_stack(comfy, ("cc_a.safetensors", "cat", ""), ("cc_b.safetensors", "dog", ""))
    guider = cc["setup"].build_guider("T", model, clip, stack, SCENE, "blurry", 5.0, two_masks(),
                                      settings(cc, alignment_weight=0.0, shape_masks=False))  # fmt: skip
    seen = {}
    original = guider.branch_outputs

    def spy(conds, roles, x, timestep, model_options):
        outs = original(conds, roles, x, timestep, model_options)
        if "outs" not in seen:
            seen.update(outs=[o.clone() for o in outs], x=x.clone(), t=timestep.clone(), roles=dict(roles))
        return outs

    guider.branch_outputs = spy
    assert has_range(sample(guider))
    roles = seen["roles"]
    Role, BASE = cc["guider"].Role, cc["guider"].BASE
    sigma = float(seen["t"].flatten()[0])

    def one_pass(m, text):
        g = core("samplers").CFGGuider(m)
        g.set_conds(encode(clip, text), encode(clip, "unused"))
        g.set_cfg(1.0)
        start = m.model.process_latent_out(seen["x"])
        out = g.sample(torch.zeros_like(start), start, core("samplers").KSAMPLER(_one_call),
                       torch.tensor([sigma, 0.0]), disable_pbar=True, seed=0)  # fmt: skip
        return m.model.process_latent_in(out)

    index = {r: i for i, r in roles.items()}
    for i, concept in enumerate(stack):
        merged = core("sd").load_lora_for_models(model, None, concept.adapter.tensors, 1.0, 0)[0]
        for kind, text in ((0, guider.prompts[i]), (1, "blurry")):
            ours = seen["outs"][index[Role(i, kind)]]
            theirs = one_pass(merged, text)
            assert has_range(theirs)
            torch.testing.assert_close(ours, theirs, atol=3e-4, rtol=1e-3)
    # and the base branch differs from its plain pass only inside the masks' reach (injection on the up path)
    plain_base = one_pass(model, SCENE)
    assert (seen["outs"][index[Role(BASE, 0)]] - plain_base).abs().mean() > 1e-4


def _one_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def test_injection_replaces_base_rows_inside_the_mask_exactly(comfy, base, cc):
    # at an up-path attention output the base rows equal the concept rows inside the mask and their own outside
    model, clip, _ = base
    stack = lora_stack(comfy, ("cc_a.safetensors", "cat", ""))
    mask = torch.zeros(1, H, W)
    mask[0, 16:80, 8:64] = 1.0
    guider = cc["setup"].build_guider("T", model, clip, stack, SCENE, "blurry", 5.0, mask,
                                      settings(cc, alignment_weight=0.0, shape_masks=False))  # fmt: skip
    seen = []
    injection = guider.model_patcher.model_options["transformer_options"]["patches"]["attn1_output_patch"][-1]
    original = injection.__call__

    class Spy(type(injection)):
        def __call__(self, n, extra_options):
            out = original(n, extra_options)
            if extra_options.get("block", ("",))[0] == "output" and not seen:
                seen.append((n.clone(), out.clone(), list(extra_options["cond_or_uncond"])))
            return out

    spy = Spy("attn1")
    guider.model_patcher.model_options["transformer_options"]["patches"]["attn1_output_patch"][-1] = spy
    sample(guider, steps=2)
    n, out, kinds = seen[0]
    per = n.shape[0] // len(kinds)
    rows = {k: slice(j * per, (j + 1) * per) for j, k in enumerate(kinds)}
    tokens = n.shape[1]
    grid = next((h, w) for h, w in ((H // 8, W // 8), (H // 16, W // 16), (H // 32, W // 32)) if h * w == tokens)
    m = cc["masks"].masks_at(mask, grid)[0].flatten().bool()
    assert 0 < int(m.sum()) < tokens
    for base_kind, concept_kind in ((0, 2), (1, 3)):
        b, c = rows[base_kind], rows[concept_kind]
        assert torch.equal(out[b][:, m], n[c][:, m])
        assert torch.equal(out[b][:, ~m], n[b][:, ~m])
        assert torch.equal(out[c], n[c])
        assert (n[b][:, m] - n[c][:, m]).abs().max() > 1e-4  # the test would see a no-op injection


# ------------------------------------------------------------------------------------ whole runs


def _weights_fingerprint(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items() if k.endswith("weight")}


def test_two_edlora_concepts_sd15_no_leaks_no_weight_gradient(comfy, base, cc):
    model, clip, _ = base
    pos, neg = encode(clip, SCENE), encode(clip, "blurry")
    steps = 4  # still 2 aligned steps and 3 mask refinements
    before = plain(model, pos, neg, steps=steps)
    weights = _weights_fingerprint(model)
    stack = edlora_stack(comfy)
    s = settings(cc, refine_start=0.3, refine_end=0.7, refine_every=1, kmeans_restarts=4)
    guider = cc["setup"].build_guider("T", model, clip, stack, SCENE, "blurry", 5.0, two_masks(), s)
    assert "<cat1> <cat2> cat" in guider.prompts[0] and "<dog1> <dog2> dog" in guider.prompts[1]
    out = sample(guider, steps=steps)
    assert has_range(out)
    assert guider.steps_aligned == len(s.alignment_steps(steps)) >= 2 and guider.last_loss > 0
    assert guider.state.refinements == len(s.refine_steps(steps)) >= 2
    state = guider.state
    assert not state.reference_keys and not state.attention and not state.keys and not state.pending
    assert state.mode == "off" and state.masks is None
    final = state.image_masks(H, W)
    assert final.shape == (2, H, W) and float(final.amax(dim=(1, 2)).min()) == 1.0
    # the concepts changed the picture
    assert (out - before).abs().mean() > 1e-3
    # nothing reached the model: no gradient, no weight changed, plain sampling after is bit-identical
    for p in model.model.diffusion_model.parameters():
        assert p.grad is None
    after_weights = _weights_fingerprint(model)
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    assert torch.equal(plain(model, pos, neg, steps=steps), before)


def test_a_reference_latent_is_inverted_and_aligned_to(comfy, base, cc):
    model, clip, _ = base
    stack = lora_stack(comfy, ("cc_a.safetensors", "cat", ""), ("cc_b.safetensors", "dog", ""))
    pos, neg = encode(clip, SCENE), encode(clip, "blurry")
    steps = 3  # 2 aligned steps
    reference = plain(model, pos, neg, seed=11, steps=steps)  # as VAE Encode gives it
    s = settings(cc, shape_masks=False)
    a = cc["setup"].build_guider(
        "T", model, clip, stack, SCENE, "blurry", 5.0, two_masks(), s, reference_latent=reference
    )
    b = cc["setup"].build_guider("T", model, clip, stack, SCENE, "blurry", 5.0, two_masks(), s)
    out_a, out_b = sample(a, steps=steps), sample(b, steps=steps)
    assert has_range(out_a) and has_range(out_b)
    assert a.steps_aligned == b.steps_aligned == len(s.alignment_steps(steps)) >= 2
    assert (out_a - out_b).abs().mean() > 1e-4  # another reference, another layout pull


def test_sdxl_shaped_unet_two_edlora_concepts(comfy):
    # SDXL's layers (output_blocks.1, fifth transformer block, for alignment and masks), both text encoders,
    # 70-layer ED-LoRA routing in the branches
    from tests.integration.test_edlora_sdxl import SECTION, TE_LAYERS, sdxl_file
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    d = comfy.models_dir / "loras"
    torch.save({"params": sdxl_file(("<xcat1>", "<xcat2>"), seed=51)}, d / "cc_xl_cat.pth")
    torch.save({"params": sdxl_file(("<xdog1>", "<xdog2>"), seed=52)}, d / "cc_xl_dog.pth")
    model = build_tiny_sdxl(seed=5, all_cross_attention=True)
    clip = build_tiny_clip("sdxl", seed=6, layers=TE_LAYERS, max_length=SECTION)
    g = cc_modules(comfy)
    layers = g["guider"].conductor_layers(model.model.diffusion_model)
    assert layers.alignment == layers.masks == ("output", 1, 4)
    node = comfy.node_class("MultiConceptStackEDLoRA")
    stack = node.execute("cc_xl_cat.pth", 1.0, 1.0, "cat", class_word="cat").result[0]
    stack = node.execute("cc_xl_dog.pth", 1.0, 1.0, "dog", concepts=stack, class_word="dog").result[0]
    w, h = 256, 192
    s = g["guider"].ConductorSettings(refine_start=0.3, refine_end=0.7, refine_every=1, kmeans_restarts=4,
                                      scale_to_steps=None)  # fmt: skip
    scene = "a cat and a dog"
    pos, neg = encode(clip, scene), encode(clip, "blurry")
    before = plain(model, pos, neg, h=h, w=w)
    guider = g["setup"].build_guider("T", model, clip, stack, scene, "blurry", 5.0, two_masks(h, w), s)
    out = sample(guider, h=h, w=w)
    assert has_range(out) and has_range(before)
    assert guider.steps_aligned >= 2 and guider.last_loss > 0
    assert guider.state.refinements >= 2
    assert (out - before).abs().mean() > 1e-3
    assert torch.equal(plain(model, pos, neg, h=h, w=w), before)


def cc_modules(comfy):
    return {
        "guider": comfy.pack_module("samplers.concept_conductor.guider"),
        "setup": comfy.pack_module("samplers.concept_conductor.setup"),
    }


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_with_the_fix(comfy, base, cc):
    model, clip, _ = base
    E = cc["guider"].ConductorError
    stack = lora_stack(comfy, ("cc_a.safetensors", "cat", ""), ("cc_b.safetensors", "dog", ""))
    build = cc["setup"].build_guider
    s = settings(cc)
    with pytest.raises(E, match="1 mask\\(s\\) for 2 concept"):
        build("T", model, clip, stack, SCENE, "", 5.0, two_masks()[:1], s)
    with pytest.raises(E, match="scene_prompt is empty"):
        build("T", model, clip, stack, "  ", "", 5.0, two_masks(), s)
    # masks made for another picture shape
    guider = build("T", model, clip, stack, SCENE, "", 5.0, two_masks(64, 256), s)
    with pytest.raises(ValueError, match="aspect|do not fit"):
        sample(guider)
    # a reference of another size
    ref = torch.zeros(1, 4, 8, 8)
    guider = build("T", model, clip, stack, SCENE, "", 5.0, two_masks(), s, reference_latent=ref)
    with pytest.raises(E, match="reference is 64x64 px"):
        sample(guider)
    # a concept that brings nothing (a LoRA at UNet strength 0, no words)
    weak = (
        comfy.node_class("MultiConceptStackLoRA").execute("cc_a.safetensors", 0.0, 1.0, "", class_word="cat").result[0]
    )
    with pytest.raises(E, match="brings nothing to its branch"):
        build("T", model, clip, weak, SCENE, "", 5.0, two_masks()[:1], s)
    # a sampler that cannot take the alignment's latent steps
    guider = build("T", model, clip, stack, SCENE, "", 5.0, two_masks(), s)
    with pytest.raises(E, match="cannot take the layout alignment"):
        sample(guider, sampler="heun")


# ------------------------------------------------------------------------------------------ the nodes


def regions_of(comfy, boxes, w=W, h=H):
    import json

    return comfy.node_class("MultiConceptRegions").execute(w, h, json.dumps({"boxes": boxes})).result[0]


TWO_BOXES = [
    {"x": 0, "y": 0.1, "w": 0.5, "h": 0.8, "label": "cat"},
    {"x": 0.5, "y": 0.1, "w": 0.5, "h": 0.8, "label": "dog"},
]


def run_sampler_node(comfy, base, stack, regions=None, masks=None, **kw):
    model, clip, vae = base
    args = dict(noise_seed=3, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", concepts=stack,
                scene_prompt=SCENE, negative="blurry", regions=regions, masks=masks, kmeans_restarts=4,
                alignment_scale="per step")  # fmt: skip
    args.update(kw)
    return comfy.node_class("MultiConceptConceptConductor").execute(model, clip, vae, {"samples": latent()}, **args)


def test_the_sampler_node_runs_with_regions_and_shows_its_masks(comfy, base):
    stack = edlora_stack(comfy)
    out = run_sampler_node(comfy, base, stack, regions_of(comfy, TWO_BOXES)).result
    samples, masks, preview = out
    assert has_range(samples["samples"])
    assert masks.shape == (2, H, W) and preview.shape == (1, H, W, 3) and has_range(preview)
    # the guider node builds the same guider; SamplerCustomAdvanced-style sampling gives the same picture
    model, clip, _ = base
    guider, start, _ = (
        comfy.node_class("MultiConceptConceptConductorGuider")
        .execute(
            model,
            clip,
            5.0,
            W,
            H,
            stack,
            SCENE,
            "blurry",
            regions=regions_of(comfy, TWO_BOXES),
            kmeans_restarts=4,
            alignment_scale="per step",
        )
        .result
    )
    assert start.shape == (2, H, W)
    torch.testing.assert_close(sample(guider, steps=4), samples["samples"], atol=1e-4, rtol=1e-4)


def test_without_boxes_the_sampler_takes_the_masks_of_the_reference_subjects(comfy, base, cc):
    """Neither regions nor masks: each concept's mask comes from its class word's attention in the plain scene
    sample from the same seed (the official method takes the reference's subjects' masks)."""
    model, clip, vae = base
    stack = lora_stack(comfy, ("cc_a.safetensors", "cat", ""), ("cc_b.safetensors", "dog", ""))
    out = run_sampler_node(comfy, base, stack, steps=3, shape_masks=False).result
    assert has_range(out[0]["samples"])
    found = comfy.pack_module("samplers.concept_conductor.reference_masks").reference_masks(
        model, clip, vae, stack, {"samples": latent()}, 3, 3, 5.0, "euler", "normal", SCENE, encode(clip, SCENE),
        encode(clip, "blurry"),
    )  # fmt: skip
    grid = (H // 8, W // 8)
    expected = cc["masks"].masks_at(found.masks, grid)
    assert expected.shape == (2, *grid) and all(float(m.sum()) > 0 for m in expected)
    assert not torch.equal(expected[0], expected[1])  # the cat's and the dog's own attention
    assert torch.equal(cc["masks"].masks_at(out[1], grid), expected)  # shape masks off: the masks it started from
    assert "class word's attention" in found.how and not found.refined
    with pytest.raises(ValueError, match="^Concept Conductor Sampler: .*'horse'.* is not in it"):
        run_sampler_node(comfy, base, lora_stack(comfy, ("cc_a.safetensors", "horse", "")), steps=2)


def test_alignment_steps_loss_mask_and_reference_prompt_as_set(comfy, base, cc, monkeypatch):
    """The latent step's weight is alignment_weight x 200 / steps (scaled) or alignment_weight (per step); with
    use_loss_mask the loss weighs the tokens by the given masks summed (the official foreground); a reference is
    inverted with reference_prompt's encoding."""
    model, clip, _ = base
    stack = lora_stack(comfy, ("cc_a.safetensors", "cat", ""), ("cc_b.safetensors", "dog", ""))
    guider_mod = cc["guider"]
    weights, foregrounds, inverted = [], [], []
    real_step, real_loss, real_plain = (
        guider_mod.latent_step,
        guider_mod.layout_loss,
        guider_mod.ConductorGuider._plain_guider,
    )
    monkeypatch.setattr(guider_mod, "latent_step", lambda g, s, w: weights.append(w) or real_step(g, s, w))
    monkeypatch.setattr(guider_mod, "layout_loss", lambda *a: foregrounds.append(a[4][0]) or real_loss(*a))
    monkeypatch.setattr(guider_mod.ConductorGuider, "_plain_guider",
                        lambda self, cfg, positive=None: inverted.append(positive) or real_plain(self, cfg, positive))  # fmt: skip
    strips = torch.zeros(2, H, W)  # a column of the alignment layer's 3x4 grid each, the rest background
    strips[0, :, : W // 4], strips[1, :, W // 2 : 3 * W // 4] = 1.0, 1.0
    # scaled to a run of 9 steps (the default is the official 200): its 5 aligned steps over our 3 at 3 steps give
    # 2 repeats, or 5/3 of the weight
    for scale, by, loss_mask, expected, repeats in ((9, "repeat", False, 10.0, 2), (9, "weight", False, 50 / 3, 1),
                                                    (None, "repeat", True, 10.0, 1)):  # fmt: skip
        s = settings(cc, shape_masks=False, alignment_end=0.5, scale_to_steps=scale, scale_by=by,
                     use_loss_mask=loss_mask)  # fmt: skip
        weights.clear(), foregrounds.clear()
        guider = cc["setup"].build_guider("T", model, clip, stack, SCENE, "blurry", 5.0, strips, s)
        assert has_range(sample(guider, steps=3))
        assert len(s.alignment_steps(9)) == 5 and len(s.alignment_steps(3)) == 3
        assert weights == [pytest.approx(expected)] * (repeats * len(s.alignment_steps(3))) and weights
        assert guider.steps_aligned == len(weights)
        if not loss_mask:
            assert all(f is None for f in foregrounds)
            continue
        fg = foregrounds[0].cpu()  # the alignment layer's grid: the two masks' cells (disjoint here: 0 or 1)
        grid = (
            cc["masks"]
            .masks_at(strips, comfy.pack_module("samplers.scoped_lora.lowrank").token_grid(fg.numel(), H // 8, W // 8))
            .bool()
        )
        assert torch.equal(fg, grid.float().sum(0).flatten()) and float(fg.mean()) == 0.5
    # reference_prompt: the node refuses it without a reference, and inverts the reference with it
    node = comfy.node_class("MultiConceptConceptConductorGuider")
    with pytest.raises(ValueError, match="^Concept Conductor Guider: reference_prompt describes a reference, but none"):
        node.execute(model, clip, 5.0, W, H, stack, SCENE, "", masks=two_masks(), reference_prompt="a cat")
    reference = {"samples": torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(11))}
    guider = node.execute(model, clip, 5.0, W, H, stack, SCENE, "", masks=two_masks(), reference_latent=reference,
                          reference_prompt="a photo of two animals", shape_masks=False,
                          alignment_scale="per step").result[0]  # fmt: skip
    node_class = type(guider)  # the nodes' copy of the module (ComfyUI loaded the pack under its own name)
    monkeypatch.setattr(node_class, "_plain_guider",
                        lambda self, cfg, positive=None: inverted.append(positive) or real_plain(self, cfg, positive))  # fmt: skip
    inverted.clear()
    assert has_range(sample(guider, steps=2))
    assert torch.equal(inverted[0][0][0], encode(clip, "a photo of two animals")[0][0])


def test_the_nodes_refuse_bad_input_naming_themselves(comfy, base):
    stack = edlora_stack(comfy)
    import sys

    error = sys.modules[comfy.node_class("MultiConceptConceptConductor").__module__].NodeError
    with pytest.raises(error, match="Concept Conductor Sampler: .*no region has that label"):
        run_sampler_node(comfy, base, stack, regions_of(comfy, TWO_BOXES[:1]))
    with pytest.raises(error, match="Concept Conductor Guider: connect regions .* or masks .*finds them itself"):
        comfy.node_class("MultiConceptConceptConductorGuider").execute(base[0], base[1], 5.0, W, H, stack, SCENE, "")
    with pytest.raises(error, match="Concept Conductor Sampler: 1 mask\\(s\\) for 2 concept"):
        run_sampler_node(comfy, base, stack, masks=torch.ones(1, H, W))
    with pytest.raises(error, match="Concept Conductor Sampler: .*do not fit"):
        run_sampler_node(comfy, base, stack, masks=torch.ones(2, 64, 256))
    with pytest.raises(error, match="reference_image is 64x64 px"):
        run_sampler_node(comfy, base, stack, regions_of(comfy, TWO_BOXES), reference_image=torch.rand(1, 64, 64, 3))
    # a refinement window that ends before it starts (nothing runs before the check: no sampling here)
    window = dict(refine_start=0.6, refine_end=0.3)
    with pytest.raises(error, match="Concept Conductor Sampler: refine_start \\(0.6\\) is after refine_end \\(0.3\\)"):
        run_sampler_node(comfy, base, stack, regions_of(comfy, TWO_BOXES), **window)
    guider_node = comfy.node_class("MultiConceptConceptConductorGuider")
    with pytest.raises(error, match="Concept Conductor Guider: refine_start .* turn shape_masks off"):
        guider_node.execute(
            base[0], base[1], 5.0, W, H, stack, SCENE, "", regions=regions_of(comfy, TWO_BOXES), **window
        )
    # with shape_masks off the window is unused, so it is not an error
    guider = guider_node.execute(base[0], base[1], 5.0, W, H, stack, SCENE, "", regions=regions_of(comfy, TWO_BOXES),
                                 shape_masks=False, **window).result[0]  # fmt: skip
    # a guider built for one size and sampled at another (in SamplerCustomAdvanced): refused before any step,
    # naming the node, whatever the aspect ratio
    for h, w in ((H * 2, W * 2), (H, W + 32)):
        with pytest.raises(ValueError, match=f"^Concept Conductor Guider: it was built for a {W}x{H} image .*is "
                           f"{w}x{h}. Set the Guider's width and height"):  # fmt: skip
            sample(guider, h=h, w=w, steps=1)


def test_a_call_split_for_low_memory_gives_the_same_picture(comfy, base, cc, monkeypatch):
    # with no free memory ComfyUI runs each cond of a step in its own call (concepts first): the concepts'
    # outputs are kept for the base rows' call and injected there, the same maths as in one batched call
    model, clip, _ = base
    stack = lora_stack(comfy, ("cc_a.safetensors", "cat", ""), ("cc_b.safetensors", "dog", ""))
    s = settings(cc, shape_masks=False)
    batched = sample(cc["setup"].build_guider("T", model, clip, stack, SCENE, "blurry", 5.0, two_masks(), s), steps=3)
    mm = core("model_management")
    real = mm.get_free_memory

    def no_room_for_batches(*args, **kwargs):  # only calc_cond_batch's question gets "no memory"
        return 1 if sys._getframe(1).f_code.co_name == "_calc_cond_batch" else real(*args, **kwargs)

    monkeypatch.setattr(mm, "get_free_memory", no_room_for_batches)
    calls = []
    guider = cc["setup"].build_guider("T", model, clip, stack, SCENE, "blurry", 5.0, two_masks(), s)
    original = guider.branch_outputs

    def count(conds, roles, x, timestep, model_options):
        before = len(guider.state.pending)
        out = original(conds, roles, x, timestep, model_options)
        calls.append(before)
        return out

    guider.branch_outputs = count
    unet_calls = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: unet_calls.append(a[0].shape[0]))
    try:
        split = sample(guider, steps=3)
    finally:
        hook.remove()
    assert max(unet_calls) <= 1 and len(unet_calls) >= 3 * 6  # one cond per call: 6 calls a step at least
    assert has_range(batched) and calls
    assert max(calls) == 0 and guider.state.pending == {}  # kept only within a step
    torch.testing.assert_close(split, batched, atol=2e-4, rtol=1e-3)


def test_branch_prompts_of_other_lengths_are_repeated_to_one_length_or_refused(comfy):
    # (the fuzz found it: a long scene prompt beside short ones was split into separate calls, then refused)
    ConductorError = comfy.pack_module("samplers.concept_conductor.guider").ConductorError
    equal_token_lengths = comfy.pack_module("samplers.concept_conductor.setup").equal_token_lengths

    def cond(sections):
        return [[torch.arange(77 * sections, dtype=torch.float32).reshape(1, 77 * sections, 1), {"k": sections}]]

    # a 3-section scene prompt, 1-section concept prompts, a 2-section negative: all to lcm = 462 tokens
    pairs = [(cond(3), cond(2)), (cond(1), cond(1)), (cond(1), cond(2))]
    out = equal_token_lengths(pairs, "CC")
    for (pos, neg), (pos0, neg0) in zip(out, pairs, strict=True):
        for new, old in ((pos, pos0), (neg, neg0)):
            t, t0 = new[0][0], old[0][0]
            assert t.shape[1] == 462 and new[0][1] is old[0][1]
            assert torch.equal(t, t0.repeat(1, 462 // t0.shape[1], 1))  # repetition: attention is unchanged
    same = [(cond(1), cond(1))]
    assert equal_token_lengths(same, "CC") is same
    # 5, 4 and 3 sections: a common length of 60 sections is refused, naming the lengths
    with pytest.raises(ConductorError, match=r"CC: the prompts encode to 231, 308, 385 tokens"):
        equal_token_lengths([(cond(5), cond(4)), (cond(3), cond(3))], "CC")
