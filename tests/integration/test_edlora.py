"""ED-LoRA in a real ComfyUI: exact weight deltas, layer-wise context inside sampling, no state leaks."""

from __future__ import annotations

import pytest
import torch

from tests.support.edlora_factory import official_edlora, sd15_te_modules, sd15_unet_modules
from tests.support.graphs import edlora_txt2img, plain_txt2img

ALPHA_UNET, ALPHA_TEXT = 0.7, 0.6


@pytest.fixture(scope="module")
def loras_dir(comfy):
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def cat_file(loras_dir):
    data = official_edlora(words=("<cat1>", "<cat2>"), seed=11)
    torch.save(data, loras_dir / "it_cat.pth")
    return "it_cat.pth", data["params"]


@pytest.fixture(scope="module")
def dog_file(loras_dir):
    data = official_edlora(words=("<dog1>", "<dog2>"), seed=12)
    torch.save(data, loras_dir / "it_dog.pth")
    return "it_dog.pth", data["params"]


@pytest.fixture(scope="module")
def twin_file(loras_dir):
    """Another concept that the trainer happened to call <cat1> <cat2> as well."""
    data = official_edlora(words=("<cat1>", "<cat2>"), seed=13)
    torch.save(data, loras_dir / "it_twin.pth")
    return "it_twin.pth", data["params"]


@pytest.fixture(scope="module")
def base(comfy, tiny_checkpoint):
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint)[:3]
    return model, clip, vae


def load_edlora(comfy, model, clip, name, su=ALPHA_UNET, st=ALPHA_TEXT, **kw):
    loader = comfy.node_class("MultiConceptEDLoRALoader")
    out = loader.execute(model, clip, name, su, st, **kw)
    return out.result if hasattr(out, "result") else out


def patched_state(patcher):
    """The weights as ComfyUI computes them for sampling (patches merged), copied to CPU."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
    return {k: v.detach().clone().cpu() for k, v in patcher.model.state_dict().items()}


def unet_key_of(model):
    """diffusers module name -> ComfyUI state-dict key, from ComfyUI's own conversion table."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {
        k[: -len(".weight")]: "diffusion_model." + v[: -len(".weight")]
        for k, v in table.items()
        if k.endswith(".weight")
    }


def assert_delta(after, before, expected, key):
    """``after - before == expected`` up to rounding of the result to the weight's dtype (1 ulp)."""
    tol = torch.finfo(after.dtype).eps * float(after.abs().max()) + 1e-7
    delta = after.float() - before.float()
    assert torch.allclose(delta, expected, atol=tol, rtol=0), f"{key}: max error {(delta - expected).abs().max()}"
    assert delta.abs().max() > 0, key


def expected_delta(params_group, module, alpha):
    up = params_group[f"{module}.lora_up.weight"].float()
    down = params_group[f"{module}.lora_down.weight"].float()
    return alpha * (up @ down)


def test_weights_change_by_alpha_up_down_exactly_at_listed_modules(comfy, base, cat_file):
    model, clip, _ = base
    name, params = cat_file
    before_unet, before_te = patched_state(model), patched_state(clip.patcher)
    m, c, concept, words = load_edlora(comfy, model, clip, name)
    after_unet, after_te = patched_state(m), patched_state(c.patcher)

    key_of = unet_key_of(model)
    expected = {key_of[mod] + ".weight": expected_delta(params["unet"], mod, ALPHA_UNET) for mod in sd15_unet_modules()}
    assert len(expected) == 128
    for k in before_unet:
        if k in expected:
            assert_delta(after_unet[k], before_unet[k], expected[k], k)
        else:
            assert torch.equal(after_unet[k], before_unet[k]), f"{k} changed but is not an ED-LoRA module"

    te_expected = {
        f"clip_l.transformer.{mod}.weight": expected_delta(params["text_encoder"], mod, ALPHA_TEXT)
        for mod in sd15_te_modules()
    }
    for k in before_te:
        if k in te_expected:
            assert_delta(after_te[k], before_te[k], te_expected[k], k)
        else:
            assert torch.equal(after_te[k], before_te[k]), f"{k} changed but is not an ED-LoRA module"
    assert words == "<cat1> <cat2>" and concept.words == ("<cat1>", "<cat2>") and concept.file == name
    # the inputs are untouched: the loader worked on clones
    assert not model.patches and not clip.patcher.patches


def test_strength_zero_changes_no_weight(comfy, base, cat_file):
    model, clip, _ = base
    m, c, _, _ = load_edlora(comfy, model, clip, cat_file[0], su=0.0, st=0.0)
    assert not m.patches and not c.patcher.patches
    before, after = patched_state(model), patched_state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = patched_state(clip.patcher), patched_state(c.patcher)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plain_prompts_encode_exactly_as_before(comfy, base, cat_file):
    import nodes

    model, clip, _ = base
    _, c, _, _ = load_edlora(comfy, model, clip, cat_file[0], st=0.0)
    for text in ("a photo of a sofa", "", "(blurry:1.3), lowres, embedding:nothing"):
        ours = nodes.CLIPTextEncode().encode(c, text)[0]
        stock = nodes.CLIPTextEncode().encode(clip, text)[0]
        assert torch.equal(ours[0][0], stock[0][0])
        assert set(ours[0][1]) == set(stock[0][1])  # no extra entries either


# ------------------------------------------------------------------ capturing cross-attention contexts


class AttentionCapture:
    """Records what each cross-attention layer receives, per batch chunk (cond/uncond)."""

    def __init__(self):
        self.calls = []  # (transformer_index, cond_or_uncond, rows per chunk, context)
        self.to_k_inputs = []
        self.handles = []

    def patch(self, n, context, value, extra_options):
        self.calls.append(
            (extra_options["transformer_index"], list(extra_options["cond_or_uncond"]), context.detach().clone())
        )
        return n, context, value

    def hook_to_k(self, diffusion_model):
        for name, module in diffusion_model.named_modules():
            if name.endswith("attn2"):
                self.handles.append(
                    module.to_k.register_forward_pre_hook(
                        lambda mod, args: self.to_k_inputs.append(args[0].detach().clone())
                    )
                )

    def remove(self):
        for h in self.handles:
            h.remove()


def sample_capturing(model, positive, negative, steps=1, cfg=5.0, seed=3):
    import nodes

    cap = AttentionCapture()
    m = model.clone()
    m.set_model_attn2_patch(cap.patch)  # after the pack's patch: sees what attention will use
    cap.hook_to_k(m.model.diffusion_model)
    try:
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        nodes.common_ksampler(m, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    finally:
        cap.remove()
    return cap


def reference_layer_encoding(clip, template: str, slots: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Encode ``template`` with each slot word replaced by a tensor token (ComfyUI's embedding mechanism).

    This path never touches the pack's tokenizer or its layer expansion.
    """
    base_tok = clip.tokenizer.base
    tokens = base_tok.tokenize_with_weights(template.format(**{k: "ohwx" for k in slots}))
    placeholder = base_tok.tokenize_with_weights("ohwx")["l"][0][1][0]
    order = iter([slots[k] for k in sorted(slots, key=lambda s: template.index("{" + s + "}"))])
    tokens = {"l": [[((next(order)[layer] if t == placeholder else t), w) for t, w in s] for s in tokens["l"]]}
    return clip.encode_from_tokens(tokens)


def test_each_cross_attention_layer_sees_its_own_embedding_in_cond_rows_only(comfy, base, cat_file):
    import nodes

    model, clip, _ = base
    name, params = cat_file
    m, c, _, _ = load_edlora(comfy, model, clip, name)
    positive = nodes.CLIPTextEncode().encode(c, "a photo of <cat1> <cat2> on a sofa")[0]
    negative = nodes.CLIPTextEncode().encode(c, "blurry, lowres")[0]
    neg_ref = negative[0][0]
    cap = sample_capturing(m, positive, negative)

    emb = params["new_concept_embedding"]
    seen_layers = set()
    per_layer_cond = {}
    for index, cond_or_uncond, context in cap.calls:
        rows = context.shape[0] // len(cond_or_uncond)
        for j, kind in enumerate(cond_or_uncond):
            chunk = context[j * rows : (j + 1) * rows]
            if kind == 1:  # uncond rows: the negative prompt, untouched
                assert torch.equal(chunk[0], neg_ref[0].to(chunk.dtype))
            else:
                per_layer_cond[index] = chunk[0]
                seen_layers.add(index)
    assert seen_layers == set(range(16))
    # what attention's key projection actually received equals what the patches handed over
    assert len(cap.to_k_inputs) == len(cap.calls)
    assert all(torch.equal(a, b) for a, b in zip(cap.to_k_inputs, (ctx for _, _, ctx in cap.calls), strict=True))

    template = "a photo of {a} {b} on a sofa"
    slots = {"a": emb["<cat1>"], "b": emb["<cat2>"]}
    refs = [reference_layer_encoding(c, template, slots, i)[0] for i in range(16)]
    for i in range(16):
        assert torch.allclose(per_layer_cond[i], refs[i], atol=1e-4), f"layer {i}"
    # the concept positions (4, 5) really differ between layers; positions before them do not
    assert not torch.allclose(per_layer_cond[0][4:6], per_layer_cond[9][4:6], atol=1e-3)
    assert torch.allclose(per_layer_cond[0][:4], per_layer_cond[9][:4], atol=1e-6)


def test_two_concepts_each_reach_their_own_positions(comfy, base, cat_file, dog_file):
    import nodes

    model, clip, _ = base
    m, c, _, _ = load_edlora(comfy, model, clip, cat_file[0])
    m, c, _, dog_words = load_edlora(comfy, m, c, dog_file[0])
    assert dog_words == "<dog1> <dog2>"
    positive = nodes.CLIPTextEncode().encode(c, "a <cat1> <cat2> and a <dog1> <dog2>")[0]
    negative = nodes.CLIPTextEncode().encode(c, "")[0]
    cap = sample_capturing(m, positive, negative)
    cat, dog = cat_file[1]["new_concept_embedding"], dog_file[1]["new_concept_embedding"]
    slots = {"a": cat["<cat1>"], "b": cat["<cat2>"], "c": dog["<dog1>"], "d": dog["<dog2>"]}
    for index, cond_or_uncond, context in cap.calls:
        rows = context.shape[0] // len(cond_or_uncond)
        j = cond_or_uncond.index(0)
        got = context[j * rows]
        want = reference_layer_encoding(c, "a {a} {b} and a {c} {d}", slots, index)[0]
        assert torch.allclose(got, want, atol=1e-4), f"layer {index}"
    # both UNet LoRAs are applied: 128 modules each, on the same keys
    assert sum(len(v) for v in m.patches.values()) == 256


def test_same_words_in_two_files_are_renamed_not_mixed(comfy, base, cat_file, twin_file):
    import nodes

    model, clip, _ = base
    m, c, _, w1 = load_edlora(comfy, model, clip, cat_file[0])
    m, c, twin, w2 = load_edlora(comfy, m, c, twin_file[0])
    assert w1 == "<cat1> <cat2>" and w2 == "<cat1_2> <cat2_2>" and twin.renamed_from == ("<cat1>", "<cat2>")
    positive = nodes.CLIPTextEncode().encode(c, "<cat1> <cat2> with <cat1_2> <cat2_2>")[0]
    negative = nodes.CLIPTextEncode().encode(c, "")[0]
    cap = sample_capturing(m, positive, negative)
    a, b = cat_file[1]["new_concept_embedding"], twin_file[1]["new_concept_embedding"]
    slots = {"a": a["<cat1>"], "b": a["<cat2>"], "c": b["<cat1>"], "d": b["<cat2>"]}
    index, cond_or_uncond, context = cap.calls[7]
    rows = context.shape[0] // len(cond_or_uncond)
    got = context[cond_or_uncond.index(0) * rows]
    assert torch.allclose(got, reference_layer_encoding(c, "{a} {b} with {c} {d}", slots, index)[0], atol=1e-4)


def test_concept_words_input_renames(comfy, base, cat_file):
    model, clip, _ = base
    _, c, concept, words = load_edlora(comfy, model, clip, cat_file[0], concept_words="<tom1> <tom2>", class_word="cat")
    assert words == "<tom1> <tom2>" and concept.class_word == "cat"
    tokens = c.tokenize("a <tom1> <tom2>")
    assert sum(isinstance(t, dict) for t, *_ in tokens["l"][0]) == 2


# ------------------------------------------------------------------------------------ whole graphs


def test_plain_graph_is_bit_identical_before_and_after_pack_graphs(comfy, tiny_checkpoint, cat_file, dog_file):
    plain = plain_txt2img(tiny_checkpoint, prefix="leak")
    first = comfy.run(plain)
    assert first.success, first.error
    image_before = comfy.output_value(first, "6")
    ed = comfy.run(edlora_txt2img(tiny_checkpoint, [cat_file[0], dog_file[0]], "a <cat1> <cat2> and <dog1> <dog2>"))
    assert ed.success, ed.error
    image_ed = comfy.output_value(ed, "6")
    second = comfy.run(plain)
    assert second.success, second.error
    image_after = comfy.output_value(second, "6")
    assert torch.equal(image_before, image_after)
    assert torch.isfinite(image_ed).all() and not torch.equal(image_ed, image_before)


def test_stock_lora_loader_works_in_the_same_graph(comfy, tiny_checkpoint, cat_file, loras_dir):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    kohya = {}
    for mod in ("down_blocks.0.attentions.0.proj_in", "up_blocks.3.attentions.2.proj_out"):
        k = "lora_unet_" + mod.replace(".", "_")
        kohya[f"{k}.lora_down.weight"] = torch.randn(4, 320, 1, 1, generator=gen) * 0.05
        kohya[f"{k}.lora_up.weight"] = torch.randn(320, 4, 1, 1, generator=gen) * 0.05
        kohya[f"{k}.alpha"] = torch.tensor(4.0)
    save_file(kohya, str(loras_dir / "it_kohya.safetensors"))
    prompt = edlora_txt2img(tiny_checkpoint, [cat_file[0]], "a photo of <cat1> <cat2>")
    prompt["20"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["10", 0],
            "clip": ["10", 1],
            "lora_name": "it_kohya.safetensors",
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    prompt["2"]["inputs"]["clip"] = ["20", 1]
    prompt["3"]["inputs"]["clip"] = ["20", 1]
    prompt["5"]["inputs"]["model"] = ["20", 0]
    result = comfy.run(prompt)
    assert result.success, result.error
    assert torch.isfinite(comfy.output_value(result, "6")).all()


def test_routing_works_with_a_custom_guider(comfy, base, cat_file):
    """SamplerCustomAdvanced's path: a CFGGuider sampled directly, not through KSampler."""
    import importlib

    import nodes

    samplers = importlib.import_module("comfy.samplers")
    model, clip, _ = base
    name, params = cat_file
    m, c, _, _ = load_edlora(comfy, model, clip, name)
    positive = nodes.CLIPTextEncode().encode(c, "a photo of <cat1> <cat2> on a sofa")[0]
    negative = nodes.CLIPTextEncode().encode(c, "blurry, lowres")[0]
    cap = AttentionCapture()
    m2 = m.clone()
    m2.set_model_attn2_patch(cap.patch)
    guider = samplers.CFGGuider(m2)
    guider.set_conds(positive, negative)
    guider.set_cfg(4.0)
    sigmas = samplers.calculate_sigmas(m2.get_model_object("model_sampling"), "normal", 2)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guider.sample(noise, torch.zeros(1, 4, 8, 8), samplers.sampler_object("euler"), sigmas, seed=0)
    emb = params["new_concept_embedding"]
    slots = {"a": emb["<cat1>"], "b": emb["<cat2>"]}
    checked = set()
    for index, cond_or_uncond, context in cap.calls:
        rows = context.shape[0] // len(cond_or_uncond)
        got = context[cond_or_uncond.index(0) * rows]
        if index in (0, 6, 15) and index not in checked:
            want = reference_layer_encoding(c, "a photo of {a} {b} on a sofa", slots, index)[0]
            assert torch.allclose(got, want, atol=1e-4), f"layer {index}"
            checked.add(index)
    assert checked == {0, 6, 15}
