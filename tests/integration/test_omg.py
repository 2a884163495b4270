"""OMG on the real test checkpoint: stage 2 with nothing to blend is stage 1, the start-point reuse is exact,
batched concept rows equal merged passes, the blend stays in its masks, masks from boxes and from class-word
attention, LoRA / ED-LoRA / three concepts / SDXL, no leaks, the layout store freed, bad input."""

from __future__ import annotations

import copy
import gc
import importlib
import json

import pytest
import torch

from tests.support.builders.edlora import official_edlora
from tests.support.builders.lora import SD15_ALL, make_lora

W, H = 128, 96  # non-square on purpose
STEPS = 6
SCENE = "a photo of a cat and a dog on a sofa"
NODE_ID = "MultiConceptOMG"


@pytest.fixture(scope="module")
def base(comfy, tiny_models):
    from safetensors.torch import save_file

    model, clip, vae = tiny_models[:3]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("omg_a", "omg_b", "omg_c")):
        save_file(make_lora(model, SD15_ALL, seed=70 + i, scale=0.6), str(d / f"{name}.safetensors"))
    torch.save(official_edlora(words=("<dog1>", "<dog2>"), seed=33, lora_scale=0.05), d / "omg_dog.pth")
    return model, clip, vae


@pytest.fixture(scope="module")
def omg(comfy):
    return {
        "layout": comfy.pack_module("samplers.omg.layout"),
        "guider": comfy.pack_module("samplers.omg.guider"),
        "stages": comfy.pack_module("samplers.omg.stages"),
        "blend": comfy.pack_module("samplers.omg.blend"),
    }


def lora_stack(comfy, *entries):
    """entries: (file, class word, region label)."""
    node = comfy.node_class("MultiConceptStackLoRA")
    stack = None
    for name, word, label in entries:
        stack = node.execute(name, 1.0, 1.0, label, concepts=stack, class_word=word).result[0]
    return stack


def core(name):
    """A ComfyUI module (``core("samplers")``) without binding the name ``comfy`` over the session fixture."""
    return importlib.import_module(f"comfy.{name}")


def encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def latent(batch=1):
    return {"samples": torch.zeros(batch, 4, H // 8, W // 8)}


def has_range(t):
    return bool(torch.isfinite(t).all()) and float(t.std()) > 1e-3


@pytest.fixture(scope="module")
def shared_stage1(base, omg):
    """``stage1(omg, model, clip)`` with its defaults, sampled once for the module: take it with ``fresh``."""
    model, clip, _ = base
    return stage1(omg, model, clip)


def fresh(shared, omg):
    """A test's own copy of the shared default stage 1. Stage 2 only reads the recorded layout (``cross``,
    ``self_qk``, the maps, ``x_start``, ``sigmas``); what a run writes (its mode, the positions replayed, the
    scene's rows, ``x_start = None`` for a run without the reuse) is the copy's own, so tests stay independent."""
    store, pos, neg, first = shared
    own = copy.copy(store)
    own.replayed = set()
    own.mode = omg["layout"].OFF
    own.replay_uuids = frozenset()
    return own, copy.deepcopy(pos), copy.deepcopy(neg), first.clone()


def stage1(omg, model, clip, start=2, seed=3, steps=STEPS, words=(), budget=2**30, scene=SCENE, sampler="euler"):
    store = omg["layout"].LayoutStore(start, steps, (H // 8, W // 8), seed, budget, list(words))
    pos, neg = encode(clip, scene), encode(clip, "blurry")
    out = omg["stages"].run_stage1(model, pos, neg, latent(), seed, steps, 5.0, sampler, "normal", store,
                                   disable_pbar=True)  # fmt: skip
    return store, pos, neg, out


def stage2(omg, model, store, pos, neg, concepts, masks, seed=3, policy="front_to_back", stack=None, reuse=True,
           sampler="euler", guider_out=None):  # fmt: skip
    import comfy.sample
    import comfy.samplers

    m2 = (
        omg["stages"].stage2_model(model, stack, store, "Test")
        if stack is not None
        else _replay_only(omg, model, store)
    )
    guider = omg["guider"].OMGGuider(m2, store, masks, policy)
    guider.set_cfg(5.0)
    guider.set_omg_conds(pos, neg, concepts)
    if not reuse:
        store.x_start = None  # sample the steps before the start again
    if guider_out is not None:
        guider_out.append(guider)
    noise = comfy.sample.prepare_noise(latent()["samples"], seed)
    sampler = comfy.samplers.sampler_object(sampler)
    return guider.sample(noise, latent()["samples"], sampler, store.sigmas.float(), disable_pbar=True, seed=seed)


def _replay_only(omg, model, store):
    clone = model.clone()
    omg["layout"].install_layout_patches(clone, store)
    return clone


def counting(base):
    """``base`` with a clone of its MODEL that counts the UNet's calls: a refusal before stage 1 leaves none."""
    model, clip, vae = base
    clone = model.clone()
    calls: list = []

    def count(apply_model, args):
        calls.append(args["timestep"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(count)
    return (clone, clip, vae), calls


def run_node(comfy, base, concepts, **kw):
    model, clip, vae = base
    node = comfy.node_class(NODE_ID)
    args = dict(seed=3, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal", scene_prompt=SCENE,
                negative="blurry", start=0.34)  # fmt: skip
    args.update(kw)
    return node.execute(model, clip, vae, concepts, latent(), **args).result


# ----------------------------------------------------------------------------------- the two stages


def test_stage_two_with_nothing_to_blend_reproduces_stage_one(comfy, base, omg, shared_stage1):
    model, clip, _ = base
    store, pos, neg, first = fresh(shared_stage1, omg)
    assert has_range(first)
    assert store.cross and store.self_qk, "stage 1 must record the layout from the start step on"
    assert min(k[0] for k in store.cross) == store.start
    # no concepts at all, and one concept whose mask is empty: the global prediction with stage 1's own
    # attention replayed, from stage 1's latent at the start step
    none = stage2(omg, model, store, pos, neg, [], torch.zeros(0, H, W))
    torch.testing.assert_close(none, first, atol=1e-5, rtol=1e-5)
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""))
    cpos = omg["stages"].tag_rows(encode(clip, "a photo of a tabby cat"), 0)
    cneg = omg["stages"].tag_rows(encode(clip, "blurry"), 0)
    empty = stage2(omg, model, store, pos, neg, [(cpos, cneg)], torch.zeros(1, H, W), stack=stack)
    torch.testing.assert_close(empty, first, atol=1e-5, rtol=1e-5)


def test_starting_from_stage_one_latent_equals_sampling_stage_two_from_the_first_step(comfy, base, omg, shared_stage1):
    model, clip, _ = base
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""))
    cpos = omg["stages"].tag_rows(encode(clip, "a photo of a tabby cat"), 0)
    cneg = omg["stages"].tag_rows(encode(clip, "blurry"), 0)
    mask = torch.zeros(1, H, W)
    mask[:, 16:80, 8:64] = 1.0
    store, pos, neg, first = fresh(shared_stage1, omg)
    reused = stage2(omg, model, store, pos, neg, [(cpos, cneg)], mask, stack=stack)
    store2, *_ = fresh(shared_stage1, omg)
    again = stage2(omg, model, store2, pos, neg, [(cpos, cneg)], mask, stack=stack, reuse=False)
    assert has_range(reused) and (reused - first).abs().mean() > 1e-3, "the concept must change the picture"
    torch.testing.assert_close(reused, again, atol=1e-5, rtol=1e-5)


def _cat_concept(comfy, clip, omg):
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""))
    cpos = omg["stages"].tag_rows(encode(clip, "a photo of a tabby cat"), 0)
    cneg = omg["stages"].tag_rows(encode(clip, "blurry"), 0)
    mask = torch.zeros(1, H, W)
    mask[:, 16:80, 8:64] = 1.0
    return stack, [(cpos, cneg)], mask


def _inside(a, b, mask):
    m = torch.nn.functional.interpolate(mask[None], size=a.shape[-2:], mode="nearest")[0]
    return float(((a - b).abs() * m).sum() / (m.sum() * a.shape[1]))


BETWEEN_STEPS = 4  # blending from step 2: two steps, one of them with a call between steps


def _concept_effect(comfy, base, omg, name):
    """The cat concept's effect inside its mask with sampler ``name``, the stage-2 guider and the stage-1 store."""
    model, clip, _ = base
    stack, concepts, mask = _cat_concept(comfy, clip, omg)
    store, pos, neg, first = stage1(omg, model, clip, sampler=name, steps=BETWEEN_STEPS)
    guiders: list = []
    out = stage2(omg, model, store, pos, neg, concepts, mask, stack=stack, sampler=name, guider_out=guiders)
    return _inside(out, first, mask), guiders[0], store


@pytest.fixture(scope="module")
def euler_effect(comfy, base, omg):
    """The euler baseline of the samplers calling the model between steps (the same for each of them)."""
    return _concept_effect(comfy, base, omg, "euler")


@pytest.mark.parametrize("sampler", ["dpm_2", "dpmpp_2s_ancestral"])
def test_samplers_calling_the_model_between_steps_blend_and_replay_at_every_call(comfy, base, omg, sampler,
                                                                                euler_effect):  # fmt: skip
    # dpm_2 / dpmpp_2s_ancestral evaluate the model at a sigma between two steps; those calls make the step's
    # update, so they must be blended (and their global branch replayed) like the others (issue 26: a concept's
    # effect inside its mask with dpm_2 was 0.05x its effect with euler)
    effects = {}
    steps = BETWEEN_STEPS
    for name in (sampler, "euler"):
        effect, guider, store = _concept_effect(comfy, base, omg, name) if name == sampler else euler_effect
        assert guider.calls > 0 and guider.blended == guider.calls, (name, guider.blended, guider.calls)
        effects[name] = effect
        if name == sampler:
            mid = {p for p in store.replayed if p != int(p)}
            assert guider.calls > steps - store.start and mid, (guider.calls, sorted(store.replayed))
            assert any(k[0] != int(k[0]) for k in store.cross), "stage 1 records the calls between steps too"
    assert effects[sampler] > 0.5 * effects["euler"], effects


def test_dpm_2_with_nothing_to_blend_reproduces_stage_one_through_the_mid_step_replay(comfy, base, omg):
    model, clip, _ = base
    stack, concepts, _ = _cat_concept(comfy, clip, omg)
    store, pos, neg, first = stage1(omg, model, clip, sampler="dpm_2", steps=4)
    empty = stage2(omg, model, store, pos, neg, concepts, torch.zeros(1, H, W), stack=stack, sampler="dpm_2")
    torch.testing.assert_close(empty, first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "lms"])
def test_multistep_samplers_continue_stage_one_exactly(comfy, base, omg, sampler):
    # a sampler that builds on earlier steps cannot restart at the start step without its history: stage 2
    # runs the whole schedule, unblended before the start, so nothing-to-blend gives stage 1 exactly
    model, clip, _ = base
    stack, concepts, mask = _cat_concept(comfy, clip, omg)
    steps = 4
    store, pos, neg, first = stage1(omg, model, clip, sampler=sampler, steps=steps)
    guiders: list = []
    empty = stage2(omg, model, store, pos, neg, concepts, torch.zeros(1, H, W), stack=stack, sampler=sampler,
                   guider_out=guiders)  # fmt: skip
    # float order only (the concept rows batched beside the scene's, over every step): measured 6.4e-5 with
    # dpmpp_2m at 6 steps; restarted at the start step without its history it was 1.19 off
    torch.testing.assert_close(empty, first, atol=2e-4, rtol=1e-4)
    assert guiders[0].calls == steps and guiders[0].blended == steps - store.start
    blended = stage2(omg, model, store, pos, neg, concepts, mask, stack=stack, sampler=sampler)
    assert _inside(blended, first, mask) > 1e-3


def test_batched_concept_rows_equal_a_pass_with_the_adapter_merged(comfy, base, omg, shared_stage1):
    # one concept with an all-ones mask: from the start step on, stage 2 IS that concept's own sampling (its
    # prompt, its LoRA merged by ComfyUI) continued from stage 1's latent

    model, clip, _ = base
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""))
    lora = stack[0].adapter.tensors
    cpos_plain, cneg_plain = encode(clip, "a photo of a tabby cat"), encode(clip, "blurry")
    cpos, cneg = (omg["stages"].tag_rows(c, 0) for c in (cpos_plain, cneg_plain))
    store, pos, neg, _ = fresh(shared_stage1, omg)
    x_start = store.x_start.clone()
    ours = stage2(omg, model, store, pos, neg, [(cpos, cneg)], torch.ones(1, H, W), stack=stack)

    merged = core("sd").load_lora_for_models(model, None, lora, 1.0, 0)[0]
    guider = core("samplers").CFGGuider(merged)
    guider.set_conds(cpos_plain, cneg_plain)
    guider.set_cfg(5.0)
    start_latent = merged.model.process_latent_out(x_start)
    theirs = guider.sample(torch.zeros_like(start_latent), start_latent, core("samplers").sampler_object("euler"),
                           store.sigmas.float()[store.start:], disable_pbar=True, seed=3)  # fmt: skip
    assert has_range(ours)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-3)


def test_the_blend_changes_only_inside_the_masks_at_each_step(comfy, base, omg, shared_stage1):
    # the final latent moves outside the mask too (the network mixes positions), but the blended prediction
    # of each step equals the global one outside every mask: check it on the guider's own output
    model, clip, _ = base
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""))
    cpos = omg["stages"].tag_rows(encode(clip, "a photo of a tabby cat"), 0)
    cneg = omg["stages"].tag_rows(encode(clip, "blurry"), 0)
    mask = torch.zeros(1, H, W)
    mask[:, 16:80, 8:64] = 1.0
    store, pos, neg, _ = fresh(shared_stage1, omg)
    m2 = omg["stages"].stage2_model(model, stack, store, "Test")
    seen = []
    guider = omg["guider"].OMGGuider(m2, store, mask, "front_to_back")
    original = guider.predict_noise

    def spy(x, timestep, model_options={}, seed=None):  # noqa: B006
        out = original(x, timestep, model_options, seed)
        glob = super(type(guider), guider).predict_noise(x, timestep, model_options, seed)
        seen.append((out, glob))
        return out

    guider.predict_noise = spy
    guider.set_cfg(5.0)
    guider.set_omg_conds(pos, neg, [(cpos, cneg)])

    noise = core("sample").prepare_noise(latent()["samples"], 3)
    guider.sample(noise, latent()["samples"], core("samplers").sampler_object("euler"), store.sigmas.float(),
                  disable_pbar=True, seed=3)  # fmt: skip
    assert len(seen) == STEPS - store.start
    lat_mask = omg["blend"].resize_masks(mask, (H // 8, W // 8))[0]
    for out, glob in seen:
        # the scene's rows ran batched with the concept's here and alone in the spy's call: equal up to float
        # rounding of the batch shape (the blend itself returns the global prediction bit for bit there)
        assert (out[..., lat_mask == 0] - glob[..., lat_mask == 0]).abs().max() < 1e-5
        assert (out[..., lat_mask == 1] - glob[..., lat_mask == 1]).abs().mean() > 1e-3


# ------------------------------------------------------------------------------------------- masks


def test_same_class_words_get_their_own_token_and_their_own_box(comfy, base, omg):
    model, clip, _ = base
    st = omg["stages"]
    assert st.word_positions(clip, "a dog and a dog", "dog") == [2, 5]
    stack = lora_stack(comfy, ("omg_a.safetensors", "dog", ""), ("omg_b.safetensors", "dog", ""))
    assert st.class_word_tokens(clip, "a dog and a dog on grass", stack) == [2, 5]
    store, *_ = stage1(omg, model, clip, words=[2, 5], scene="a dog and a dog on grass")
    maps = store.word_maps()
    assert maps is not None and maps.shape == (1, 2, H // 16, W // 16)
    # this random network attends almost uniformly (about 1/77 per token); the maps still have a shape
    for m in maps[0]:
        assert torch.isfinite(m).all() and float(m.max() - m.min()) > 0.05 * float(m.mean())
    assert not torch.equal(maps[0, 0], maps[0, 1])
    boxes = st.attention_boxes(store, W, H, 0.4)
    assert len(boxes) == 2
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H


def test_the_node_with_boxes_or_automatic_masks(comfy, base):
    model, clip, vae = base
    regions = comfy.pack_module("samplers.regions").parse_regions(
        json.dumps(
            {
                "boxes": [
                    {"x": 0.05, "y": 0.1, "w": 0.4, "h": 0.8, "label": "cat", "prompt": "a photo of a tabby cat"},
                    {"x": 0.55, "y": 0.1, "w": 0.4, "h": 0.8, "label": "dog"},
                ]
            }
        ),
        W,
        H,
    )
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", "cat"), ("omg_b.safetensors", "dog", "dog"))
    final, first, masks, preview = run_node(comfy, base, stack, regions=regions)
    assert has_range(final["samples"]) and has_range(first["samples"])
    assert masks.shape == (2, H, W) and float(masks[0, :, W // 2 + 8 :].max()) == 0.0
    assert float(masks[0].mean()) > 0.2 and float(masks[1].mean()) > 0.2
    assert preview.shape == (1, H, W, 3) and has_range(preview)
    assert (final["samples"] - first["samples"]).abs().mean() > 1e-3

    auto = run_node(comfy, base, stack)
    assert has_range(auto[0]["samples"]) and auto[2].shape == (2, H, W)
    assert all(float(m.max()) == 1.0 for m in auto[2])

    # SAM refines each box on the stage-1 image; a mask never leaves its box
    from tests.support.builders.sam import save_tiny_sam

    (comfy.models_dir / "sams").mkdir(parents=True, exist_ok=True)
    save_tiny_sam(comfy.models_dir / "sams" / "omg_sam.pth")
    sam = comfy.node_class("MultiConceptSAMLoader").execute("omg_sam.pth").result[0]
    refined = run_node(comfy, base, stack, regions=regions, sam=sam)
    assert has_range(refined[0]["samples"])
    boxes = regions.box_masks()
    assert float((refined[2] * (boxes == 0)).max()) == 0.0
    assert all(float(m.max()) > 0 for m in refined[2])


def test_edlora_and_three_concepts_run(comfy, base):
    edl = comfy.node_class("MultiConceptStackEDLoRA")
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""), ("omg_c.safetensors", "sofa", ""))
    stack = edl.execute("omg_dog.pth", 1.0, 1.0, "", concepts=stack, class_word="dog").result[0]
    final, first, masks, _ = run_node(comfy, base, stack)
    assert masks.shape[0] == 3 and has_range(final["samples"])
    assert (final["samples"] - first["samples"]).abs().mean() > 1e-3


def test_the_layout_store_is_freed_and_plain_sampling_is_unchanged(comfy, base, omg):

    model, clip, _ = base
    pos, neg = encode(clip, SCENE), encode(clip, "blurry")
    noise = core("sample").prepare_noise(latent()["samples"], 1)

    def plain():
        return core("sample").sample(model, noise, 3, 5.0, "euler", "normal", pos, neg, latent()["samples"],
                                   disable_pbar=True, seed=1)  # fmt: skip

    before = plain()
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""), ("omg_b.safetensors", "dog", ""))
    gc.collect()
    older = {id(o) for o in gc.get_objects() if isinstance(o, omg["layout"].LayoutStore)}
    run_node(comfy, base, stack, steps=3)
    gc.collect()
    stores = [o for o in gc.get_objects() if isinstance(o, omg["layout"].LayoutStore) and id(o) not in older]
    assert all(s.bytes == 0 and not s.cross and not s.self_qk and s.x_start is None for s in stores)
    after = plain()
    assert has_range(before) and torch.equal(before, after)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_the_memory_budget_keeps_the_earliest_steps(comfy, base, omg, shared_stage1):
    model, clip, _ = base
    full, *_ = fresh(shared_stage1, omg)
    per_step = full.bytes // (STEPS - full.start)
    small, *_ = stage1(omg, model, clip, budget=int(per_step * 2.5))
    assert small.bytes <= int(per_step * 2.5)
    kept = sorted({k[0] for k in small.cross})
    assert kept == list(range(small.start, small.start + len(kept))) and 1 <= len(kept) < STEPS - small.start
    assert small.stopped_at == kept[-1] + 1
    assert small.needed == full.needed and f"needs {-(-full.needed // 2**20)} MiB" in small.cut_message()
    assert full.cut_message() is None


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_by_name(comfy, base, omg, shared_stage1):
    model, clip, _ = base
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", "cat"))
    counted, calls = counting(base)  # every refusal of the node comes before stage 1 samples
    with pytest.raises(
        ValueError, match="^OMG Sampler: .*horse"
    ):  # a class word the scene prompt lacks (automatic masks)
        run_node(comfy, counted, lora_stack(comfy, ("omg_a.safetensors", "horse", "")))
    with pytest.raises(ValueError, match="^OMG Sampler: .*class word"):  # no class word and no boxes
        run_node(comfy, counted, lora_stack(comfy, ("omg_a.safetensors", "", "")))
    with pytest.raises(ValueError, match="^OMG Sampler: .*scene_prompt"):
        run_node(comfy, counted, stack, scene_prompt="  ")
    other_box = comfy.pack_module("samplers.regions").parse_regions(
        json.dumps({"boxes": [{"x": 0.1, "y": 0.1, "w": 0.3, "h": 0.3, "label": "dog"}]}), W, H
    )
    with pytest.raises(ValueError, match="^OMG Sampler: .*no box"):  # a concept without a mask
        run_node(comfy, counted, stack, regions=other_box)
    square = comfy.pack_module("samplers.regions").parse_regions(
        json.dumps({"boxes": [{"x": 0.1, "y": 0.1, "w": 0.3, "h": 0.3, "label": "cat"}]}), 256, 256
    )
    with pytest.raises(ValueError, match="^OMG Sampler: .*another shape"):
        run_node(comfy, counted, stack, regions=square)
    assert not calls, f"the model ran {len(calls)} times before a refusal"

    # the guider: masks of another size, another seed or latent size than the layout, a start outside
    store, pos, neg, _ = fresh(shared_stage1, omg)
    with pytest.raises(ValueError, match="aspect"):
        stage2(omg, model, store, pos, neg, [(pos, neg)], torch.ones(1, 64, 64), stack=stack)
    with pytest.raises(ValueError, match="seed"):
        stage2(omg, model, store, pos, neg, [], torch.zeros(0, H, W), seed=4)
    with pytest.raises(ValueError, match="start"):
        omg["layout"].LayoutStore(STEPS, STEPS, (H // 8, W // 8), 0, 1)
    # the node still works after all that
    assert has_range(run_node(comfy, base, stack, regions=None, scene_prompt="a cat on a sofa", steps=3)[0]["samples"])


# ------------------------------------------------------------------------------------- model concepts


def _attention_patched(model):
    """The base model with a stock attention patch: ComfyUI's own attn2 patch hook, scaling the text context."""
    clone = model.clone()

    def louder(n, context, value, extra_options):
        return n, context * 1.5, value * 1.5

    clone.set_model_attn2_patch(louder)
    return clone


def test_a_model_concept_is_its_own_pass_with_its_own_patches(comfy, base, omg, shared_stage1):
    # a whole-MODEL concept (e.g. an IP-Adapter/InstantID-patched model) with an all-ones mask: from the start
    # step on, stage 2 is that model's own sampling of its own prompt, continued from stage 1's latent

    model, clip, _ = base
    patched = _attention_patched(model)
    mpos, mneg = encode(clip, "a photo of a woman with red hair"), encode(clip, "blurry")
    store, pos, neg, first = fresh(shared_stage1, omg)
    x_start = store.x_start.clone()
    m2 = _replay_only(omg, model, store)
    guider = omg["guider"].OMGGuider(m2, store, torch.ones(1, H, W), "front_to_back")
    guider.set_cfg(5.0)
    guider.set_omg_conds(pos, neg, [], [(patched, mpos, mneg)])
    noise = core("sample").prepare_noise(latent()["samples"], 3)
    ours = guider.sample(noise, latent()["samples"], core("samplers").sampler_object("euler"), store.sigmas.float(),
                         disable_pbar=True, seed=3)  # fmt: skip

    theirs_guider = core("samplers").CFGGuider(patched)
    theirs_guider.set_conds(mpos, mneg)
    theirs_guider.set_cfg(5.0)
    start_latent = patched.model.process_latent_out(x_start)
    theirs = theirs_guider.sample(torch.zeros_like(start_latent), start_latent, core("samplers").sampler_object("euler"),
                                  store.sigmas.float()[store.start:], disable_pbar=True, seed=3)  # fmt: skip
    unpatched = core("samplers").CFGGuider(model)
    unpatched.set_conds(mpos, mneg)
    unpatched.set_cfg(5.0)
    plain = unpatched.sample(torch.zeros_like(start_latent), start_latent, core("samplers").sampler_object("euler"),
                             store.sigmas.float()[store.start:], disable_pbar=True, seed=3)  # fmt: skip
    assert has_range(ours) and (theirs - plain).abs().mean() > 1e-3, "the patch must matter"
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-3)

    # through the nodes, beside a stack concept; and a model with other weights is refused by name
    entry = comfy.node_class("MultiConceptOMGModelConcept").execute(patched, mpos, mneg, "dog").result[0]
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""))
    final, first_latent, masks, _ = run_node(comfy, base, stack, model_concepts=entry, steps=3)
    assert masks.shape == (2, H, W) and has_range(final["samples"])

    merged = core("sd").load_lora_for_models(model, None, stack[0].adapter.tensors, 1.0, 0)[0]
    other = comfy.node_class("MultiConceptOMGModelConcept").execute(merged, mpos, mneg, "dog").result[0]
    with pytest.raises(ValueError, match="^OMG Sampler: .*weights differ"):
        run_node(comfy, base, stack, model_concepts=other)


# ------------------------------------------------------------------------------------------------ SDXL


def test_an_sdxl_model_with_sdxl_edloras_runs_omg(comfy, omg):
    """SDXL-shaped UNet (70 cross-attention layers, two text encoders), two SDXL ED-LoRA concepts, boxes."""
    from tests.integration.test_edlora_sdxl import TE_LAYERS, sdxl_file
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    model = build_tiny_sdxl(seed=5, all_cross_attention=True)
    clip = build_tiny_clip("sdxl", seed=6, layers=TE_LAYERS)
    vae = _TinyVAE()
    d = comfy.models_dir / "loras"
    torch.save({"params": sdxl_file(("<xcat1>", "<xcat2>"), seed=61)}, d / "omg_xl_cat.pth")
    torch.save({"params": sdxl_file(("<xdog1>", "<xdog2>"), seed=62)}, d / "omg_xl_dog.pth")
    edl = comfy.node_class("MultiConceptStackEDLoRA")
    stack = edl.execute("omg_xl_cat.pth", 1.0, 1.0, "", class_word="cat").result[0]
    stack = edl.execute("omg_xl_dog.pth", 1.0, 1.0, "", concepts=stack, class_word="dog").result[0]
    node = comfy.node_class(NODE_ID)
    final, first, masks, preview = node.execute(
        model, clip, vae, stack, latent(), seed=3, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal",
        scene_prompt=SCENE, negative="blurry", start=0.5,
    ).result  # fmt: skip
    assert masks.shape == (2, H, W) and has_range(final["samples"])
    assert (final["samples"] - first["samples"]).abs().mean() > 1e-4


class _TinyVAE:
    """Enough of a VAE for the stage-1 image: a fixed projection of the latent, upsampled 8x."""

    def decode(self, samples):
        rgb = samples[:, :3].clamp(-3, 3) / 6 + 0.5
        return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest").movedim(1, -1)


def test_masks_given_directly_are_used_and_checked(comfy, base):
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", ""), ("omg_b.safetensors", "dog", ""))
    given = torch.zeros(2, H, W)
    given[0, 10:60, 5:60] = 1.0
    given[1, 20:90, 70:120] = 1.0
    final, first, masks, preview = run_node(comfy, base, stack, masks=given, steps=3)
    assert torch.equal(masks, given) and has_range(final["samples"]) and preview.shape == (1, H, W, 3)
    # refused before stage 1 samples
    counted, calls = counting(base)
    with pytest.raises(ValueError, match="^OMG Sampler: .*one mask per concept"):
        run_node(comfy, counted, stack, masks=given[:1])
    with pytest.raises(ValueError, match="^OMG Sampler: .*aspect"):
        run_node(comfy, counted, stack, masks=torch.ones(2, 64, 64))
    assert not calls, f"the model ran {len(calls)} times before a refusal"


def test_the_replay_gives_the_scene_rows_stage_one_attention(comfy, base, omg, shared_stage1):
    # On SD1.5 the prompt reaches the UNet only through cross-attention. Replaying stage 1's cross-attention
    # outputs in the scene's positive rows therefore makes another scene prompt in stage 2 irrelevant from the
    # start step on: stage 2 ends where stage 1 did. Without the replay (memory budget 0) it does not.
    model, clip, _ = base
    other = encode(clip, "a red car on a mountain road at night")
    store, pos, neg, first = fresh(shared_stage1, omg)
    replayed = stage2(omg, model, store, other, neg, [], torch.zeros(0, H, W))
    torch.testing.assert_close(replayed, first, atol=1e-5, rtol=1e-5)
    bare, *_ = stage1(omg, model, clip, budget=0)
    assert not bare.cross and not bare.self_qk
    unreplayed = stage2(omg, model, bare, other, neg, [], torch.zeros(0, H, W))
    assert has_range(unreplayed) and (unreplayed - first).abs().mean() > 1e-3


def test_a_concepts_box_negative_is_its_own_negative_prompt(comfy, base, omg):
    # official OMG takes a negative prompt per region (kongzhecn/OMG src/pipelines/lora_pipeline.py:313, 343-344);
    # a box without one gets the node's negative
    model, clip, vae = base
    layout_node = comfy.node_class("MultiConceptOMGStage1")
    layout = layout_node.execute(model, clip, vae, latent(), 3, 2, 5.0, "euler", "normal", SCENE, "blurry",
                                 start=0.5).result[0]  # fmt: skip
    regions = comfy.pack_module("samplers.regions").parse_regions(
        {"boxes": [{"x": 0.05, "y": 0.1, "w": 0.4, "h": 0.8, "label": "cat", "negative": "extra legs, lowres"},
                   {"x": 0.55, "y": 0.1, "w": 0.4, "h": 0.8, "label": "dog"}]}, W, H)  # fmt: skip
    stack = lora_stack(comfy, ("omg_a.safetensors", "cat", "cat"), ("omg_b.safetensors", "dog", "dog"))
    guider = comfy.node_class("MultiConceptOMGGuider").execute(model, clip, stack, layout, regions=regions).result[0]
    key = omg["guider"].CONCEPT_KEY

    def negative_of(i):
        return guider.original_conds[key.format(i=i, side="negative")][0]["cross_attn"]

    assert torch.equal(negative_of(0), encode(clip, "extra legs, lowres")[0][0])  # its box's negative
    assert torch.equal(negative_of(1), encode(clip, "blurry")[0][0])  # no box negative: the node's


def test_automatic_masks_keep_sams_mask_whole_boxes_the_user_drew_bound_it(comfy, omg, monkeypatch):
    # official OMG: the detector's box only prompts SAM, whose mask is kept whole (inference_lora.py:91-126): an
    # attention box that caught only a head must still give the whole figure; a box the user drew bounds its mask
    sam = comfy.pack_module("samplers.regions.sam")
    whole = torch.zeros(1, H, W)
    whole[:, 8:90, 4:70] = 1.0  # the figure SAM finds, larger than the box below

    monkeypatch.setattr(sam, "masks_for_boxes", lambda model, image, boxes: (whole.clone(), None))
    box = (20.0, 10.0, 50.0, 40.0)  # a head-sized box inside the figure
    image = torch.rand(1, H, W, 3)
    automatic, refined = omg["stages"].masks_from_boxes([box], W, H, image, object(), keep_in_box=False)
    assert refined and torch.equal(automatic, whole)
    drawn, _ = omg["stages"].masks_from_boxes([box], W, H, image, object())
    assert float(drawn.sum()) < float(whole.sum()) and float(drawn[:, 50:, :].max()) == 0.0
