"""Gradient fusion on the real test checkpoint with two synthetic ED-LoRAs: the fused layers reproduce each
concept's LoRA on that concept's recorded inputs better than the plain sum of both LoRAs; the saved file
reloads to identical weights and words; the fused MODEL/CLIP feed Mix-of-Show Regional; bad input by name."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest
import torch

from tests.support.builders.edlora import official_edlora

FUSE_ID = "MultiConceptFuseConcepts"
LOAD_ID = "MultiConceptLoadFusedConcepts"
SMALL = dict(steps=2, width=64, height=64)
TEMPLATES = ("photo of a {}",)
REGIONS = (
    '{"boxes": [{"x": 0.05, "y": 0.1, "w": 0.4, "h": 0.8, "prompt": "a photo of <cat1> <cat2>", "label": "cat"},'
    ' {"x": 0.55, "y": 0.1, "w": 0.4, "h": 0.8, "prompt": "a photo of <dog1> <dog2>", "label": "dog"}]}'
)


def core(name):
    return importlib.import_module(f"comfy.{name}")


def node_error(comfy, node_id):
    """The NodeError class the node raises (ComfyUI loads the pack under its own module name)."""
    return sys.modules[comfy.node_class(node_id).__module__].NodeError


@pytest.fixture(scope="module")
def base(comfy, tiny_models):

    model, clip, vae = tiny_models[:3]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    # large LoRAs, so the two concepts really disagree on shared layers
    torch.save(official_edlora(words=("<cat1>", "<cat2>"), seed=51, lora_scale=0.3), d / "fu_cat.pth")
    torch.save(official_edlora(words=("<dog1>", "<dog2>"), seed=52, lora_scale=0.3), d / "fu_dog.pth")
    return model, clip, vae


@pytest.fixture(scope="module")
def stack(comfy, base):
    node = comfy.node_class("MultiConceptStackEDLoRA")
    s = node.execute("fu_cat.pth", 0.7, 0.7, "cat").args[0]  # the node's default strengths
    return node.execute("fu_dog.pth", 0.7, 0.7, "dog", concepts=s).args[0]


@pytest.fixture(scope="module")
def fuse(comfy):
    return comfy.pack_module("samplers.fusion.fuse")


@pytest.fixture(scope="module")
def node_run(comfy, base, stack):
    """The Fuse Concepts node once (the suite's only full fusion): its outputs, the file it saved, and the
    progress bar's updates."""
    model, clip, _ = base
    utils = core("utils")
    before = set((comfy.models_dir / "loras").iterdir())
    seen = []
    previous = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        out = comfy.node_class(FUSE_ID).execute(model, clip, stack, "closed form", "fu_pair", SMALL["steps"],
                                                SMALL["width"], 3, prompt_templates=TEMPLATES[0])  # fmt: skip
    finally:
        utils.set_progress_bar_global_hook(previous)
    new = set((comfy.models_dir / "loras").iterdir()) - before
    return out.args, new, seen


@pytest.fixture(scope="module")
def saved(comfy, node_run, fuse):
    return comfy.pack_module("formats.fused").read_fused(comfy.models_dir / "loras" / "fu_pair.safetensors")


def test_fused_layers_beat_the_plain_sum_on_each_concepts_inputs(saved, node_run):
    reports = saved.residuals
    stages = {r["stage"] for r in reports}
    assert stages == {"text encoder", "cross-attention k/v", "UNet"}
    assert len(reports) == len(saved.unet) + len(saved.clip)
    n_fused = n_sum = 0.0
    for r in reports:
        assert len(r["fused"]) == len(r["sum"]) == 2
        assert all(e == e and e >= 0 for e in r["fused"] + r["sum"])  # not NaN
        n_fused += sum(r["fused"])
        n_sum += sum(r["sum"])
    assert n_fused < 0.5 * n_sum, (n_fused, n_sum)
    for stage in stages:  # per stage and per concept too (every concept has LoRA on every layer here)
        rs = [r for r in reports if r["stage"] == stage]
        for i in range(2):
            assert sum(r["fused"][i] for r in rs) < sum(r["sum"][i] for r in rs), (stage, i)
    # the progress bar: monotone, ends at its total
    seen = node_run[2]
    assert len(seen) > 10 and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_fused_layer_outputs_measured_directly(comfy, base, stack, saved, fuse):
    """One text-encoder layer's outputs on each concept's recorded inputs, computed outside the solver's maths:
    the fused weight is closer to the concept's own weight than the sum of both LoRAs."""
    model, clip, _ = base
    stack = fuse.fusion_strengths(stack, fuse.FUSION_STRENGTHS[0])  # the strengths the node fused at (1.0)
    items = [fuse.concept_patches(model, clip, c) for c in stack]
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert key in saved.clip
    for i in range(2):
        acc = fuse.record_text_encoder(clip, items[i], [key], TEMPLATES)
        (moment,) = [a.moment.double() for a in acc.values()]
        source = fuse.WeightSource(clip.patcher, torch.device("cpu"))
        w0 = source.base(key)
        own = w0 + source.delta(key, w0, items[i].clip[key], stack[i].strength_text)
        other = source.delta(key, w0, items[1 - i].clip[key], stack[1 - i].strength_text)
        fused = w0 + saved.clip[key].float()

        def err(w, own=own, moment=moment):
            e = (w - own).double()
            return float(((e @ moment) * e).sum())

        assert err(fused) < 0.5 * err(own + other), i


def test_each_concept_is_fused_at_full_strength_as_the_official_fusion(comfy, stack, saved, fuse):
    # TencentARC/Mix-of-Show gradient_fusion.py:403 and :512 merge each concept at unet_alpha / text_encoder_alpha,
    # 1.0 in every official fusion config (datasets/data_cfgs/MixofShow/multi-concept/*/*.json)
    assert [(c.strength_unet, c.strength_text) for c in stack] == [(0.7, 0.7)] * 2  # the stack node's defaults
    assert [(c.strength_unet, c.strength_text) for c in saved.concepts] == [(1.0, 1.0)] * 2
    full = fuse.fusion_strengths(stack, fuse.FUSION_STRENGTHS[0])
    assert [(c.strength_unet, c.strength_text) for c in full] == [(1.0, 1.0)] * 2
    assert fuse.fusion_strengths(stack, "the stack's strengths") is stack
    # a strength the user changed is the user's: kept (0.8 here; 0, a part switched off, too)
    changed = dataclasses.replace(stack, concepts=(dataclasses.replace(stack[0], strength_unet=0.8, strength_text=0.0),
                                                   stack[1]))  # fmt: skip
    full = fuse.fusion_strengths(changed, fuse.FUSION_STRENGTHS[0])
    assert [(c.strength_unet, c.strength_text) for c in full] == [(0.8, 0.0), (1.0, 1.0)]
    with pytest.raises(fuse.FusionError, match="strengths is 'half'"):
        fuse.fusion_strengths(stack, "half")


def test_the_text_encoder_is_recorded_on_the_16_layer_variants_only(comfy, base, stack, fuse):
    # official: gradient_fusion.py:517-527 binds each prompt into 16 per-layer prompts (bind_concept_prompt) and
    # records the text encoder on those; our encoder's 17th, layer-averaged variant is not recorded
    model, clip, _ = base
    item = fuse.concept_patches(model, clip, stack[0])
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    (acc,) = fuse.record_text_encoder(clip, item, [key], TEMPLATES).values()
    own = fuse.concept_clip(clip, [stack[0]], [])
    tokens = sum(fuse._real_token_counts(own, p)["l"] for p in fuse.concept_prompts(stack[0], TEMPLATES))
    assert acc.count == 16 * tokens, (acc.count, tokens)


def test_node_saves_a_file_that_reloads_to_identical_weights_and_words(comfy, base, node_run, fuse):
    model, clip, _ = base
    (f_model, f_clip, f_stack, plot, report), new_files, _ = node_run
    assert [p.name for p in new_files] == ["fu_pair.safetensors"]
    assert "fu_pair.safetensors" in report and "fused" in report
    assert plot.shape[-1] == 3 and float(plot.std()) > 0.01
    out = comfy.node_class(LOAD_ID).execute("fu_pair.safetensors", model, clip).args
    l_model, l_clip, l_stack, info = out
    assert "<cat1> <cat2>" in info and "<dog1> <dog2>" in info
    assert [c.words for c in l_stack] == [c.words for c in f_stack] == [("<cat1>", "<cat2>"), ("<dog1>", "<dog2>")]
    assert [c.label for c in l_stack] == ["cat", "dog"]
    for a, b in zip(l_stack, f_stack, strict=True):
        for w in a.words:
            assert torch.equal(a.adapter.embeddings[w]["l"], b.adapter.embeddings[w]["l"])
    cpu = torch.device("cpu")
    for fused_p, loaded_p, base_p in ((f_model, l_model, model), (f_clip.patcher, l_clip.patcher, clip.patcher)):
        fs, ls, bs = (fuse.WeightSource(p, cpu) for p in (fused_p, loaded_p, base_p))
        changed = [k for k in fused_p.patches if k in ls.key_patches]
        assert changed and set(changed) == set(loaded_p.patches)
        for k in changed:
            assert torch.equal(fs.base(k), ls.base(k)), k
        assert any(not torch.equal(fs.base(k), bs.base(k)) for k in changed)
    # the inputs are untouched
    assert not any(k in model.patches for k in f_model.patches)


def test_fused_model_feeds_mixofshow_regional(comfy, base, node_run):
    import nodes

    model, clip, vae = base
    (f_model, f_clip, f_stack, _, _), _, _ = node_run
    regions = comfy.pack_module("samplers.regions").parse_regions(REGIONS, 64, 64)
    node = comfy.node_class("MultiConceptMixOfShowRegional")
    m, pos, neg, _ = node.execute(f_model, f_clip, regions, "a cat and a dog", "", concepts=f_stack).args
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = nodes.common_ksampler(m, 1, 3, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    img = vae.decode(out).detach()
    assert torch.isfinite(img).all() and float(img.std()) > 1e-3
    # the base MODEL with the fused stack: refused by name
    NodeError = node_error(comfy, "MultiConceptMixOfShowRegional")
    with pytest.raises(NodeError, match="fused concept"):
        node.execute(model, f_clip, regions, "a cat and a dog", "", concepts=f_stack)
    with pytest.raises(NodeError, match="fused concept"):
        node.execute(f_model, clip, regions, "a cat and a dog", "", concepts=f_stack)


def test_fused_concepts_cannot_be_scoped_or_fused_again(comfy, base, node_run):
    model, clip, _ = base
    (f_model, f_clip, f_stack, _, _), _, _ = node_run
    NodeError = node_error(comfy, FUSE_ID)
    with pytest.raises(NodeError, match="already fused"):
        comfy.node_class(FUSE_ID).execute(f_model, f_clip, f_stack, "closed form", "again", 1, 64, 0)
    resolve = comfy.pack_module("samplers.scoped_lora.adapters")
    with pytest.raises(resolve.ScopedLoRAError, match="fused concept"):
        resolve.resolve_concept(f_model, f_stack[0])


def test_bad_input_is_refused_by_name(comfy, base, stack):
    model, clip, _ = base
    NodeError = node_error(comfy, FUSE_ID)
    fuse_node = comfy.node_class(FUSE_ID)
    d = comfy.models_dir / "loras"
    before = set(d.iterdir())
    # one concept
    one = comfy.pack_module("samplers.concept_stack").ConceptStack(stack.concepts[:1])
    with pytest.raises(NodeError, match=r"^Fuse Concepts: .*at least two concepts"):
        fuse_node.execute(model, clip, one, "closed form", "x", 1, 64, 0)
    # concepts of different base models
    torch.save(official_edlora(words=("<xl1>",), seed=53, sdxl=True), d / "fu_xl.pth")
    mixed = comfy.node_class("MultiConceptStackEDLoRA").execute("fu_xl.pth", 1.0, 1.0, "", concepts=stack).args[0]
    with pytest.raises(NodeError, match="different base models"):
        fuse_node.execute(model, clip, mixed, "closed form", "x", 1, 64, 0)
    # duplicate words: a LoRA whose trigger word is an ED-LoRA's word
    from safetensors.torch import save_file

    from tests.support.builders.lora import make_lora

    save_file(
        make_lora(model, ["input_blocks.1.1.transformer_blocks.0.attn1.to_q"], seed=54), str(d / "fu_lora.safetensors")
    )
    dup = (
        comfy.node_class("MultiConceptStackLoRA")
        .execute("fu_lora.safetensors", 1.0, 1.0, "", concepts=stack, trigger_words="<cat1>")
        .args[0]
    )
    with pytest.raises(NodeError, match=r"<cat1> names two concepts"):
        fuse_node.execute(model, clip, dup, "closed form", "x", 1, 64, 0)
    # templates without {} and a bad file name
    with pytest.raises(NodeError, match="has no {}"):
        fuse_node.execute(model, clip, stack, "closed form", "x", 1, 64, 0, prompt_templates="photo")
    with pytest.raises(NodeError, match="save_name"):
        fuse_node.execute(model, clip, stack, "closed form", "../x", 1, 64, 0)
    assert set(d.iterdir()) - before == {d / "fu_xl.pth", d / "fu_lora.safetensors"}  # nothing half-written


def test_fused_file_in_single_concept_loaders_and_wrong_files_in_the_fused_loader(comfy, base, node_run):
    model, clip, _ = base
    NodeError = node_error(comfy, LOAD_ID)
    with pytest.raises(NodeError, match="Load Fused Concepts"):
        comfy.node_class("MultiConceptEDLoRALoader").execute(model, clip, "fu_pair.safetensors", 1.0, 1.0)  # noqa: E501
    with pytest.raises(NodeError, match="Load Fused Concepts"):
        comfy.node_class("MultiConceptStackEDLoRA").execute("fu_pair.safetensors", 1.0, 1.0, "")
    with pytest.raises(NodeError, match=r"^Load Fused Concepts: .*not a fused-concepts file"):
        comfy.node_class(LOAD_ID).execute("fu_cat.pth", model, clip)


def test_cancel_leaves_nothing_half_written(comfy, base, stack):
    """Interrupting (ComfyUI's Cancel) during the recording stops the fusion; no file appears."""
    model, clip, _ = base
    utils, mm = core("utils"), core("model_management")
    d = comfy.models_dir / "loras"
    before = set(d.iterdir())
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)

    previous = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.node_class(FUSE_ID).execute(model, clip, stack, "closed form", "fu_cancelled", 2, 64, 0,
                                              prompt_templates=TEMPLATES[0])  # fmt: skip
    finally:
        utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)
    assert len(calls) >= 2
    assert set(d.iterdir()) == before
