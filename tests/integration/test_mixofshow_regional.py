"""Mix-of-Show regional sampling on the real test checkpoint: locality, per-region layer-wise encodings,
text-encoder LoRA isolation, region negatives, composition with other patches, no state leaks, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.builders.edlora import clip_te_modules, official_edlora
from tests.support.builders.sd15 import SHALLOW_TEXT_LAYERS
from tests.support.graphs import plain_txt2img

SHALLOW_TE = clip_te_modules(SHALLOW_TEXT_LAYERS, 768)  # text LoRA on the 3-layer CLIP of tiny_models_shallow_clip

W, H = 128, 96  # non-square on purpose
LEFT = {"x": 0.0625, "y": 0.125, "w": 0.375, "h": 0.75, "label": "cat", "prompt": "a photo of a cat"}
RIGHT = {"x": 0.5625, "y": 0.0833, "w": 0.375, "h": 0.75, "label": "dog", "prompt": "a photo of a dog"}
GLOBAL = "a cat and a dog on a sofa, living room"
NODE_ID = "MultiConceptMixOfShowRegional"


@pytest.fixture(scope="module")
def base(comfy, tiny_models_shallow_clip):
    model, clip, vae = tiny_models_shallow_clip[:3]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    # strong enough text-encoder LoRAs that using the wrong one would show
    torch.save(
        official_edlora(words=("<cat1>", "<cat2>"), seed=31, lora_scale=0.08, te_modules=SHALLOW_TE), d / "mos_cat.pth"
    )
    torch.save(
        official_edlora(words=("<dog1>", "<dog2>"), seed=32, lora_scale=0.08, te_modules=SHALLOW_TE), d / "mos_dog.pth"
    )
    return model, clip, vae


def regions_of(comfy, boxes, width=W, height=H):
    layout = comfy.pack_module("samplers.regions")
    return layout.parse_regions(json.dumps({"boxes": boxes}), width, height)


def stack_of(comfy, *entries):
    """entries: (file, region label)."""
    node = comfy.node_class("MultiConceptStackEDLoRA")
    stack = None
    for name, label in entries:
        stack = node.execute(name, 0.7, 0.7, label, concepts=stack).result[0]
    return stack


def regional(comfy, model, clip, boxes, global_prompt=GLOBAL, negative="blurry", concepts=None, **kw):
    node = comfy.node_class(NODE_ID)
    out = node.execute(model, clip, regions_of(comfy, boxes), global_prompt, negative, concepts=concepts, **kw)
    return out.result


def plain_conds(clip, positive=GLOBAL, negative="blurry"):
    import nodes

    encode = nodes.CLIPTextEncode().encode
    return encode(clip, positive)[0], encode(clip, negative)[0]


def sample(model, pos, neg, seed=5, steps=3, cfg=4.0):
    """``(x0 predicted at the first step, final latent)``."""
    import comfy.sample

    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    first = []

    def callback(step, x0, x, total):
        if step == 0:
            first.append(x0.detach().clone())

    out = comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", pos, neg, latent, callback=callback, disable_pbar=True, seed=seed
    )
    return first[0], out


def box_mask(box, h=H // 8, w=W // 8):
    m = torch.zeros(h, w)
    x0, y0 = round(box["x"] * w), round(box["y"] * h)
    x1, y1 = round((box["x"] + box["w"]) * w), round((box["y"] + box["h"]) * h)
    m[y0:y1, x0:x1] = 1
    return m


def leak(delta, mask, margin=1):
    from multiconcept.samplers.scoped_lora.locality import leak as measure

    return measure(delta, mask, margin)


# ------------------------------------------------------------------------------------------- locality


def test_a_region_prompt_changes_the_output_only_inside_its_region(comfy, base):
    model, clip, _ = base
    both = regional(comfy, model, clip, [LEFT, RIGHT])
    only_left = regional(comfy, model, clip, [LEFT])
    x_both, _ = sample(*both[:3])
    x_left, _ = sample(*only_left[:3])
    assert torch.isfinite(x_both).all() and x_both.std() > 0.05
    inside = box_mask(RIGHT)
    change = leak(x_both - x_left, inside)
    # Measured 0.17 at the first step: the region result replaces the global one only inside the box (every
    # cross-attention layer), and only the plain network's own mixing (self-attention, convolutions) carries
    # it further. A patch that ignored the mask (the region prompt everywhere) gives about 1.
    assert change < 0.35, change

    # the global prompt governs the outside: there the regional output stays close to plain sampling of the
    # global prompt, much closer than a change of the global prompt moves it
    plain = sample(model, *plain_conds(clip))[0]
    other = sample(model, *plain_conds(clip, "a red car on a mountain road at night"))[0]
    boxes = torch.maximum(box_mask(LEFT), box_mask(RIGHT))
    grown = torch.nn.functional.max_pool2d(boxes[None, None], 3, stride=1, padding=1)[0, 0]
    far = grown == 0

    def outside(a, b):
        return float((a - b).abs().mean(dim=(0, 1))[far].mean())

    # measured 0.71 vs 1.66 (0.43): the random test network mixes positions far more than a trained one
    assert outside(x_both, plain) < 0.6 * outside(other, plain), (outside(x_both, plain), outside(other, plain))


def test_without_regions_covering_anything_the_output_is_plain_sampling(comfy, base):
    """A box with a zero weight can't exist, but a box with the global prompt as its prompt gives the global
    result inside it: then regional sampling equals plain sampling (to float rounding)."""
    model, clip, _ = base
    same = dict(LEFT, prompt=GLOBAL, negative="blurry")
    m, pos, neg, _ = regional(comfy, model, clip, [same])
    ours = sample(m, pos, neg)
    plain = sample(model, *plain_conds(clip))
    assert torch.allclose(ours[1], plain[1], atol=1e-4), (ours[1] - plain[1]).abs().max()


# ------------------------------------------------------------------------ concepts: encodings and LoRA


def _expected_layers(comfy, clip, concept_file, text, strength=0.7):
    """``[1, 16, 77, 768]``: ``text`` encoded by the ED-LoRA Loader's CLIP with only this concept."""
    import nodes

    loader = comfy.node_class("MultiConceptEDLoRALoader")
    model = nodes.CheckpointLoaderSimple().load_checkpoint
    del model
    _, c, *_ = loader.execute(_dummy_model(comfy), clip, concept_file, 0.0, strength).result
    cond = nodes.CLIPTextEncode().encode(c, text)[0]
    layerwise = cond[0][1].get(comfy.pack_module("samplers.edlora.clip").LAYERWISE_KEY)
    return cond[0][0][:, None] if layerwise is None else layerwise.layers


_MODEL = {}


def _dummy_model(comfy):
    return _MODEL["model"]


def test_each_region_reads_its_own_concepts_layer_embedding_and_text_lora(comfy, base):
    model, clip, _ = base
    _MODEL["model"] = model
    stack = stack_of(comfy, ("mos_cat.pth", "cat"), ("mos_dog.pth", "dog"))
    left = dict(LEFT, prompt="a photo of <cat1> <cat2>, a cat", negative="lowres")
    right = dict(RIGHT, prompt="a photo of <dog1> <dog2>, a dog")
    m, pos, neg, preview = regional(comfy, model, clip, [left, right], concepts=stack)
    assert preview.shape == (1, H, W, 3)
    key = comfy.pack_module("samplers.mixofshow.sampling").REGIONAL_KEY
    pos_side, neg_side = pos[0][1][key], neg[0][1][key]

    cat = _expected_layers(comfy, clip, "mos_cat.pth", left["prompt"])
    dog = _expected_layers(comfy, clip, "mos_dog.pth", right["prompt"])
    cat_neg = _expected_layers(comfy, clip, "mos_cat.pth", "lowres")  # no concept words: one layer
    assert torch.equal(pos_side.contexts[0], cat) and torch.equal(pos_side.contexts[1], dog)
    assert torch.equal(neg_side.contexts[0], cat_neg)
    # the right box has no negative of its own: "" with its concept, as official Mix-of-Show encodes it
    # (mixofshow/pipelines/pipeline_regionally_t2iadapter.py:286-295), not the global negative
    dog_neg = _expected_layers(comfy, clip, "mos_dog.pth", "")
    assert torch.equal(neg_side.contexts[1], dog_neg) and not torch.allclose(dog_neg[:, 0], neg[0][0], atol=1e-3)
    # ...or, chosen, the global negative
    _, _, neg_global, _ = regional(comfy, model, clip, [left, right], concepts=stack,
                                   empty_box_negative="the global negative")  # fmt: skip
    global_side = neg_global[0][1][key]
    assert torch.equal(global_side.contexts[1][:, 0], neg[0][0]) and torch.equal(global_side.contexts[0], cat_neg)
    # the cat's text-encoder LoRA never touches the dog's prompt: with it, the dog's encoding would differ
    both_te = stack_of(comfy, ("mos_cat.pth", "dog"), ("mos_dog.pth", "dog"))
    _, pos_both, _, _ = regional(comfy, model, clip, [dict(RIGHT, prompt=right["prompt"])], concepts=both_te)
    assert not torch.allclose(pos_both[0][1][key].contexts[0], dog, atol=1e-4)
    # the 16 layers differ (layer-wise tokens), so reading the wrong slice would show
    assert (cat[:, 0] - cat[:, 15]).abs().max() > 1e-3

    # inside sampling: layer i's cross-attention projects exactly the regions' layer-i encodings
    order = comfy.pack_module("samplers.edlora.layerwise").cross_attention_order(m.model.diffusion_model)
    attn = comfy.pack_module("samplers.mixofshow.sampling").attention_layers(m.model.diffusion_model)
    seen: dict[int, list] = {i: [] for i in order.values()}
    handles = []
    for key3, (_, module) in attn.items():
        layer = order[key3]

        def hook(mod, inputs, output, layer=layer):
            if inputs[0].shape[0] == 1:  # region contexts (the batched global context has cond+uncond rows)
                seen[layer].append(inputs[0].detach().clone())

        handles.append(module.to_k.register_forward_hook(hook))
    try:
        x0, _ = sample(m, pos, neg)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(x0).all() and x0.std() > 0.05
    for i, got in seen.items():
        expected = [cat[:, i], dog[:, i], neg_side.contexts[0][:, 0], neg_side.contexts[1][:, 0]]
        assert len(got) == 4, (i, len(got))  # once per run (cached across steps), one per region and side
        for e in expected:
            assert any(torch.equal(g, e.to(g.dtype)) for g in got), f"layer {i} did not read its own encoding"
        wrong = dog[:, (i + 1) % 16]
        assert not any(torch.allclose(g, wrong, atol=1e-5) for g in got)


def test_scoped_concepts_change_the_picture_and_merged_mode_differs(comfy, base):
    model, clip, _ = base
    stack = stack_of(comfy, ("mos_cat.pth", "cat"), ("mos_dog.pth", "dog"))
    left = dict(LEFT, prompt="a photo of <cat1> <cat2>, a cat")
    right = dict(RIGHT, prompt="a photo of <dog1> <dog2>, a dog")
    runs = {
        mode: sample(*regional(comfy, model, clip, [left, right], concepts=stack, adapters=mode)[:3])[1]
        for mode in ("scoped", "merged", "already applied")
    }
    for v in runs.values():
        assert torch.isfinite(v).all() and v.std() > 0.05
    assert (runs["scoped"] - runs["already applied"]).abs().mean() > 1e-3  # the UNet LoRAs act
    assert (runs["scoped"] - runs["merged"]).abs().mean() > 1e-4  # scoped is not merged


def test_concept_words_in_the_global_prompt_are_routed_layer_by_layer(comfy, base):
    model, clip, _ = base
    _MODEL["model"] = model
    stack = stack_of(comfy, ("mos_cat.pth", "cat"), ("mos_dog.pth", "dog"))
    text = "a photo of <cat1> <cat2> and a dog on a sofa"
    m, pos, neg, _ = regional(
        comfy, model, clip, [dict(LEFT, prompt="<cat1> <cat2>"), dict(RIGHT, prompt="<dog1> <dog2>")],
        global_prompt=text, concepts=stack,
    )  # fmt: skip
    layerwise = comfy.pack_module("samplers.edlora.clip").LAYERWISE_KEY
    # encoded as the ED-LoRA Loader encodes it: the cat's words and its text-encoder LoRA (named), not the dog's
    assert torch.equal(pos[0][1][layerwise].layers, _expected_layers(comfy, clip, "mos_cat.pth", text))
    assert comfy.pack_module("samplers.edlora.model").has_layerwise_routing(m)
    # the global negative names no concept: encoded exactly as the plain CLIP encodes it
    assert torch.equal(neg[0][0], plain_conds(clip)[1][0][0])
    x0, _ = sample(m, pos, neg)
    assert torch.isfinite(x0).all() and x0.std() > 0.05


def test_a_region_with_its_own_mask_acts_in_the_mask_not_in_the_whole_box(comfy, base):
    model, clip, _ = base
    node = comfy.node_class(NODE_ID)
    big = {"x": 0.0, "y": 0.0, "w": 1.0, "h": 1.0, "label": "all", "prompt": "a photo of a dog"}
    regions = regions_of(comfy, [big])
    mask = torch.zeros(H, W)
    mask[:, : W // 2] = 1.0  # a SAM-like mask: the left half of a box covering the whole image
    masked = node.execute(model, clip, regions.with_masks(mask[None]), GLOBAL, "blurry").result
    half_box = node.execute(model, clip, regions_of(comfy, [dict(big, w=0.5)]), GLOBAL, "blurry").result
    whole_box = node.execute(model, clip, regions, GLOBAL, "blurry").result
    x_masked, x_half, x_whole = (sample(*r[:3])[0] for r in (masked, half_box, whole_box))
    assert torch.isfinite(x_masked).all() and x_masked.std() > 0.05
    # the mask, not the box, decides where the region acts: the same as a box over the mask's area
    assert torch.allclose(x_masked, x_half, atol=1e-5), (x_masked - x_half).abs().max()
    assert (x_masked - x_whole).abs().mean() > 1e-2


def test_a_stock_lora_loader_before_the_node_keeps_its_effect(comfy, base, tiny_checkpoint):
    from safetensors.torch import save_file

    import nodes
    from tests.support.builders.lora import SD15_ALL, make_lora

    model, clip, _ = base
    path = comfy.models_dir / "loras" / "mos_stock.safetensors"
    save_file(make_lora(model, SD15_ALL, seed=33, scale=0.6), str(path))
    lora_model, lora_clip = nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 1.0)
    without = sample(*regional(comfy, model, clip, [LEFT, RIGHT])[:3])[1]
    with_lora = regional(comfy, lora_model, lora_clip, [LEFT, RIGHT])
    assert with_lora[0].patches, "the LoRA's weight patches must be kept on our clone"
    assert (sample(*with_lora[:3])[1] - without).abs().mean() > 1e-3


def test_sampler_custom_advanced_path_gives_the_ksampler_result(comfy, base):
    """A CFGGuider sampled directly (what SamplerCustomAdvanced does) applies the regions too."""
    import comfy.sample as sample_mod
    import comfy.samplers as samplers

    model, clip, _ = base
    m, pos, neg, _ = regional(comfy, model, clip, [LEFT, RIGHT])
    _, via_ksampler = sample(m, pos, neg)
    guider = samplers.CFGGuider(m)
    guider.set_conds(pos, neg)
    guider.set_cfg(4.0)
    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = sample_mod.prepare_noise(latent, 5)
    sigmas = samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", 3)
    out = guider.sample(noise, latent, samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=5)
    plain = sample(model, *plain_conds(clip))[1]
    assert (via_ksampler - plain).abs().mean() > 1e-3
    assert torch.allclose(out, via_ksampler, atol=1e-5), (out - via_ksampler).abs().max()


def test_an_sdxl_model_with_sdxl_edloras_runs_regional_sampling(comfy):
    """SDXL: 70 cross-attention layers, two text encoders; each region's layer i reads its layer-i encoding."""
    from tests.integration.test_edlora_sdxl import TE_LAYERS, sdxl_file
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    model = build_tiny_sdxl(seed=5, all_cross_attention=True)
    clip = build_tiny_clip("sdxl", seed=6, layers=TE_LAYERS)
    d = comfy.models_dir / "loras"
    torch.save({"params": sdxl_file(("<xcat1>", "<xcat2>"), seed=51)}, d / "mos_xl_cat.pth")
    torch.save({"params": sdxl_file(("<xdog1>", "<xdog2>"), seed=52)}, d / "mos_xl_dog.pth")
    stack = stack_of(comfy, ("mos_xl_cat.pth", "cat"), ("mos_xl_dog.pth", "dog"))
    boxes = [dict(LEFT, prompt="a photo of <xcat1> <xcat2>"), dict(RIGHT, prompt="a photo of <xdog1> <xdog2>")]
    m, pos, neg, _ = regional(comfy, model, clip, boxes, concepts=stack)
    side = pos[0][1][comfy.pack_module("samplers.mixofshow.sampling").REGIONAL_KEY]
    assert [tuple(c.shape) for c in side.contexts] == [(1, 70, 77, 2048)] * 2
    assert (side.contexts[0][:, 0] - side.contexts[0][:, 69]).abs().max() > 1e-4  # the layers differ

    order = comfy.pack_module("samplers.edlora.layerwise").cross_attention_order(m.model.diffusion_model)
    attn = comfy.pack_module("samplers.mixofshow.sampling").attention_layers(m.model.diffusion_model)
    assert len(order) == 70
    seen: dict[int, list] = {i: [] for i in range(70)}
    handles = []
    for key3, (_, module) in attn.items():

        def hook(mod, inputs, output, layer=order[key3]):
            if inputs[0].shape[0] == 1:
                seen[layer].append(inputs[0].detach().clone())

        handles.append(module.to_k.register_forward_hook(hook))
    try:
        x0, _ = sample(m, pos, neg, steps=1)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(x0).all() and x0.std() > 0.01
    for i in range(70):
        for r in range(2):
            expected = side.contexts[r][:, i]
            assert any(torch.equal(g, expected.to(g.dtype)) for g in seen[i]), f"layer {i}, region {r}"


# ------------------------------------------------------------------------------ composition, leaks


def test_an_earlier_attention_patch_keeps_its_effect_inside_and_outside_the_boxes(comfy, base):
    model, clip, _ = base
    import comfy.ldm.modules.attention as attention

    calls = []

    def damped(q, k, v, extra_options):  # another pack's attn2 replace patch: halves cross-attention
        calls.append(q.shape)
        return 0.5 * attention.optimized_attention(q, k, v, extra_options["n_heads"])

    patched = model.clone()
    attn = comfy.pack_module("samplers.mixofshow.sampling").attention_layers(model.model.diffusion_model)
    for key3 in attn:
        patched.set_model_attn2_replace(damped, *key3)
    same = dict(LEFT, prompt=GLOBAL, negative="blurry")
    # a box holding the global prompt: with the earlier patch kept (also for the box), this equals the patched
    # model sampled plainly; if our patch dropped it inside the box, it would not
    m, pos, neg, _ = regional(comfy, patched, clip, [same])
    ours = sample(m, pos, neg)[1]
    assert calls, "the earlier patch must still be called"
    theirs = sample(patched, *plain_conds(clip))[1]
    plain = sample(model, *plain_conds(clip))[1]
    assert (theirs - plain).abs().mean() > 1e-3
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # an output patch added after our node also keeps its effect
    after = m.clone()
    after.set_model_attn2_output_patch(lambda out, extra: out * 0.0)
    assert (sample(after, pos, neg)[1] - ours).abs().mean() > 1e-3


def test_plain_sampling_after_regional_sampling_is_unchanged(comfy, base):
    model, clip, _ = base
    pos, neg = plain_conds(clip)
    before = sample(model, pos, neg)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    stack = stack_of(comfy, ("mos_cat.pth", "cat"), ("mos_dog.pth", "dog"))
    for mode in ("scoped", "merged"):
        out = regional(
            comfy,
            model,
            clip,
            [dict(LEFT, prompt="<cat1> <cat2>"), dict(RIGHT, prompt="<dog1> <dog2>")],
            concepts=stack,
            adapters=mode,
        )
        sample(*out[:3])
    after = sample(model, *plain_conds(clip))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert all(torch.equal(weights[k], v) for k, v in model.model.state_dict().items())
    # the CLIP encodes exactly as before (its shared weights may still hold a region CLIP's text-encoder LoRA
    # until ComfyUI next loads the plain CLIP: ComfyUI unpatches lazily, as for its own LoRA loader)
    assert torch.equal(plain_conds(clip)[0][0][0], pos[0][0]) and torch.equal(plain_conds(clip)[1][0][0], neg[0][0])
    hooked = [n for n, mod in model.model.diffusion_model.named_modules() if mod._forward_hooks]
    assert hooked == [] and not model.patches
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


# ------------------------------------------------------------------------------------------ bad input


def graph(ckpt, boxes, global_prompt=GLOBAL, concepts=(), regions_size=(W, H), size=(W, H), prefix="mos"):
    prompt = plain_txt2img(ckpt, positive=GLOBAL, seed=3, prefix=prefix, steps=2)
    prompt["4"]["inputs"].update(width=size[0], height=size[1])
    prompt["20"] = {
        "class_type": "MultiConceptRegions",
        "inputs": {"width": regions_size[0], "height": regions_size[1], "regions": json.dumps({"boxes": boxes})},
    }
    previous = None
    for i, (name, label) in enumerate(concepts):
        node = str(30 + i)
        inputs = {"edlora_name": name, "strength_unet": 0.7, "strength_text": 0.7, "region_label": label}
        if previous:
            inputs["concepts"] = previous
        prompt[node] = {"class_type": "MultiConceptStackEDLoRA", "inputs": inputs}
        previous = [node, 0]
    inputs = {
        "model": ["1", 0],
        "clip": ["1", 1],
        "regions": ["20", 0],
        "global_prompt": global_prompt,
        "global_negative": "blurry",
    }
    if previous:
        inputs["concepts"] = previous
    prompt["40"] = {"class_type": NODE_ID, "inputs": inputs}
    prompt["5"]["inputs"].update(model=["40", 0], positive=["40", 1], negative=["40", 2])
    return prompt


@pytest.mark.parametrize(
    "case, message",
    [
        (
            {"boxes": [dict(LEFT, prompt="a photo of <cat1> <cat2> and <fox1>")], "concepts": [("mos_cat.pth", "cat")]},
            "names <fox1>, which no concept of the stack has; loaded concepts: <cat1> <cat2> (mos_cat.pth",
        ),
        (
            {"boxes": [LEFT], "concepts": [("mos_cat.pth", "kitchen")]},
            "has region label 'kitchen', but no box has that label; box labels: 'cat'",
        ),
        ({"boxes": [LEFT], "regions_size": (96, 128)}, "the regions were drawn on a 96x128 image"),
        ({"boxes": [LEFT], "global_prompt": "  "}, "the global prompt is empty"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_next_prompt_runs(comfy, base, tiny_checkpoint, case, message):
    prompt = graph(tiny_checkpoint, **case)
    result = comfy.run(prompt)
    assert not result.success
    text = json.dumps(result.error)
    assert message in text.replace('\\"', '"'), text[:600]
    assert "Mix-of-Show Regional" in text
    ok = comfy.run(graph(tiny_checkpoint, [LEFT, RIGHT], prefix="ok"))
    assert ok.success, ok.error
    image = ok.value("6")
    assert torch.isfinite(image).all() and image.std() > 0.02


def test_a_model_without_cross_attention_is_refused(comfy):
    from tests.support.builders.sd15 import UNET_CONFIG, build_unet_model

    no_attention = {**UNET_CONFIG, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
                    "transformer_depth": [0, 0], "transformer_depth_middle": 0, "num_heads": 2,
                    "transformer_depth_output": [0, 0, 0, 0]}  # fmt: skip
    patcher = build_unet_model("sd15", no_attention)
    node = comfy.node_class(NODE_ID)
    with pytest.raises(ValueError, match="has no UNet cross-attention layers"):
        node.execute(patcher, _clip(comfy), regions_of(comfy, [LEFT]), GLOBAL, "")


def _clip(comfy):
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(_CKPT[0])[1]


_CKPT: list = []


@pytest.fixture(autouse=True)
def _remember_checkpoint(tiny_checkpoint):
    _CKPT[:] = [tiny_checkpoint]
