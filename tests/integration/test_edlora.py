"""ED-LoRA in a real ComfyUI: exact weight deltas, layer-wise context inside sampling, no state leaks."""

from __future__ import annotations

import pytest
import torch

from tests.support.builders.edlora import official_edlora, sd15_te_modules, sd15_unet_modules
from tests.support.graphs import edlora_txt2img, plain_txt2img
from tests.support.tensors import changed_keys, same_bits

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
def base(comfy, tiny_models):

    model, clip, vae = tiny_models[:3]
    # ComfyUI's SD1.5 loader leaves this one (unused) tensor uninitialised, sometimes NaN; make it NaN
    # always, so that every "unchanged" comparison here has to be NaN-proof (bitwise), never flaky
    with torch.no_grad():
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.fill_(float("nan"))
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
            assert same_bits(after_unet[k], before_unet[k]), f"{k} changed but is not an ED-LoRA module"

    te_expected = {
        f"clip_l.transformer.{mod}.weight": expected_delta(params["text_encoder"], mod, ALPHA_TEXT)
        for mod in sd15_te_modules()
    }
    for k in before_te:
        if k in te_expected:
            assert_delta(after_te[k], before_te[k], te_expected[k], k)
        else:
            assert same_bits(after_te[k], before_te[k]), f"{k} changed but is not an ED-LoRA module"
    assert words == "<cat1> <cat2>" and concept.words == ("<cat1>", "<cat2>") and concept.file == name
    # the inputs are untouched: the loader worked on clones
    assert not model.patches and not clip.patcher.patches


def test_strength_zero_changes_no_weight(comfy, base, cat_file):
    model, clip, _ = base
    m, c, _, _ = load_edlora(comfy, model, clip, cat_file[0], su=0.0, st=0.0)
    assert not m.patches and not c.patcher.patches
    assert changed_keys(patched_state(model), patched_state(m)) == []
    assert changed_keys(patched_state(clip.patcher), patched_state(c.patcher)) == []


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
    """Records what each cross-attention layer receives, per batch chunk (cond/uncond).

    ``calls``: what the attn2 patches hand over (this patch runs after the pack's), one entry per call:
    ``(transformer_index, cond_or_uncond, context)``. ``inputs["to_k"]`` / ``inputs["to_v"]``: what the key
    and value projections of cross-attention actually receive, as ``(layer, input)`` in call order, with
    ``layer`` the attn2 module's position in the UNet (input, middle, output blocks: Mix-of-Show's order).
    """

    def __init__(self):
        self.calls = []
        self.inputs = {"to_k": [], "to_v": []}
        self.handles = []

    def patch(self, n, context, value, extra_options):
        self.calls.append(
            (extra_options["transformer_index"], list(extra_options["cond_or_uncond"]), context.detach().clone())
        )
        return n, context, value

    def hook_projections(self, diffusion_model):
        layers = [m for name, m in diffusion_model.named_modules() if name.endswith("attn2")]
        assert len(layers) == 16
        for layer, module in enumerate(layers):
            for proj in ("to_k", "to_v"):

                def record(mod, args, proj=proj, layer=layer):
                    self.inputs[proj].append((layer, args[0].detach().clone()))

                self.handles.append(getattr(module, proj).register_forward_pre_hook(record))

    def remove(self):
        for h in self.handles:
            h.remove()


def sample_capturing(model, positive, negative, steps=1, cfg=5.0, seed=3):
    import nodes

    cap = AttentionCapture()
    m = model.clone()
    m.set_model_attn2_patch(cap.patch)  # after the pack's patch: sees what attention will use
    cap.hook_projections(m.model.diffusion_model)
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


def cond_rows(tensor, cond_or_uncond, kind):
    """The rows of ``tensor`` (a batched cross-attention input) that belong to conds of ``kind`` (0/1)."""
    rows = tensor.shape[0] // len(cond_or_uncond)
    return [tensor[j * rows : (j + 1) * rows] for j, k in enumerate(cond_or_uncond) if k == kind]


def test_key_and_value_of_each_cross_attention_layer_read_its_own_encoding_in_cond_rows_only(comfy, base, cat_file):
    """Mix-of-Show feeds the layer-i encoding to both the key and the value projection of layer i."""
    import nodes

    model, clip, _ = base
    name, params = cat_file
    m, c, _, _ = load_edlora(comfy, model, clip, name)
    positive = nodes.CLIPTextEncode().encode(c, "a photo of <cat1> <cat2> on a sofa")[0]
    negative = nodes.CLIPTextEncode().encode(c, "blurry, lowres")[0]
    neg_ref = negative[0][0][0]
    cap = sample_capturing(m, positive, negative)

    emb = params["new_concept_embedding"]
    template = "a photo of {a} {b} on a sofa"
    slots = {"a": emb["<cat1>"], "b": emb["<cat2>"]}
    refs = [reference_layer_encoding(c, template, slots, i)[0] for i in range(16)]
    # the test can tell routed from un-routed: every layer's encoding differs from the ordinary
    # conditioning (layer-averaged concept embedding) at the concept positions (4, 5), and only there
    plain = positive[0][0][0]
    for i in range(16):
        assert (refs[i][4:6] - plain[4:6]).abs().max() > 1e-2, f"layer {i}"
        assert torch.allclose(refs[i][:4], plain[:4], atol=1e-5), f"layer {i}"
    assert not torch.allclose(refs[0][4:6], refs[9][4:6], atol=1e-3)

    assert sorted({index for index, _, _ in cap.calls}) == list(range(16))
    for proj in ("to_k", "to_v"):
        seen = cap.inputs[proj]
        # one projection call per attention call, in the same order; the layer numbering agrees
        assert [layer for layer, _ in seen] == [index for index, _, _ in cap.calls], proj
        for (layer, x), (_, cond_or_uncond, _) in zip(seen, cap.calls, strict=True):
            assert x.shape[0] == len(cond_or_uncond), proj  # one latent per cond
            (cond,) = cond_rows(x, cond_or_uncond, 0)
            (uncond,) = cond_rows(x, cond_or_uncond, 1)
            assert torch.allclose(cond[0], refs[layer].to(x.dtype), atol=1e-4), f"{proj} of layer {layer}"
            assert same_bits(uncond[0], neg_ref.to(x.dtype)), f"{proj} of layer {layer}: negative rows changed"
    # the capture patch runs after the pack's: what it is handed is exactly what the key projection gets
    assert all(same_bits(x, ctx) for (_, x), (_, _, ctx) in zip(cap.inputs["to_k"], cap.calls, strict=True))


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


def assert_varied(image, what="image"):
    """A real picture, not a flat or broken one: two flat images would compare equal for any reason."""
    assert torch.isfinite(image).all(), f"{what} has non-finite pixels"
    assert image.std() > 0.05, f"{what} is (nearly) flat: std {float(image.std()):.4f}"


def test_no_state_leak_between_prompts_of_one_persistent_executor(comfy, tiny_checkpoint, cat_file, dog_file):
    """Like a server: plain -> ED-LoRA -> plain through ONE executor, the loaded checkpoint reused throughout.

    Whatever the ED-LoRA graph wrote into the shared MODEL/CLIP would reach the last plain image and the
    checkpoint loader's cached weights.
    """
    session = comfy.persistent()
    first = session.run(plain_txt2img(tiny_checkpoint, prefix="leak_before"))
    assert first.success, first.error
    image_before = first.value("6")
    assert_varied(image_before)
    model, clip = first.value("1", 0), first.value("1", 1)
    unet_before, clip_before = patched_state(model), patched_state(clip.patcher)

    ed = session.run(edlora_txt2img(tiny_checkpoint, [cat_file[0], dog_file[0]], "a <cat1> <cat2> and <dog1> <dog2>"))
    assert ed.success, ed.error
    assert "1" in ed.cached and ed.value("1", 0) is model and ed.value("1", 1) is clip  # the same loaded objects
    image_ed = ed.value("6")
    assert_varied(image_ed, "the ED-LoRA image")
    assert (image_ed - image_before).abs().mean() > 0.01

    second = session.run(plain_txt2img(tiny_checkpoint, prefix="leak_after"))
    assert second.success, second.error
    # the checkpoint came from the cache, everything downstream of it ran again
    assert "1" in second.cached and second.value("1", 0) is model and second.value("1", 1) is clip
    assert not {"2", "3", "5", "6", "7"} & set(second.cached), second.cached
    assert changed_keys(unet_before, patched_state(model)) == [], "the base MODEL's weights changed"
    assert changed_keys(clip_before, patched_state(clip.patcher)) == [], "the base CLIP's weights changed"
    assert same_bits(second.value("6"), image_before), "the plain image changed after the ED-LoRA prompt"
    assert not model.patches and not clip.patcher.patches


GRAPH_STRENGTH_UNET, GRAPH_STRENGTH_TEXT = 0.7, 0.7  # edlora_txt2img's strengths
KOHYA_MODULES = ("down_blocks.0.attentions.0.proj_in", "up_blocks.3.attentions.2.proj_out")


@pytest.fixture(scope="module")
def kohya_file(loras_dir):
    """An ordinary (kohya-named) UNet LoRA on two modules the ED-LoRA does not touch; alpha = rank."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    kohya = {}
    for mod in KOHYA_MODULES:
        k = "lora_unet_" + mod.replace(".", "_")
        kohya[f"{k}.lora_down.weight"] = torch.randn(4, 320, 1, 1, generator=gen) * 0.05
        kohya[f"{k}.lora_up.weight"] = torch.randn(320, 4, 1, 1, generator=gen) * 0.05
        kohya[f"{k}.alpha"] = torch.tensor(4.0)
    save_file(kohya, str(loras_dir / "it_kohya.safetensors"))
    return "it_kohya.safetensors", kohya


def with_stock_lora(prompt: dict, lora: str, source: str) -> dict:
    """Put a stock LoraLoader (node 20) after ``source`` (a node with MODEL, CLIP outputs) in the graph."""
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    prompt["20"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": [source, 0],
            "clip": [source, 1],
            "lora_name": lora,
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    prompt["2"]["inputs"]["clip"] = ["20", 1]
    prompt["3"]["inputs"]["clip"] = ["20", 1]
    prompt["5"]["inputs"]["model"] = ["20", 0]
    return prompt


def test_stock_lora_loader_and_edlora_both_take_effect_in_one_graph(comfy, tiny_checkpoint, cat_file, kohya_file):
    import importlib

    patcher_extension = importlib.import_module("comfy.patcher_extension")  # (`comfy` is the fixture here)
    edlora_mod = comfy.pack_module("samplers.edlora.model")
    clip_mod = comfy.pack_module("samplers.edlora.clip")

    name, params = cat_file
    lora, kohya = kohya_file
    concept_prompt = "a photo of <cat1> <cat2> on a sofa"
    graph = with_stock_lora(edlora_txt2img(tiny_checkpoint, [name], concept_prompt, prefix="both"), lora, "10")
    session = comfy.persistent()  # the three graphs below share one checkpoint load
    result = session.run(graph)
    assert result.success, result.error
    base_model, base_clip = result.value("1", 0), result.value("1", 1)
    model, clip = result.value("20", 0), result.value("20", 1)

    # 1. weights: the ED-LoRA's deltas at its 128 UNet + 48 text-encoder modules, the stock LoRA's at its
    #    two modules, exactly; nothing else changed
    key_of = unet_key_of(base_model)
    expected = {
        key_of[mod] + ".weight": expected_delta(params["unet"], mod, GRAPH_STRENGTH_UNET) for mod in sd15_unet_modules()
    }
    for mod in KOHYA_MODULES:
        k = "lora_unet_" + mod.replace(".", "_")
        up, down = kohya[f"{k}.lora_up.weight"].float(), kohya[f"{k}.lora_down.weight"].float()
        scale = float(kohya[f"{k}.alpha"]) / down.shape[0]  # alpha / rank, times strength 1.0
        assert key_of[mod] + ".weight" not in expected
        expected[key_of[mod] + ".weight"] = (scale * (up.flatten(1) @ down.flatten(1))).reshape(320, 320, 1, 1)
    assert len(expected) == 130
    before, after = patched_state(base_model), patched_state(model)
    for k in before:
        if k in expected:
            assert_delta(after[k], before[k], expected[k], k)
        else:
            assert same_bits(after[k], before[k]), f"{k} changed but no LoRA has it"
    te_expected = {
        f"clip_l.transformer.{mod}.weight": expected_delta(params["text_encoder"], mod, GRAPH_STRENGTH_TEXT)
        for mod in sd15_te_modules()
    }
    before, after = patched_state(base_clip.patcher), patched_state(clip.patcher)
    for k in before:
        if k in te_expected:
            assert_delta(after[k], before[k], te_expected[k], k)
        else:
            assert same_bits(after[k], before[k]), f"{k} changed but no LoRA has it"
    del before, after

    # 2. routing: the model the sampler got carries the pack's patch and wrapper (LoraLoader's clone kept
    #    them), the encoded prompt carries the per-layer encodings, and sampling with that model and those
    #    conds gives each cross-attention layer its own encoding (key and value)
    assert edlora_mod.has_layerwise_routing(model)
    assert model.get_wrappers(patcher_extension.WrappersMP.OUTER_SAMPLE, edlora_mod.ROUTING_KEY)
    positive, negative = result.value("2", 0), result.value("3", 0)
    layerwise = positive[0][1][clip_mod.LAYERWISE_KEY]
    assert tuple(layerwise.layers.shape) == (1, 16, 77, 768)
    cap = sample_capturing(model, positive, negative)
    emb = params["new_concept_embedding"]
    slots = {"a": emb["<cat1>"], "b": emb["<cat2>"]}
    refs = {i: reference_layer_encoding(clip, "a photo of {a} {b} on a sofa", slots, i)[0] for i in (0, 7, 15)}
    checked = set()
    for call, (index, cond_or_uncond, _) in enumerate(cap.calls):
        if index in refs:
            for proj in ("to_k", "to_v"):
                (cond,) = cond_rows(cap.inputs[proj][call][1], cond_or_uncond, 0)
                assert torch.allclose(cond[0], refs[index], atol=1e-4), f"{proj} of layer {index}"
            checked.add(index)
    assert checked == set(refs)

    # 3. images: the ED-LoRA changes the picture (same graph without it, same words), and the concept words
    #    give another picture than the class word
    image = result.value("6")
    assert_varied(image)
    without = session.run(with_stock_lora(plain_txt2img(tiny_checkpoint, concept_prompt, prefix="stock"), lora, "1"))
    class_word = session.run(
        with_stock_lora(edlora_txt2img(tiny_checkpoint, [name], "a photo of cat on a sofa", prefix="cls"), lora, "10")
    )
    for other, what in ((without, "without the ED-LoRA loader"), (class_word, "with the class word")):
        assert other.success, other.error
        assert_varied(other.value("6"), what)
        assert (image - other.value("6")).abs().mean() > 0.01, f"the image is the same {what}"


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
    cap.hook_projections(m2.model.diffusion_model)
    try:
        guider.sample(noise, torch.zeros(1, 4, 8, 8), samplers.sampler_object("euler"), sigmas, seed=0)
    finally:
        cap.remove()
    emb = params["new_concept_embedding"]
    slots = {"a": emb["<cat1>"], "b": emb["<cat2>"]}
    checked = set()
    for call, (index, cond_or_uncond, context) in enumerate(cap.calls):
        if index in (0, 6, 15) and index not in checked:
            want = reference_layer_encoding(c, "a photo of {a} {b} on a sofa", slots, index)[0]
            for got in (context, cap.inputs["to_k"][call][1], cap.inputs["to_v"][call][1]):
                (cond,) = cond_rows(got, cond_or_uncond, 0)
                assert torch.allclose(cond[0], want, atol=1e-4), f"layer {index}"
            checked.add(index)
    assert checked == {0, 6, 15}
