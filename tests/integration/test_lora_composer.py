"""LoRA-Composer on the real test checkpoint: every constraint off is Mix-of-Show regional sampling exactly,
the latent steps lower the attention loss, isolation in the model's own layers, re-initialisation, the
attention-map picture, no gradient on a weight and no state left behind, SDXL, and bad input by name."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from tests.support.builders.edlora import clip_te_modules, official_edlora
from tests.support.builders.sd15 import SHALLOW_TEXT_LAYERS
from tests.support.graphs import plain_txt2img

SHALLOW_TE = clip_te_modules(SHALLOW_TEXT_LAYERS, 768)  # text LoRA on the 3-layer CLIP of tiny_models_shallow_clip

W, H = 256, 192  # the loss map is 1/32 of the image: 8 x 6 cells
LEFT = {"x": 0.0625, "y": 0.125, "w": 0.375, "h": 0.75, "label": "cat", "prompt": "a photo of <cat1> <cat2>"}
RIGHT = {"x": 0.5625, "y": 0.0833, "w": 0.375, "h": 0.75, "label": "dog", "prompt": "a photo of <dog1> <dog2>"}
GLOBAL = "a cat and a dog on a sofa, living room"
NODE_ID = "MultiConceptLoRAComposer"
OFF = dict(enhancement=0.0, fill=0.0, region=0.0, isolation=False, reinitialise=False)


@pytest.fixture(scope="module")
def base(comfy, tiny_models_shallow_clip):
    model, clip, vae = tiny_models_shallow_clip[:3]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(
        official_edlora(words=("<cat1>", "<cat2>"), seed=41, lora_scale=0.05, te_modules=SHALLOW_TE), d / "lc_cat.pth"
    )
    torch.save(
        official_edlora(words=("<dog1>", "<dog2>"), seed=42, lora_scale=0.05, te_modules=SHALLOW_TE), d / "lc_dog.pth"
    )
    return model, clip, vae


@pytest.fixture(scope="module")
def lc(comfy):
    return {
        "guider": comfy.pack_module("samplers.lora_composer.guider"),
        "isolation": comfy.pack_module("samplers.lora_composer.isolation"),
        "losses": comfy.pack_module("samplers.lora_composer.losses"),
    }


def core(name):
    """A ComfyUI module (``core("samplers")``) without binding the name ``comfy`` over the session fixture."""
    return importlib.import_module(f"comfy.{name}")


def pack_of(guider):
    """The guider module the nodes use (ComfyUI loads the pack under its own module name)."""
    return sys.modules[type(guider).__module__]


def regions_of(comfy, boxes, width=W, height=H):
    return comfy.pack_module("samplers.regions").parse_regions(json.dumps({"boxes": boxes}), width, height)


def stack_of(comfy):
    node = comfy.node_class("MultiConceptStackEDLoRA")
    stack = node.execute("lc_cat.pth", 0.7, 0.7, "cat").result[0]
    return node.execute("lc_dog.pth", 0.7, 0.7, "dog", concepts=stack).result[0]


def composer(comfy, model, clip, boxes=(LEFT, RIGHT), concepts="stack", cfg=4.0, **kw):
    node = comfy.node_class(NODE_ID)
    stack = stack_of(comfy) if concepts == "stack" else concepts
    return node.execute(model, clip, regions_of(comfy, list(boxes)), GLOBAL, "blurry", cfg, concepts=stack, **kw).result


def run(guider, seed=5, steps=6, sampler="euler", size=(H, W), sampler_object=None):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, size[0] // 8, size[1] // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps)
    s = sampler_object or comfy.samplers.sampler_object(sampler)
    return guider.sample(noise, latent, s, sigmas, disable_pbar=True, seed=seed)


def map_loss(lc, guider, step):
    """Enhancement + fill of the step's recorded maps (the prediction's own cross-attention, cond rows)."""
    state = guider.state
    masks = state.concept_masks_at(state.history[step].maps[0].shape[-2:])
    total, _ = lc["losses"].composer_loss(state.history[step].maps, masks, None)
    return float(total)


# ------------------------------------------------------------------------------------------ exactness


def test_with_every_constraint_off_the_guider_is_mixofshow_regional_sampling(comfy, base):
    model, clip, _ = base
    steps = 2  # exactness holds at any step count; 2 keeps the three runs short
    every = dict(lora_layers="every layer")  # as Mix-of-Show Regional scopes them
    guider, _ = composer(comfy, model, clip, **OFF, **every)
    ours = run(guider, steps=steps)
    mos = comfy.node_class("MultiConceptMixOfShowRegional")
    m, pos, neg, _ = mos.execute(model, clip, regions_of(comfy, [LEFT, RIGHT]), GLOBAL, "blurry",
                                 concepts=stack_of(comfy)).result  # fmt: skip
    reference = core("samplers").CFGGuider(m)
    reference.set_conds(pos, neg)
    reference.set_cfg(4.0)
    theirs = run(reference, steps=steps)
    assert torch.isfinite(ours).all() and float(ours.std()) > 0.05
    assert torch.equal(ours, theirs)
    # and the step size 0 alone gives the same too (no probe passes), with the maps still recorded
    guider, _ = composer(comfy, model, clip, step_size=0.0, isolation=False, reinitialise=False, **every)
    assert torch.equal(run(guider, steps=steps), theirs)
    assert sorted(guider.state.history) == list(range(steps))
    assert all(r.maps for r in guider.state.history.values())


def _cat_variant(comfy, name, zero):
    """lc_cat.pth with the UNet LoRA layers ``zero(key)`` picks switched off (their up factors zero)."""
    data = official_edlora(words=("<cat1>", "<cat2>"), seed=41, lora_scale=0.05, te_modules=SHALLOW_TE)
    unet = data["params"]["unet"]
    for key in [k for k in unet if k.endswith("lora_up.weight") and zero(k)]:
        unet[key] = torch.zeros_like(unet[key])
    torch.save(data, comfy.models_dir / "loras" / name)


def test_the_official_scope_uses_only_the_box_cross_attention_keys_values_and_output(comfy, base):
    # official LoRA-Composer: base to_q (region_lora/multi_lora_sample.py:315), the concept's to_k/to_v on the
    # box prompt (:343-347) and its to_out on the box result (:299); self-attention and to_q LoRA never act
    model, clip, _ = base
    _cat_variant(comfy, "lc_cat_kv_out.pth", lambda k: ".attn1." in k or ".attn2.to_q." in k)
    _cat_variant(comfy, "lc_cat_no_kv.pth", lambda k: ".attn2.to_k." in k or ".attn2.to_v." in k)
    _cat_variant(comfy, "lc_cat_no_out.pth", lambda k: ".attn2.to_out." in k)
    node = comfy.node_class("MultiConceptStackEDLoRA")

    def picture(cat, **kw):
        stack = node.execute(cat, 0.7, 0.7, "cat").result[0]
        stack = node.execute("lc_dog.pth", 0.7, 0.7, "dog", concepts=stack).result[0]
        return run(composer(comfy, model, clip, concepts=stack, **OFF, **kw)[0], steps=1)

    full = picture("lc_cat.pth")
    assert torch.isfinite(full).all() and float(full.std()) > 0.05
    assert torch.equal(picture("lc_cat_kv_out.pth"), full)  # attn1 and attn2.to_q LoRA: unused
    assert not torch.equal(picture("lc_cat_no_kv.pth"), full)
    assert not torch.equal(picture("lc_cat_no_out.pth"), full)
    every = dict(lora_layers="every layer")  # the option: every layer acts inside the box
    assert not torch.equal(picture("lc_cat_kv_out.pth", **every), picture("lc_cat.pth", **every))


def test_the_region_loss_reads_the_keys_the_forward_uses(comfy):
    """A box whose self-attention the scoped LoRA adapts ('every layer'): the region loss's map holds, for the
    box's queries, the attention of the adapted queries over the adapted keys the forward computes with (the
    scoped patch hands them to the inner patch with their positions); the other rows are the plain ones."""
    g = comfy.pack_module("samplers.lora_composer.guider")
    iso = comfy.pack_module("samplers.lora_composer.isolation")
    positions_key = comfy.pack_module("samplers.attention_patches").QUERY_POSITIONS_KEY
    torch.manual_seed(0)
    masks = torch.zeros(2, 128, 128)
    masks[0, :, :64], masks[1, :, 64:] = 1.0, 1.0
    state = g.ComposerState(g.ComposerSettings(), [], masks, "T")
    state.begin_run((16, 16))  # the loss layers: 1/4 of the side, 4x4 = 16 positions
    state.mode = g.PROBE
    heads, width, n = 2, 8, 16
    q, k, v = torch.randn(1, n, width), torch.randn(1, n, width), torch.randn(1, n, width)
    box = torch.tensor([c for c in range(n) if c % 4 < 2])  # the left box's positions
    rest = torch.tensor([c for c in range(n) if c % 4 >= 2])
    q_box, k_box = torch.randn(1, box.numel(), width), torch.randn(1, n, width)  # the concept's LoRA made these
    inner = g.IsolationAttention(("input", 1, 0), None, capture=False)

    def scoped(q_, k_, v_, extra):  # what ScopedAttention does: each part's queries with its own keys
        out = torch.zeros_like(q_)
        out[:, box] = inner(q_box, k_box, v_, {**extra, positions_key: box})
        out[:, rest] = inner(q_.index_select(1, rest), k_, v_, {**extra, positions_key: rest})
        return out

    outer = g.IsolationAttention(("input", 1, 0), scoped, isolate=False)
    kept = []
    real_end = state.end_self
    state.end_self = lambda: (kept.append(state._pending_self.clone()), real_end())
    outer(q, k, v, {g.STATE_KEY: state, "n_heads": heads})
    codes = state.codes(n, "cpu")
    expected = iso.isolated_probabilities(q, k, heads, codes)
    expected[:, box] = iso.isolated_probabilities(q_box, k_box, heads, codes, queries=box, selected=True)
    torch.testing.assert_close(kept[0], expected, rtol=0, atol=1e-6)
    assert state.self_layers == 1 and not torch.allclose(
        expected[:, box], iso.isolated_probabilities(q, k, heads, codes)[:, box]
    )


# ---------------------------------------------------------------------------------------- latent steps


def test_each_latent_step_lowers_the_attention_loss(comfy, base, lc):
    """At every refined step the loss at the moved latent (same sigma) is below the loss before the move,
    and later steps' maps sit better in their boxes than without the steps."""
    model, clip, _ = base
    guider, _ = composer(comfy, model, clip, isolation=False, reinitialise=False, region=0.0, refine_until=0.5,
                         stop_when_loss_rises=False)  # fmt: skip
    base_cls = type(guider)
    after = {}

    class Checked(base_cls):
        def _refine(self, x, timestep, model_options, step, steps):
            super()._refine(x, timestep, model_options, step, steps)
            after[step] = self.probe_loss(x, timestep, model_options)

    guider.__class__ = Checked
    out = run(guider)
    assert torch.isfinite(out).all()
    refined = sorted(s for s, r in guider.state.history.items() if r.loss is not None)
    assert refined == [0, 1, 2, 3] and guider.steps_refined == 4  # steps 0..3 = up to half of 6
    for s in refined:
        before = guider.state.history[s].loss["total"]
        assert after[s] < before, (s, before, after[s])
    guider_off, _ = composer(comfy, model, clip, step_size=0.0, isolation=False, reinitialise=False)
    run(guider_off)
    assert map_loss(lc, guider, 4) < map_loss(lc, guider_off, 4)


def test_the_stop_rule_ends_the_latent_steps_when_the_loss_rises(comfy, base):
    model, clip, _ = base
    guider, _ = composer(comfy, model, clip, isolation=False, reinitialise=False, refine_until=1.0)
    run(guider)
    losses = [(s, r.loss["total"]) for s, r in sorted(guider.state.history.items()) if r.loss is not None]
    assert losses and losses[0][0] == 0
    # steps stop right after the first step (from the first tenth on) whose loss rose, else run to the end
    rises = [i for i in range(1, len(losses)) if losses[i][1] > losses[i - 1][1]]
    if rises:
        assert len(losses) == rises[0] + 1
    else:
        assert len(losses) == 6


def test_a_sampler_that_cannot_take_latent_steps_is_refused_by_name(comfy, base, lc):
    model, clip, _ = base
    guider, _ = composer(comfy, model, clip)
    with pytest.raises(pack_of(guider).ComposerError, match="the sampler \\(heun\\) cannot take latent updates"):
        run(guider, sampler="heun")
    guider, _ = composer(comfy, model, clip, step_size=0.0, reinitialise=False)
    assert torch.isfinite(run(guider, sampler="heun", steps=2)).all()  # without latent steps any sampler works


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_other_samplers_take_the_latent_steps(comfy, base, sampler):
    model, clip, _ = base
    guider, _ = composer(comfy, model, clip, reinitialise=False)
    out = run(guider, sampler=sampler, steps=2)  # steps 0 and 1 (up to half of 2) take latent steps
    assert torch.isfinite(out).all() and guider.steps_refined >= 1


# ------------------------------------------------------------------------------------------ isolation


def test_isolation_in_the_models_own_self_attention_layers(comfy, base, lc):
    """Every self-attention layer isolates (below the scoped LoRA's patch where a concept's LoRA is on its
    keys/values); on a real layer's q/k/v the output is the dense masked softmax, and values inside the
    other box never reach a box's queries."""
    model, clip, _ = base

    def self_attention_chains(guider):
        pack = pack_of(guider)
        m = guider.model_patcher
        attn1 = m.model_options["transformer_options"]["patches_replace"]["attn1"]
        layers = pack.self_attention_layers(m.model.diffusion_model)
        assert set(attn1) == set(layers)
        scoped_layers = 0
        for patch in attn1.values():
            assert isinstance(patch, pack.IsolationAttention) and patch.capture
            chain = [patch]
            while getattr(chain[-1], "inner", None) is not None:
                chain.append(chain[-1].inner)
            isolating = [p for p in chain if isinstance(p, pack.IsolationAttention) and p.isolate]
            assert len(isolating) == 1 and isolating[0].inner is None
            scoped_layers += type(chain[1]).__name__ == "ScopedAttention" if len(chain) > 1 else 0
        return pack, m, attn1, layers, scoped_layers

    # the official scope uses no self-attention LoRA: nothing sits between capture and isolation
    assert self_attention_chains(composer(comfy, model, clip, step_size=0.0, reinitialise=False)[0])[-1] == 0
    guider, _ = composer(comfy, model, clip, step_size=0.0, reinitialise=False, lora_layers="every layer")
    pack, m, attn1, layers, scoped_layers = self_attention_chains(guider)
    assert scoped_layers > 0  # the ED-LoRAs carry attn1 k/v LoRA: with every layer, the scoped patch sits between
    key = layers[0]
    inner = attn1[key]
    captured = {}
    key = layers[0]
    inner = attn1[key]

    class Capture:
        def __call__(self, q, k, v, extra_options):
            captured.setdefault(
                "qkv", (q.detach().clone(), k.detach().clone(), v.detach().clone(), dict(extra_options))
            )
            return inner(q, k, v, extra_options)

    m.set_model_attn1_replace(Capture(), *key)
    run(guider, steps=1)
    q, k, v, options = captured["qkv"]
    state = guider.state
    state.begin_run((H // 8, W // 8))
    try:
        out = inner(q, k, v, options)
        codes = state.codes(q.shape[1], q.device)
        iso = lc["isolation"]
        ref = iso.masked_attention_reference(q, k, v, options["n_heads"], iso.allowed_keys(codes))
        torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-4, atol=1e-4)
        only_a = (codes & 1).bool() & ~(codes & 2).bool()
        in_b = (codes & 2).bool()
        assert int(only_a.sum()) > 0 and int(in_b.sum()) > 0 and int((codes == 0).sum()) > 0
        v2 = v.clone()
        v2[:, in_b] += 3.0
        assert torch.equal(inner(q, k, v2, options)[:, only_a], out[:, only_a])
    finally:
        state.end_run()


def test_isolation_changes_the_picture_and_reinitialisation_moves_noise_into_the_boxes(comfy, base):
    model, clip, _ = base
    plain = run(composer(comfy, model, clip, **OFF)[0], steps=2)
    isolated = run(composer(comfy, model, clip, **dict(OFF, isolation=True))[0], steps=2)
    assert float((isolated - plain).abs().mean()) > 1e-3

    seen = []
    euler = core("samplers").sampler_object("euler")

    class Recording(type(euler)):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, *args, **kw):
            seen.append(noise.detach().clone())
            return super().sample(model_wrap, sigmas, extra_args, callback, noise, *args, **kw)

    recording = Recording(euler.sampler_function, euler.extra_options, euler.inpaint_options)
    run(composer(comfy, model, clip, **dict(OFF, reinitialise=True))[0], steps=1, sampler_object=recording)
    original = core("sample").prepare_noise(torch.zeros(1, 4, H // 8, W // 8), 5)
    moved = seen[0]
    assert not torch.equal(moved, original)
    assert float(moved.mean()) == pytest.approx(float(original.mean()), abs=1e-4)
    assert float(moved.std()) == pytest.approx(float(original.std()), rel=1e-4)


# ------------------------------------------------------------------------------------- maps, leaks


def test_the_attention_maps_node_draws_each_concept_at_chosen_steps(comfy, base):
    model, clip, _ = base
    guider, preview = composer(comfy, model, clip, reinitialise=False)
    assert preview.shape == (1, H, W, 3)
    out = run(guider, steps=3)  # step 1 takes a latent step (its row shows the loss), step 3 does not
    node = comfy.node_class("MultiConceptLoRAComposerAttention")
    maps = node.execute(guider, {"samples": out}, steps="1, 3").result[0]
    assert maps.shape[0] == 1 and maps.shape[-1] == 3
    assert maps.shape[2] == 2 * 256  # two concepts side by side, 256 px panels
    assert float(maps.std()) > 0.05 and torch.isfinite(maps).all()
    with pytest.raises(Exception, match="steps \\[9\\] were not sampled"):
        node.execute(guider, {"samples": out}, steps="9")


def test_no_gradient_reaches_a_weight_and_plain_sampling_is_unchanged(comfy, base):
    model, clip, _ = base
    import nodes

    encode = nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, GLOBAL)[0], encode(clip, "blurry")[0]
    latent = torch.zeros(1, 4, H // 8, W // 8)

    def plain():
        noise = core("sample").prepare_noise(latent, 3)
        return core("sample").sample(
            model, noise, 2, 4.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=3
        )

    before = plain()
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    guider, _ = composer(comfy, model, clip)
    run(guider, steps=2)
    assert guider.steps_refined > 0
    assert all(p.grad is None for p in model.model.parameters())
    after = plain()
    assert float(before.std()) > 0.05 and torch.equal(before, after)
    assert all(torch.equal(weights[k], v) for k, v in model.model.state_dict().items())
    hooked = [n for n, mod in model.model.diffusion_model.named_modules() if mod._forward_hooks]
    assert hooked == [] and "patches_replace" not in model.model_options.get("transformer_options", {})
    state = guider.state
    assert state.mode == "off" and state.cross is None and state.self_attn is None and not state._codes


def test_an_sdxl_shaped_unet_runs_lora_composer(comfy):
    from tests.integration.test_edlora_sdxl import TE_LAYERS, sdxl_file
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    model = build_tiny_sdxl(seed=5, all_cross_attention=True)
    clip = build_tiny_clip("sdxl", seed=6, layers=TE_LAYERS)
    d = comfy.models_dir / "loras"
    torch.save({"params": sdxl_file(("<xcat1>", "<xcat2>"), seed=51)}, d / "lc_xl_cat.pth")
    torch.save({"params": sdxl_file(("<xdog1>", "<xdog2>"), seed=52)}, d / "lc_xl_dog.pth")
    node = comfy.node_class("MultiConceptStackEDLoRA")
    stack = node.execute("lc_xl_cat.pth", 0.7, 0.7, "cat").result[0]
    stack = node.execute("lc_xl_dog.pth", 0.7, 0.7, "dog", concepts=stack).result[0]
    boxes = [dict(LEFT, prompt="a photo of <xcat1> <xcat2>"), dict(RIGHT, prompt="a photo of <xdog1> <xdog2>")]
    guider, _ = composer(comfy, model, clip, boxes, concepts=stack)
    out = run(guider, steps=3)
    assert torch.isfinite(out).all() and float(out.std()) > 0.01
    assert guider.steps_refined >= 1 and guider.state.loss_order


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_by_name(comfy, base, lc):
    model, clip, _ = base
    with pytest.raises(Exception, match="does not contain concept 1's words \\(<cat1> <cat2>\\)"):
        composer(comfy, model, clip, boxes=(dict(LEFT, prompt="a photo of a cat"), RIGHT))
    tiny = dict(LEFT, w=0.05, h=0.5)
    with pytest.raises(Exception, match="box 'cat' is too small .* at least 2x2 cells, i.e. 64x64 px"):
        composer(comfy, model, clip, boxes=(tiny, RIGHT))
    # boxes fine at the drawn size but too small at a smaller sampling size
    guider, _ = composer(comfy, model, clip)
    with pytest.raises(pack_of(guider).ComposerError, match="box 'cat' is too small .* at 128x96"):
        run(guider, size=(96, 128))


def composer_graph(ckpt, boxes, prefix="lc", sampler="euler", steps=3):
    prompt = plain_txt2img(ckpt, positive=GLOBAL, seed=3, prefix=prefix, steps=steps)
    del prompt["2"], prompt["3"], prompt["5"]
    prompt["4"]["inputs"].update(width=W, height=H)
    prompt["20"] = {"class_type": "MultiConceptRegions",
                    "inputs": {"width": W, "height": H, "regions": json.dumps({"boxes": boxes})}}  # fmt: skip
    prompt["30"] = {"class_type": "MultiConceptStackEDLoRA",
                    "inputs": {"edlora_name": "lc_cat.pth", "strength_unet": 0.7, "strength_text": 0.7,
                               "region_label": "cat"}}  # fmt: skip
    prompt["31"] = {"class_type": "MultiConceptStackEDLoRA",
                    "inputs": {"edlora_name": "lc_dog.pth", "strength_unet": 0.7, "strength_text": 0.7,
                               "region_label": "dog", "concepts": ["30", 0]}}  # fmt: skip
    prompt["40"] = {"class_type": NODE_ID,
                    "inputs": {"model": ["1", 0], "clip": ["1", 1], "regions": ["20", 0], "global_prompt": GLOBAL,
                               "global_negative": "blurry", "cfg": 4.0, "concepts": ["31", 0]}}  # fmt: skip
    prompt["41"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    prompt["42"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
    prompt["43"] = {"class_type": "BasicScheduler",
                    "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0}}  # fmt: skip
    prompt["5"] = {"class_type": "SamplerCustomAdvanced",
                   "inputs": {"noise": ["41", 0], "guider": ["40", 0], "sampler": ["42", 0], "sigmas": ["43", 0],
                              "latent_image": ["4", 0]}}  # fmt: skip
    prompt["50"] = {"class_type": "MultiConceptLoRAComposerAttention",
                    "inputs": {"guider": ["40", 0], "samples": ["5", 0], "image": ["6", 0]}}  # fmt: skip
    prompt["51"] = {"class_type": "PreviewImage", "inputs": {"images": ["50", 0]}}
    return prompt


def test_in_a_server_run_the_graph_samples_and_a_bad_sampler_is_refused(comfy, base, tiny_checkpoint):
    """Through ComfyUI's executor (inference mode: weights and caches are inference tensors)."""
    session = comfy.persistent()  # one executor, as a server: the checkpoint and the guider are loaded once
    ok = session.run(composer_graph(tiny_checkpoint, [LEFT, RIGHT]))
    assert ok.success, ok.error
    image, maps = ok.value("6"), ok.value("50")
    assert torch.isfinite(image).all() and float(image.std()) > 0.02
    assert float(maps.std()) > 0.02
    bad = session.run(composer_graph(tiny_checkpoint, [LEFT, RIGHT], prefix="bad", sampler="heun"))
    assert not bad.success
    text = json.dumps(bad.error)
    assert "cannot take latent updates" in text and "LoRA-Composer" in text
    again = session.run(composer_graph(tiny_checkpoint, [LEFT, RIGHT], prefix="again"))
    assert again.success, again.error
    assert {"1", "40"} <= set(bad.cached) & set(again.cached)  # the loaded checkpoint and guider were reused
