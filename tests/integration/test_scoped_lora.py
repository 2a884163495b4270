"""Scoped LoRA on the real test checkpoint: exact against ComfyUI's merged LoRA, bit-identical when it
should do nothing, rows like separate passes, and local (DESIGN.md §6)."""

from __future__ import annotations

import pytest
import torch

from tests.support.builders.lora import SD15_ALL, SD15_ATTENTION, make_lora

W, H = 128, 96  # non-square on purpose: a swapped x/y anywhere shows
STEPS = 3


@pytest.fixture(scope="module")
def base(comfy, tiny_models):
    import nodes

    model, clip, vae = tiny_models[:3]
    encode = nodes.CLIPTextEncode().encode
    pos = encode(clip, "a photo of a cat and a dog on a sofa")[0]
    neg = encode(clip, "blurry, lowres")[0]
    return model, clip, vae, pos, neg


@pytest.fixture(scope="module")
def mods(comfy):
    return {
        "stack": comfy.pack_module("samplers.concept_stack"),
        "adapters": comfy.pack_module("samplers.scoped_lora.adapters"),
        "runtime": comfy.pack_module("samplers.scoped_lora.runtime"),
    }


def lora_concept(mods, sd, name="test_lora.safetensors", strength=1.0, label=""):
    stack = mods["stack"]
    return stack.Concept(
        uid="c?",
        kind="lora",
        source=name,
        words=(),
        label=label,
        strength_unet=strength,
        adapter=stack.LoRAFile(name=name, tensors=sd),
    )


def scoped(mods, model, entries, node="Test"):
    """A clone of ``model`` with ``entries`` = [(concept, Scope kwargs)] installed."""
    rt = mods["runtime"]
    clone = model.clone()
    items = [rt.ScopedConcept(mods["adapters"].resolve_concept(clone, c), rt.Scope(**kw)) for c, kw in entries]
    rt.install_scoped_lora(clone, items, node)
    return clone


def merged(model, sd, strength=1.0):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0)[0]


def sample(model, pos, neg, seed=5, steps=STEPS, cfg=4.0):
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


def box_mask(x0, y0, x1, y1, h=H, w=W):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1.0
    return m


def has_range(t):
    return torch.isfinite(t).all() and t.std() > 1e-3


def test_one_concept_with_an_all_ones_mask_equals_comfyui_merging_it(base, mods):
    model, _, _, pos, neg = base
    sd = make_lora(model, SD15_ALL, seed=1)
    ours = scoped(mods, model, [(lora_concept(mods, sd, strength=0.8), {"mask": torch.ones(H, W)})])
    theirs = merged(model, sd, 0.8)
    plain_x0, plain_out = sample(model, pos, neg)
    x0, out = sample(ours, pos, neg)
    ref_x0, ref_out = sample(theirs, pos, neg)
    assert has_range(ref_x0) and (ref_x0 - plain_x0).abs().mean() > 1e-3, "the LoRA must change the output"
    assert torch.allclose(x0, ref_x0, atol=2e-4, rtol=1e-3), (x0 - ref_x0).abs().max()
    assert torch.allclose(out, ref_out, atol=5e-4, rtol=1e-3), (out - ref_out).abs().max()


class CountingAttention:
    """attn1 replace patch under the scoped one: counts the query positions attended per layer call."""

    def __init__(self):
        self.queries = 0

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        self.queries += q.shape[0] * q.shape[1]
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])


def _self_attention_queries(model, mods, entries, pos, neg):
    """Query positions attended by the first input block's self-attention over one sampling step."""
    clone = model.clone()
    counter = CountingAttention()
    clone.set_model_attn1_replace(counter, "input", 1, 0)
    rt = mods["runtime"]
    items = [rt.ScopedConcept(mods["adapters"].resolve_concept(clone, c), rt.Scope(**kw)) for c, kw in entries]
    if items:
        rt.install_scoped_lora(clone, items, "Test")
    _, out = sample(clone, pos, neg, steps=1)
    assert has_range(out)
    return counter.queries


def test_covered_queries_are_attended_once_not_also_by_the_plain_attention(base, mods):
    # Keys/values scoped to a region: the queries inside attend to the concept's keys/values. Where the
    # concepts' masks cover a query fully, the plain attention is not needed there (its share is 0), so two
    # concepts tiling the image cost one attention, as without concepts; a half-covered image costs 1.5.
    model, _, _, pos, neg = base
    sd_a, sd_b = make_lora(model, SD15_ATTENTION, seed=11), make_lora(model, SD15_ATTENTION, seed=12)
    left, right = box_mask(0, 0, W // 2, H), box_mask(W // 2, 0, W, H)
    plain = _self_attention_queries(model, mods, [], pos, neg)
    tiled = _self_attention_queries(
        model,
        mods,
        [
            (lora_concept(mods, sd_a, "a.safetensors"), {"mask": left}),
            (lora_concept(mods, sd_b, "b.safetensors"), {"mask": right}),
        ],
        pos,
        neg,
    )
    half = _self_attention_queries(model, mods, [(lora_concept(mods, sd_a, "a.safetensors"), {"mask": left})], pos, neg)
    soft = _self_attention_queries(
        model, mods, [(lora_concept(mods, sd_a, "a.safetensors"), {"mask": torch.full((H, W), 0.5)})], pos, neg
    )
    assert plain > 0
    assert tiled == plain and half == plain, (tiled, half, plain)
    assert soft == 2 * plain, (soft, plain)


def test_locon_with_mid_factors_equals_merging(base, mods):
    model, _, _, pos, neg = base
    sd = make_lora(
        model, ["input_blocks.1.0.in_layers.2", "input_blocks.3.0.op", "output_blocks.2.1.conv"], seed=2, mid=True
    )
    assert any(k.endswith("lora_mid.weight") for k in sd)
    x0, _ = sample(scoped(mods, model, [(lora_concept(mods, sd), {"mask": torch.ones(H, W)})]), pos, neg, steps=1)
    ref_x0, _ = sample(merged(model, sd), pos, neg, steps=1)
    plain_x0, _ = sample(model, pos, neg, steps=1)
    assert (ref_x0 - plain_x0).abs().mean() > 1e-4
    assert torch.allclose(x0, ref_x0, atol=2e-4, rtol=1e-3), (x0 - ref_x0).abs().max()


def test_an_all_zeros_mask_or_unselected_rows_give_the_plain_output_bit_for_bit(base, mods):
    model, _, _, pos, neg = base
    sd = make_lora(model, SD15_ALL, seed=3)
    plain = sample(model, pos, neg)
    assert has_range(plain[0])
    zero = scoped(mods, model, [(lora_concept(mods, sd), {"mask": torch.zeros(H, W)})])
    untagged = scoped(mods, model, [(lora_concept(mods, sd), {"row_tags": frozenset({"nobody"})})])
    for clone in (zero, untagged):
        x0, out = sample(clone, pos, neg)
        assert torch.equal(x0, plain[0]) and torch.equal(out, plain[1])


class _BatchRecorder:
    """A guider that records calc_cond_batch's per-cond outputs and the chunks of each UNet call."""

    @staticmethod
    def run(model, positive, negative, seed=9):
        import comfy.sample
        import comfy.samplers

        recorded = {"outputs": [], "chunks": []}

        class Guider(comfy.samplers.CFGGuider):
            def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
                outs = comfy.samplers.calc_cond_batch(
                    self.inner_model,
                    [self.conds.get("positive"), self.conds.get("negative")],
                    x,
                    timestep,
                    model_options,
                )
                recorded["outputs"].append([o.clone() for o in outs])
                return outs[0]

        guider = Guider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(1.0)

        def count(executor, *args, **kwargs):
            recorded["chunks"].append(list(args[5]["cond_or_uncond"]))
            return executor(*args, **kwargs)

        import comfy.patcher_extension as pe

        counting = guider.model_patcher.clone()
        counting.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test.count", count)
        guider.model_patcher = counting
        latent = torch.zeros(1, 4, H // 8, W // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        sampler = comfy.samplers.sampler_object("euler")
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 1)
        guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=seed)
        return recorded


def test_rows_of_two_concepts_in_one_call_equal_two_separate_merged_passes(base, mods):
    model, _, _, pos, neg = base
    runtime = mods["runtime"]
    sd_a, sd_b = make_lora(model, SD15_ALL, seed=4), make_lora(model, SD15_ALL, seed=5)
    tag = runtime.ROW_TAGS_KEY
    pos_a = [[pos[0][0], {**pos[0][1], tag: ("A",)}]]
    pos_b = [[neg[0][0], {**neg[0][1], tag: ("B",)}]]  # another prompt, for concept B's rows
    both = scoped(
        mods,
        model,
        [
            (lora_concept(mods, sd_a, "a.safetensors"), {"row_tags": frozenset({"A"})}),
            (lora_concept(mods, sd_b, "b.safetensors"), {"row_tags": frozenset({"B"})}),
        ],
    )
    ours = _BatchRecorder.run(both, pos_a, pos_b)
    assert ours["chunks"] == [[0, 1]] or ours["chunks"] == [[1, 0]], "both rows must share one UNet call"
    only_a = _BatchRecorder.run(merged(model, sd_a), pos_a, pos_a)["outputs"][0][0]
    only_b = _BatchRecorder.run(merged(model, sd_b), pos_b, pos_b)["outputs"][0][1]
    plain = _BatchRecorder.run(model, pos_a, pos_b)["outputs"][0]
    got_a, got_b = ours["outputs"][0]
    assert (only_a - plain[0]).abs().mean() > 1e-4 and (only_b - plain[1]).abs().mean() > 1e-4
    assert torch.allclose(got_a, only_a, atol=2e-4, rtol=1e-3), (got_a - only_a).abs().max()
    assert torch.allclose(got_b, only_b, atol=2e-4, rtol=1e-3), (got_b - only_b).abs().max()


def _leak(delta: torch.Tensor, mask: torch.Tensor, margin: int) -> float:
    from multiconcept.samplers.scoped_lora.locality import leak

    return leak(delta, mask, margin)


def locality(base, mods):
    """Leaks of two concepts in two boxes, scoped and merged, at the first step (latent) and in the image."""
    model, _, vae, pos, neg = base
    sds = [make_lora(model, SD15_ALL, seed=6, scale=0.5), make_lora(model, SD15_ALL, seed=7, scale=0.5)]
    boxes = [box_mask(8, 16, 56, 88), box_mask(72, 8, 120, 80)]
    concepts = [lora_concept(mods, sd, f"{n}.safetensors") for n, sd in zip("ab", sds, strict=True)]
    results = {}
    for i in range(2):
        other = 1 - i
        without = scoped(mods, model, [(concepts[other], {"mask": boxes[other]})])
        with_both = scoped(mods, model, [(concepts[other], {"mask": boxes[other]}), (concepts[i], {"mask": boxes[i]})])
        merged_other = merged(model, sds[other])
        merged_both = merged(merged_other, sds[i])
        runs = {
            k: sample(m, pos, neg)
            for k, m in {"w": without, "b": with_both, "mo": merged_other, "mb": merged_both}.items()
        }
        latent_mask = torch.nn.functional.adaptive_avg_pool2d(boxes[i][None, None], (H // 8, W // 8))[0, 0]
        with torch.no_grad():
            images = {k: vae.decode(v[1]) for k, v in runs.items()}
        assert has_range(images["b"])
        results[i] = {
            "scoped_step": _leak(runs["b"][0] - runs["w"][0], latent_mask, 1),
            "merged_step": _leak(runs["mb"][0] - runs["mo"][0], latent_mask, 1),
            "scoped_image": _leak((images["b"] - images["w"]).movedim(-1, 1), boxes[i], 16),
            "merged_image": _leak((images["mb"] - images["mo"]).movedim(-1, 1), boxes[i], 16),
        }
    return results


def test_two_concepts_in_two_boxes_stay_in_their_boxes(base, mods):
    results = locality(base, mods)
    for i, r in results.items():
        # Merged LoRAs act everywhere: leak 0.8-0.9. A scoped LoRA changes each layer's output only inside
        # its box; what still reaches outside is carried there by the plain network, which mixes positions
        # through attention and convolutions, and much more so in this random test network (its attention
        # is near uniform) than in a trained one: a scoped LoRA on a single pointwise layer, whose own output
        # changes only in the box, already leaks about 0.22 here. Measured: 0.37-0.39 at the first step and
        # 0.39 in the image (vs 0.80-0.84 merged). The bounds keep margin for other platforms and fail for a
        # runtime that does not mask (leak = merged) or masks the wrong place. The image is measured past
        # 16 px, the reach of the TAESD decoder's own convolutions (it alone leaks 0.12 at 8 px, 0.06 at 16).
        assert r["merged_step"] > 0.6 and r["merged_image"] > 0.6, r
        assert r["scoped_step"] < 0.55 * r["merged_step"], (i, r)
        assert r["scoped_image"] < 0.6 * r["merged_image"], (i, r)


def test_chained_installs_equal_one_install_of_both(base, mods):
    model, _, _, pos, neg = base
    runtime = mods["runtime"]
    a = lora_concept(mods, make_lora(model, SD15_ATTENTION, seed=8), "a.safetensors")
    b = lora_concept(mods, make_lora(model, SD15_ALL, seed=9), "b.safetensors")
    left, right = box_mask(0, 0, 64, 96), box_mask(48, 0, 128, 96)
    once = scoped(mods, model, [(a, {"mask": left}), (b, {"mask": right})])
    first = scoped(mods, model, [(a, {"mask": left})])
    second = first.clone()
    runtime.install_scoped_lora(
        second, [runtime.ScopedConcept(mods["adapters"].resolve_concept(second, b), runtime.Scope(mask=right))], "T"
    )
    x_once, out_once = sample(once, pos, neg)
    x_chain, out_chain = sample(second, pos, neg)
    assert torch.equal(x_once, x_chain) and torch.equal(out_once, out_chain)
    assert len(first.model_options["transformer_options"][runtime.SPEC_KEY].concepts) == 1  # untouched


def test_plain_sampling_after_scoped_sampling_is_unchanged_and_hooks_are_gone(base, mods):
    model, _, _, pos, neg = base
    before = sample(model, pos, neg)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    ours = scoped(
        mods, model, [(lora_concept(mods, make_lora(model, SD15_ALL, seed=10)), {"mask": box_mask(0, 0, 64, 48)})]
    )
    changed = sample(ours, pos, neg)
    assert not torch.equal(changed[1], before[1])
    after = sample(model, pos, neg)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    hooked = [n for n, m in model.model.diffusion_model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    assert all(torch.equal(weights[k], v) for k, v in model.model.state_dict().items())
    assert not model.patches and not model.object_patches and "multiconcept.scoped_lora" not in model.injections


SDXL_TARGETS = [
    "input_blocks.3.1.proj_in",  # linear in SDXL
    "input_blocks.3.1.transformer_blocks.1.attn1.to_k",
    "input_blocks.5.1.transformer_blocks.1.attn1.to_out.0",
    "input_blocks.5.1.transformer_blocks.1.attn2.to_k",
    "input_blocks.5.1.transformer_blocks.1.attn2.to_v",
    "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "output_blocks.3.1.transformer_blocks.1.attn2.to_q",
    "output_blocks.3.1.proj_out",
    "input_blocks.1.0.in_layers.2",
    "input_blocks.1.0.emb_layers.1",
]


def test_an_sdxl_shaped_unet_runs_scoped_lora_with_a_lora_made_for_it(comfy, mods):
    from tests.support.builders.sdxl import build_tiny_sdxl, sdxl_conds

    model = build_tiny_sdxl(seed=3)
    assert type(model.model.model_config).__name__ == "SDXL"
    pos, neg = sdxl_conds()
    sd = make_lora(model, SDXL_TARGETS, seed=11, scale=0.6)
    assert any("transformer_blocks_1" in k for k in sd)  # kohya names of SDXL's second transformer block
    plain = sample(model, pos, neg, steps=2)
    ours = sample(scoped(mods, model, [(lora_concept(mods, sd), {"mask": torch.ones(H, W)})]), pos, neg, steps=2)
    theirs = sample(merged(model, sd), pos, neg, steps=2)
    assert has_range(theirs[0]) and (theirs[0] - plain[0]).abs().mean() > 1e-4
    assert torch.allclose(ours[0], theirs[0], atol=2e-4, rtol=1e-3), (ours[0] - theirs[0]).abs().max()
    assert torch.allclose(ours[1], theirs[1], atol=5e-4, rtol=1e-3), (ours[1] - theirs[1]).abs().max()
    nothing = sample(scoped(mods, model, [(lora_concept(mods, sd), {"mask": torch.zeros(H, W)})]), pos, neg, steps=2)
    assert torch.equal(nothing[0], plain[0]) and torch.equal(nothing[1], plain[1])
