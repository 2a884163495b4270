"""Response-weighted concept mix on the real test checkpoint: scores equal the formula recomputed here from
the files' tensors and stock ComfyUI encodings, the concept the prompt names gets the weight, the merged
weights are base + w * strength * delta, the inputs stay untouched, SDXL's l-then-g concatenation, and bad
input refused by name."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.edlora import clip_te_modules, official_edlora, sdxl_unet_modules
from tests.support.builders.lora import SD15_ATTENTION, make_lora
from tests.support.builders.sd15 import SHALLOW_TEXT_LAYERS
from tests.support.tensors import same_bits

SHALLOW_TE = clip_te_modules(SHALLOW_TEXT_LAYERS, 768)  # text LoRA on the 3-layer CLIP of tiny_models_shallow_clip

NODE = "Response-Weighted Concept Mix"
A_WORDS, B_WORDS = ("<rwa1>", "<rwa2>"), ("<rwb1>", "<rwb2>")
PROMPT_A = "a photo of <rwa1> <rwa2> sitting on a sofa"
PROMPT_B = "a photo of <rwb1> <rwb2> sitting on a sofa"
S_UNET, S_TEXT = 0.7, 0.6
LORA_TRIGGER = "zxq style"
# A layer every concept of the test stack has a LoRA on: ED-LoRA module name / ComfyUI key
EDLORA_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
UNET_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
TE_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"
TE_KEY = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
# The test checkpoint's text encoder is random: twelve random layers bury an input embedding of CLIP's usual
# size (|e| ~ 0.5) under the residual stream, so the outputs at a concept's tokens hardly point along it
# (measured: R ~ 0.01-0.07 for the named and the unnamed concept alike). Trained CLIPs keep a token's
# identity in its output; here the concepts' embeddings are made loud instead (std 10, far below the file
# checks' limit), so that they survive the random layers: then R ~ 0.3 for the named concept, < 0.1 else.
LOUD = 500.0


def core(name):
    """A ComfyUI module without binding the name ``comfy`` over the session fixture."""
    return importlib.import_module(f"comfy.{name}")


@pytest.fixture(scope="module")
def base(comfy, tiny_models_shallow_clip):
    model, clip = tiny_models_shallow_clip[:2]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    a = official_edlora(words=A_WORDS, seed=61, lora_scale=0.05, te_modules=SHALLOW_TE)
    b = official_edlora(words=B_WORDS, seed=62, lora_scale=0.05, te_modules=SHALLOW_TE)
    for data in (a, b):
        data["params"]["new_concept_embedding"] = {
            w: t * LOUD for w, t in data["params"]["new_concept_embedding"].items()
        }
    torch.save(a, d / "rw_a.pth")
    torch.save(b, d / "rw_b.pth")
    lora = make_lora(model, SD15_ATTENTION, seed=63)
    save_file(lora, str(d / "rw_lora.safetensors"))
    return {"model": model, "clip": clip, "a": a["params"], "b": b["params"], "lora": lora}


def pack(comfy, dotted):
    """A module of the pack in the copy ComfyUI loaded, which its registered nodes use. (``comfy.pack_module``
    can name another copy: when the checkout's folder is an importable name, pytest imports the pack as a
    package of its own first, and then classes such as ConceptTokenizer differ between the two copies.)"""
    package = comfy.node_class("MultiConceptStackEDLoRA").__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{package}.{dotted}")


@pytest.fixture(scope="module")
def rm(comfy):
    return pack(comfy, "samplers.fusion.response_mix")


@pytest.fixture(scope="module")
def node(comfy):
    return pack(comfy, "nodes.response_mix").ResponseWeightedMix


def edlora_stack(comfy, names=("rw_a.pth", "rw_b.pth"), concepts=None):
    stack_node = comfy.node_class("MultiConceptStackEDLoRA")
    for name in names:
        concepts = stack_node.execute(name, S_UNET, S_TEXT, "", concepts=concepts).result[0]
    return concepts


def lora_stack(comfy, concepts=None, trigger=LORA_TRIGGER, strength_unet=0.9):
    lora_node = comfy.node_class("MultiConceptStackLoRA")
    return lora_node.execute("rw_lora.safetensors", strength_unet, 0.5, "", concepts=concepts,
                             trigger_words=trigger).result[0]  # fmt: skip


# ------------------------------------------------------------------- the formula, recomputed independently


def edlora_mean(params, group="new_concept_embedding"):
    """e_avg from the file's tensors: the mean over all words and all layer rows."""
    return torch.cat([t.float() for t in params[group].values()]).mean(dim=0)


def reference_prompt_rows(clip, prompt, slots: dict, keys=("l",)):
    """The prompt's real-token rows for every layer and the layer-averaged (reference) encoding.

    Stock ComfyUI only: each concept word becomes the placeholder token, which is then replaced by the word's
    layer-``i`` embedding (or the layer-averaged one for the reference) as a tensor token, and all variants are
    encoded in one stock call. The real rows are position 1 up to the first end token (inclusive).
    """
    base_tok = clip.tokenizer.base if hasattr(clip.tokenizer, "base") else clip.tokenizer
    text = prompt
    order = []
    for word in sorted(slots, key=len, reverse=True):
        while word in text:
            order.append((text.index(word), word))
            text = text.replace(word, "ohwx", 1)
    words = [w for _, w in sorted(order)]
    tokens = base_tok.tokenize_with_weights(text)
    placeholder = base_tok.tokenize_with_weights("ohwx")["l"][0][1][0]
    end_token = base_tok.tokenize_with_weights("")["l"][0][1][0]
    layers = next(iter(next(iter(slots.values())).values())).shape[0]
    out = {}
    for key in keys:
        out[key] = []
        for variant in list(range(layers)) + ["mean"]:
            it = iter(words)
            section = []
            for t, w in tokens[key][0]:
                if t == placeholder:
                    emb = slots[next(it)][key]
                    t = emb.mean(dim=0) if variant == "mean" else emb[variant]
                section.append((t, w))
            out[key].append(section)
    cond = clip.encode_from_tokens(out)
    per = len(tokens["l"][0])
    cond = cond.reshape(layers + 1, per, cond.shape[-1]).float()
    ids = [t for t, _ in tokens["l"][0]]
    end = ids.index(end_token, 1)
    return cond[:, 1 : end + 1].reshape(-1, cond.shape[-1])


def cosine_max(mean, rows):
    return float(torch.nn.functional.cosine_similarity(mean[None], rows, dim=1).max())


def slots_of(*params_list, keys=(("l", "new_concept_embedding"),)):
    slots = {}
    for params in params_list:
        for word in params["new_concept_embedding"]:
            slots[word] = {key: params[group][word].float() for key, group in keys}
    return slots


def test_scores_and_weights_equal_the_formula_recomputed_from_the_tensors(comfy, base, rm):
    stack = edlora_stack(comfy)
    mix = rm.response_mix(base["model"], base["clip"], stack, PROMPT_A)
    rows = reference_prompt_rows(base["clip"], PROMPT_A, slots_of(base["a"], base["b"]))
    expected = torch.tensor([cosine_max(edlora_mean(base["a"]), rows), cosine_max(edlora_mean(base["b"]), rows)])
    assert torch.allclose(mix.scores.float(), expected, atol=2e-5, rtol=0), (mix.scores, expected)
    # sum to one: max(R, 0) / sum; softmax: exp(R / T) / sum
    positive = expected.clamp(min=0)
    assert torch.allclose(mix.weights.float(), positive / positive.sum(), atol=1e-4)
    soft = rm.response_mix(base["model"], base["clip"], stack, PROMPT_A, "softmax", 0.2)
    assert torch.allclose(soft.weights.float(), torch.softmax(expected / 0.2, dim=0), atol=1e-4)
    # the mean embeddings themselves, and the same rows through the glue's own token selection
    means = rm.concept_means(base["clip"], stack)
    assert torch.allclose(means, torch.stack([edlora_mean(base["a"]), edlora_mean(base["b"])]), atol=1e-7)
    ours = rm.encode_prompt_tokens(base["clip"], stack, PROMPT_A)
    assert ours.shape == rows.shape and torch.allclose(ours, rows, atol=1e-4)


def test_the_concept_the_prompt_names_gets_the_higher_weight(comfy, base, rm):
    stack = edlora_stack(comfy)
    means = rm.concept_means(base["clip"], stack)
    to_a = rm.response_scores(means, rm.encode_prompt_tokens(base["clip"], stack, PROMPT_A))
    to_b = rm.response_scores(means, rm.encode_prompt_tokens(base["clip"], stack, PROMPT_B))
    for mode in ("sum to one", "softmax"):
        wa, wb = rm.response_weights(to_a, mode, 0.05), rm.response_weights(to_b, mode, 0.05)
        assert float(wa[1]) < float(wa[0]), (mode, to_a, wa)
        assert float(wb[0]) < float(wb[1]), (mode, to_b, wb)
    # the whole node agrees (sum to one)
    assert torch.equal(rm.response_mix(base["model"], base["clip"], stack, PROMPT_A).weights,
                       rm.response_weights(to_a, "sum to one", 0.05))  # fmt: skip


def test_a_lora_concept_is_measured_by_its_trigger_words_token_embeddings(comfy, base, rm):
    stack = lora_stack(comfy, edlora_stack(comfy))
    table = base["clip"].cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight
    hf = base["clip"].tokenizer.clip_l.tokenizer
    ids = [i for word in LORA_TRIGGER.split() for i in hf(word)["input_ids"][1:-1]]
    assert len(ids) >= 2
    means = rm.concept_means(base["clip"], stack)
    assert torch.allclose(means[2], table[ids].float().mean(dim=0), atol=1e-7)
    rows = reference_prompt_rows(base["clip"], f"{PROMPT_A}, {LORA_TRIGGER}", slots_of(base["a"], base["b"]))
    mix = rm.response_mix(base["model"], base["clip"], stack, f"{PROMPT_A}, {LORA_TRIGGER}")
    assert abs(float(mix.scores[2]) - cosine_max(means[2], rows)) < 2e-5


# ------------------------------------------------------------------------------------------ application


def patched_state(patcher):
    """The weights as ComfyUI computes them for sampling (patches merged), copied to CPU."""
    core("model_management").load_models_gpu([patcher], force_patch_weights=True)
    return {k: v.detach().clone().cpu() for k, v in patcher.model.state_dict().items()}


def test_the_output_model_merges_each_lora_at_weight_times_strength(comfy, base, node):
    model, clip = base["model"], base["clip"]
    stack = lora_stack(comfy, edlora_stack(comfy))
    before = {k: v.detach().clone().cpu() for k, v in model.model.state_dict().items()}
    out = node.execute(model, clip, stack, f"{PROMPT_A}, {LORA_TRIGGER}", "softmax", 0.1).result
    new_model, new_clip, conditioning, table = out
    mix_weights = [float(line.split()[-1]) for line in table.splitlines()[3:]]
    assert len(mix_weights) == 3 and abs(sum(mix_weights) - 1) < 1e-3
    assert len(set(round(w, 3) for w in mix_weights)) == 3, "pick a setting where the weights differ"
    # exact weights (the table rounds): recompute them with the glue
    rm = pack(comfy, "samplers.fusion.response_mix")
    w = rm.response_mix(model, clip, stack, f"{PROMPT_A}, {LORA_TRIGGER}", "softmax", 0.1).weights.tolist()
    assert [round(x, 4) for x in w] == mix_weights

    def ed_delta(params, group, module):
        return params[group][f"{module}.lora_up.weight"].float() @ params[group][f"{module}.lora_down.weight"].float()

    prefix = "lora_unet_" + EDLORA_MODULE.replace(".", "_")  # kohya's name of the same layer
    assert f"{prefix}.lora_down.weight" in base["lora"]
    lora_delta = (2.0 / 4) * (base["lora"][f"{prefix}.lora_up.weight"] @ base["lora"][f"{prefix}.lora_down.weight"])
    expected = (
        w[0] * S_UNET * ed_delta(base["a"], "unet", EDLORA_MODULE)
        + w[1] * S_UNET * ed_delta(base["b"], "unet", EDLORA_MODULE)
        + w[2] * 0.9 * lora_delta.float()
    )
    after = patched_state(new_model)
    delta = after[UNET_KEY].float() - before[UNET_KEY].float()
    tol = torch.finfo(after[UNET_KEY].dtype).eps * float(after[UNET_KEY].abs().max()) * 4 + 1e-7
    assert float(expected.abs().max()) > 1e-3
    assert torch.allclose(delta, expected, atol=tol, rtol=0), (delta - expected).abs().max()
    # text encoder: one patch per ED-LoRA at strength_text * w (the LoRA has no text-encoder part)
    strengths = sorted(p[0] for p in new_clip.patcher.patches[TE_KEY])
    assert strengths == pytest.approx(sorted([S_TEXT * w[0], S_TEXT * w[1]]), abs=1e-9)
    # the words are known to the output CLIP, and the conditioning is the prompt encoded with it
    assert {"<rwa1>", "<rwb2>"} <= set(new_clip.tokenizer.vocabulary.words())
    again = new_clip.encode_from_tokens_scheduled(new_clip.tokenize(f"{PROMPT_A}, {LORA_TRIGGER}"))
    assert torch.allclose(conditioning[0][0], again[0][0], atol=1e-6)
    assert "multiconcept_layerwise" in conditioning[0][1]
    patches = new_model.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert any(type(p).__name__ == "LayerwiseContextPatch" for p in patches)


def test_inputs_are_untouched(comfy, base, node):
    model, clip = base["model"], base["clip"]
    stack = edlora_stack(comfy)
    reference = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))[0][0].clone()
    model_patches = {k: list(v) for k, v in model.patches.items()}
    clip_patches = {k: list(v) for k, v in clip.patcher.patches.items()}
    options = repr(model.model_options)
    tokenizer, encoder = clip.tokenizer, clip.cond_stage_model
    concepts = stack.concepts
    embeddings = {w: t.clone() for c in stack for w, d in c.adapter.embeddings.items() for t in d.values()}
    new_model, new_clip, _, _ = node.execute(model, clip, stack, PROMPT_A).result
    assert new_model is not model and new_clip is not clip
    assert {k: list(v) for k, v in model.patches.items()} == model_patches
    assert {k: list(v) for k, v in clip.patcher.patches.items()} == clip_patches
    assert repr(model.model_options) == options
    assert clip.tokenizer is tokenizer and clip.cond_stage_model is encoder
    assert stack.concepts is concepts
    for c in stack:
        for w, d in c.adapter.embeddings.items():
            assert all(same_bits(t, embeddings[w]) for t in d.values())
    assert len(new_model.patches) > 0 and len(new_clip.patcher.patches) > 0
    after = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))[0][0]
    assert same_bits(after, reference)


def test_the_table_lists_each_concept_with_its_words_score_and_weight(comfy, base, node, rm):
    stack = edlora_stack(comfy)
    table = node.execute(base["model"], base["clip"], stack, PROMPT_B).result[3]
    mix = rm.response_mix(base["model"], base["clip"], stack, PROMPT_B)
    lines = table.splitlines()
    assert "sum to one" in lines[0] and lines[1].split() == ["#", "concept", "words", "R", "weight"]
    for line, c, r, w in zip(lines[3:], stack, mix.scores.tolist(), mix.weights.tolist(), strict=True):
        cells = line.split()
        assert cells[1] == c.source and " ".join(cells[2:4]) == c.prompt_words
        assert cells[4] == f"{r:+.4f}" and cells[5] == f"{w:.4f}"


# ----------------------------------------------------------------------------------------------- SDXL


def test_sdxl_concept_embeddings_are_l_then_g_like_the_conditioning(comfy, rm):
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    def tiny(block):
        return {"down_blocks.1": 64, "down_blocks.2": 128, "mid_block": 128, "up_blocks.0": 128, "up_blocks.1": 64}[
            block.split(".attentions")[0]
        ]

    model = build_tiny_sdxl(seed=5, all_cross_attention=True)
    clip = build_tiny_clip("sdxl", seed=6, layers=3, max_length=16)
    params = official_edlora(words=("<xla1>", "<xla2>"), sdxl=True, seed=64,
                             unet_modules=sdxl_unet_modules(channels_of=tiny), te_modules=clip_te_modules(3, 768),
                             te2_modules=clip_te_modules(3, 1280))["params"]  # fmt: skip
    torch.save({"params": params}, comfy.models_dir / "loras" / "rw_xl.pth")
    stack = comfy.node_class("MultiConceptStackEDLoRA").execute("rw_xl.pth", S_UNET, S_TEXT, "").result[0]
    prompt = "a photo of <xla1> <xla2>"
    mix = rm.response_mix(model, clip, stack, prompt)
    mean = torch.cat([edlora_mean(params), edlora_mean(params, "new_concept_embedding_2")])
    assert mean.shape == (2048,)
    assert torch.allclose(rm.concept_means(clip, stack)[0], mean, atol=1e-7)
    slots = slots_of(params, keys=(("l", "new_concept_embedding"), ("g", "new_concept_embedding_2")))
    rows = reference_prompt_rows(clip, prompt, slots, keys=("l", "g"))
    assert rows.shape[1] == 2048
    assert abs(float(mix.scores[0]) - cosine_max(mean, rows)) < 2e-5
    # the other order would give another number: the concatenation order matters
    swapped = torch.cat([edlora_mean(params, "new_concept_embedding_2"), edlora_mean(params)])
    assert abs(cosine_max(swapped, rows) - cosine_max(mean, rows)) > 1e-3
    assert float(mix.weights[0]) == 1.0


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_by_name(comfy, base, node, rm):
    model, clip = base["model"], base["clip"]
    stack = edlora_stack(comfy)
    empty = pack(comfy, "samplers.concept_stack").ConceptStack()
    cases = [
        (dict(concepts=empty), "the concept stack is empty"),
        (dict(concepts=None), "the concept stack is empty"),
        (dict(prompt="   \n"), "the prompt is empty"),
        (dict(mode="average"), "mode is 'average'"),
        (dict(temperature=float("nan")), "temperature is nan"),
        (dict(temperature=0.0), "temperature is 0"),
        (dict(concepts=lora_stack(comfy, stack, trigger="")), r"concept 3 \(rw_lora.safetensors\) is a LoRA without"),
        (dict(prompt=12345), "prompt is a int"),
    ]
    for kwargs, message in cases:
        args = dict(model=model, clip=clip, concepts=stack, prompt=PROMPT_A, mode="sum to one", temperature=0.05)
        args.update(kwargs)
        with pytest.raises(ValueError, match=f"^{NODE}: .*{message}") as info:
            node.execute(**args)
        assert type(info.value).__name__ == "NodeError", kwargs
    # a fused concept (Fuse Concepts): its LoRA is in the fused weights, it cannot be weighted
    fused = dataclasses.replace(stack, concepts=(stack[0], dataclasses.replace(stack[1], fused="f1")))
    with pytest.raises(ValueError, match=f"^{NODE}: concept 2 \\(rw_b.pth\\) is a fused concept"):
        node.execute(model, clip, fused, PROMPT_A)
    # a CLIP that already knows a concept's words (an ED-LoRA Loader before this node)
    loaded = comfy.node_class("MultiConceptEDLoRALoader").execute(model, clip, "rw_a.pth", 0.7, 0.6)
    loaded = loaded.result if hasattr(loaded, "result") else loaded
    with pytest.raises(ValueError, match=f"^{NODE}: the CLIP already knows <rwa1> <rwa2>"):
        node.execute(model, loaded[1], stack, PROMPT_A)
    # ...or whose MODEL already has the concept merged (added with Concept Stack: Loaded ED-LoRA)
    from_loader = comfy.node_class("MultiConceptStackLoaded").execute(loaded[2], "").result[0]
    with pytest.raises(ValueError, match=f"^{NODE}: the MODEL already has concept 1 \\(rw_a.pth\\) merged"):
        node.execute(loaded[0], clip, from_loader, PROMPT_A)


def test_an_sd15_edlora_on_an_sdxl_model_is_refused_by_name(comfy, base, node):
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    model = build_tiny_sdxl(seed=5, all_cross_attention=True)
    clip = build_tiny_clip("sdxl", seed=6, layers=3, max_length=16)
    with pytest.raises(ValueError, match=f"^{NODE}: rw_a.pth is an SD1.5 ED-LoRA .*Load an SD1.5-family checkpoint"):
        node.execute(model, clip, edlora_stack(comfy), PROMPT_A)
