"""SDXL ED-LoRAs (Concept Conductor's trainer) in a real ComfyUI: loading, both text encoders, 70-layer routing.

The model is SDXL-shaped with all 70 cross-attention layers at small widths (tests/support/builders/sdxl.py), the
CLIP is ComfyUI's own SDXL CLIP (CLIP-L + CLIP-G, full widths, 3 layers each: tests/support/builders/clip.py),
and the ED-LoRA files have the official layout (tests/support/builders/edlora.py).

Which layer is which is worked out here independently of the pack: Concept Conductor numbers its 70 layer
tokens by walking ``down_blocks``, ``mid_block``, ``up_blocks`` (diffusers names, see
``sdxl_transformer_blocks``); ComfyUI's own diffusers -> ComfyUI table (``comfy.utils.unet_to_diffusers``) says
which ComfyUI module each of those is.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.edlora import (
    SDXL_CHANNELS,
    clip_te_modules,
    official_edlora,
    sdxl_transformer_blocks,
    sdxl_unet_modules,
)
from tests.support.tensors import changed_keys, same_bits

ALPHA_UNET, ALPHA_TEXT = 0.7, 0.6
TE_LAYERS = 3  # layers of each tiny text model
# Prompt sections of 16 tokens instead of 77 (see build_tiny_clip): every encoding is about 5 times cheaper,
# and this prompt spans two sections, with the concept in both.
SECTION = 16
PROMPT = "a photo of {a} {b} on a red sofa in a sunny garden, and again {a} {b} near the window"
CONCEPT_ROWS = [4, 5, SECTION + 3, SECTION + 4]  # token rows of the concept words in PROMPT's two sections
# Layers whose encoding is recomputed independently (a 77-token section through CLIP-G costs about as much as
# sampling here): both ends and each side of every block boundary of Concept Conductor's numbering
# (down_blocks.1 | down_blocks.2 | mid_block | up_blocks.0 | up_blocks.1). All 70 are checked in attention.
REFERENCE_LAYERS = [0, 1, 3, 4, 23, 24, 33, 34, 63, 64, 69]


def tiny_channels(block: str) -> int:
    """The tiny SDXL's width of a diffusers block: a tenth of SDXL's."""
    return SDXL_CHANNELS[block.split(".attentions")[0]] // 10


def sdxl_file(words, seed):
    return official_edlora(
        words=words,
        sdxl=True,
        seed=seed,
        unet_modules=sdxl_unet_modules(channels_of=tiny_channels),
        te_modules=clip_te_modules(TE_LAYERS, 768),
        te2_modules=clip_te_modules(TE_LAYERS, 1280),
        rank=4,  # CLIP-L, as the trainer's config
        te2_rank=8,
        unet_rank=8,
    )["params"]


def our_safetensors(params, words, path):
    """The pack's documented .safetensors layout (formats/edlora.py), written here by hand."""
    tensors = {}
    for group in ("new_concept_embedding", "new_concept_embedding_2"):
        for word, emb in params[group].items():
            tensors[f"{group}.{word}"] = emb.contiguous()
    for group in ("text_encoder", "text_encoder_2", "unet"):
        for key, t in params[group].items():
            tensors[f"{group}.{key}"] = t.contiguous()
    metadata = {
        "format": "multiconcept.edlora",
        "format_version": "1",
        "concept_words": json.dumps(list(words)),
        "class_word": "cat",
        "base_model": "sdxl",
        "layer_tokens": "70",
    }
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def files(comfy):
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    dog = sdxl_file(("<dog1>", "<dog2>"), seed=41)
    torch.save({"params": dog}, d / "xl_dog.pth")
    cat = sdxl_file(("<cat1>", "<cat2>"), seed=42)
    our_safetensors(cat, ("<cat1>", "<cat2>"), d / "xl_cat.safetensors")
    torch.save(official_edlora(words=("<sd1>", "<sd2>"), seed=43), d / "xl_sd15.pth")
    return {"xl_dog.pth": dog, "xl_cat.safetensors": cat}


@pytest.fixture(scope="module")
def sdxl(comfy):
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    model = build_tiny_sdxl(seed=5, all_cross_attention=True)
    return model, build_tiny_clip("sdxl", seed=6, layers=TE_LAYERS, max_length=SECTION)


def load_edlora(comfy, model, clip, name, su=ALPHA_UNET, st=ALPHA_TEXT, **kw):
    out = comfy.node_class("MultiConceptEDLoRALoader").execute(model, clip, name, su, st, **kw)
    return out.result if hasattr(out, "result") else out


def patched_state(patcher):
    """The weights as ComfyUI computes them for sampling (patches merged), copied to CPU."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
    return {k: v.detach().clone().cpu() for k, v in patcher.model.state_dict().items()}


def expected_delta(group, module, alpha):
    return alpha * (group[f"{module}.lora_up.weight"].float() @ group[f"{module}.lora_down.weight"].float())


def assert_deltas(before, after, expected):
    """``after - before == expected`` (to 1 ulp of the weight) at ``expected``'s keys, bit-identical elsewhere."""
    for k in before:
        if k in expected:
            tol = torch.finfo(after[k].dtype).eps * float(after[k].abs().max()) + 1e-7
            delta = after[k].float() - before[k].float()
            assert torch.allclose(delta, expected[k], atol=tol, rtol=0), f"{k}: {(delta - expected[k]).abs().max()}"
            assert delta.abs().max() > 0, k
        else:
            assert same_bits(after[k], before[k]), f"{k} changed but the ED-LoRA does not name it"


def comfy_module_of(model) -> dict[str, str]:
    """Concept Conductor's diffusers block name -> the ComfyUI module path, from ComfyUI's own table."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {k[: -len(".weight")]: v[: -len(".weight")] for k, v in table.items() if k.endswith(".weight")}


def concept_conductor_layers(model) -> dict[str, int]:
    """ComfyUI attn2 module path -> the index of its layer token in Concept Conductor's numbering."""
    to_comfy = comfy_module_of(model)
    return {to_comfy[f"{b}.attn2.to_k"][: -len(".to_k")]: i for i, b in enumerate(sdxl_transformer_blocks())}


def reference_layer_encodings(clip, slots: dict, layers: list[int]):
    """PROMPT encoded once per layer of ``layers``, each slot word replaced by its layer tokens (CLIP-L and
    CLIP-G) as tensor tokens: ComfyUI's own embedding mechanism, in one stock encoder call (PROMPT's sections
    once per layer). Never touches the pack's tokenizer or its layer expansion.

    Returns (cond ``[len(layers), tokens, 2048]``, pooled ``[1280]`` of the first layer's first section).
    """
    base_tok = clip.tokenizer.base
    tokens = base_tok.tokenize_with_weights(PROMPT.format(a="ohwx", b="ohwx"))
    placeholder = base_tok.tokenize_with_weights("ohwx")["l"][0][1][0]
    out = {}
    for key, sections in tokens.items():
        out[key] = []
        for layer in layers:
            words = iter([slots["a"], slots["b"]] * 2)  # PROMPT names the concept twice
            for section in sections:
                out[key].append([((next(words)[key][layer] if t == placeholder else t), w) for t, w in section])
    cond, pooled = clip.encode_from_tokens(out, return_pooled=True)
    return cond.reshape(len(layers), -1, cond.shape[-1]), pooled[0]


class Capture:
    """What every cross-attention layer's key and value projections receive while sampling.

    ``calls``: one per attn2 call, from an attn2 patch that runs after the pack's: ``(block, block_index,
    cond_or_uncond)``. ``inputs[proj]``: ``(ComfyUI attn2 path, input)`` from forward pre-hooks on ``to_k`` /
    ``to_v``, in call order.
    """

    def __init__(self):
        self.calls, self.inputs, self.handles = [], {"to_k": [], "to_v": []}, []

    def patch(self, n, context, value, extra_options):
        block = extra_options["block"]
        self.calls.append(
            (block[0], int(block[1]), extra_options["block_index"], list(extra_options["cond_or_uncond"]))
        )
        return n, context, value

    def hook(self, diffusion_model):
        for name, module in diffusion_model.named_modules():
            if name.endswith("attn2"):
                for proj in ("to_k", "to_v"):

                    def record(mod, args, proj=proj, name=name):
                        self.inputs[proj].append((name, args[0].detach().clone()))

                    self.handles.append(getattr(module, proj).register_forward_pre_hook(record))

    def remove(self):
        for h in self.handles:
            h.remove()


def sample(model, positive, negative, capture=None, steps=1, seed=3):
    import nodes

    m = model.clone()
    if capture is not None:
        m.set_model_attn2_patch(capture.patch)
        capture.hook(m.model.diffusion_model)
    try:
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return nodes.common_ksampler(m, seed, steps, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    finally:
        if capture is not None:
            capture.remove()


def rows(x, cond_or_uncond, kind):
    n = x.shape[0] // len(cond_or_uncond)
    return [x[j * n : (j + 1) * n] for j, k in enumerate(cond_or_uncond) if k == kind]


# ------------------------------------------------------------------------------------------ loading


def expected_te_deltas(params, alpha):
    out = {}
    for group, encoder, width in (("text_encoder", "clip_l", 768), ("text_encoder_2", "clip_g", 1280)):
        for mod in clip_te_modules(TE_LAYERS, width):
            out[f"{encoder}.transformer.{mod}.weight"] = expected_delta(params[group], mod, alpha)
    return out


def test_official_pth_changes_the_unet_and_both_text_encoders_exactly(comfy, sdxl, files):
    model, clip = sdxl
    params = files["xl_dog.pth"]
    before_unet, before_te = patched_state(model), patched_state(clip.patcher)
    m, c, concept, words = load_edlora(comfy, model, clip, "xl_dog.pth")
    assert words == "<dog1> <dog2>" and concept.base_model == "sdxl" and concept.layer_tokens == 70

    to_comfy = comfy_module_of(model)
    unet_expected = {
        "diffusion_model." + to_comfy[mod] + ".weight": expected_delta(params["unet"], mod, ALPHA_UNET)
        for mod in sdxl_unet_modules(channels_of=tiny_channels)
    }
    assert len(unet_expected) == 70 * 2 * 4  # to_q/k/v/out.0 of attn1 and attn2 in all 70 transformer blocks
    assert_deltas(before_unet, patched_state(m), unet_expected)

    after_te = patched_state(c.patcher)
    assert_deltas(before_te, after_te, expected_te_deltas(params, ALPHA_TEXT))
    # both encoders changed: 12 weights each (q/k/v/out of 3 layers), with their own ranks (4 and 8)
    changed = changed_keys(before_te, after_te)
    assert sum(k.startswith("clip_l.") for k in changed) == 12 and sum(k.startswith("clip_g.") for k in changed) == 12
    ranks = {g: {t.shape[0] for k, t in params[g].items() if k.endswith("lora_down.weight")} for g in params}
    assert ranks["text_encoder"] == {4} and ranks["text_encoder_2"] == {8}
    # the loader worked on clones
    assert not model.patches and not clip.patcher.patches


def test_our_safetensors_loads_the_same_concept(comfy, sdxl, files):
    """The pack's .safetensors layout: the same words, embeddings and LoRA as the file holds (no merge needed:
    the patches are compared with the file's tensors; merging is the same path as for the .pth above)."""
    model, clip = sdxl
    params = files["xl_cat.safetensors"]
    m, c, concept, words = load_edlora(comfy, model, clip, "xl_cat.safetensors")
    assert words == "<cat1> <cat2>" and concept.class_word == "cat" and concept.base_model == "sdxl"
    weights = concept.weights
    assert weights.source_format == "safetensors" and weights.layer_tokens == 70
    for word in ("<cat1>", "<cat2>"):
        assert same_bits(weights.embeddings[word]["l"], params["new_concept_embedding"][word])
        assert same_bits(weights.embeddings[word]["g"], params["new_concept_embedding_2"][word])

    to_comfy = comfy_module_of(model)
    expected = {
        "diffusion_model." + to_comfy[mod] + ".weight": (mod, "unet")
        for mod in sdxl_unet_modules(channels_of=tiny_channels)
    }
    for group, encoder, width in (("text_encoder", "clip_l", 768), ("text_encoder_2", "clip_g", 1280)):
        for mod in clip_te_modules(TE_LAYERS, width):
            expected[f"{encoder}.transformer.{mod}.weight"] = (mod, group)
    assert set(m.patches) | set(c.patcher.patches) == set(expected)
    for key, (mod, group) in expected.items():
        ((strength, adapter, strength_model, _, _),) = (m.patches if group == "unet" else c.patcher.patches)[key]
        assert strength == (ALPHA_UNET if group == "unet" else ALPHA_TEXT) and strength_model == 1.0, key
        up, down, alpha = adapter.weights[:3]
        assert alpha is None, key  # alpha * up @ down with the strength as alpha: no division by rank
        assert same_bits(up, params[group][f"{mod}.lora_up.weight"]), key
        assert same_bits(down, params[group][f"{mod}.lora_down.weight"]), key


# ------------------------------------------------------------------------------------------ routing


def test_each_of_the_70_layers_reads_its_own_encoding_in_the_concept_rows(comfy, sdxl, files):
    import nodes

    clip_mod = comfy.pack_module("samplers.edlora.clip")
    model, clip = sdxl
    params = files["xl_dog.pth"]
    m, c, _, _ = load_edlora(comfy, model, clip, "xl_dog.pth")
    text = PROMPT.format(a="<dog1>", b="<dog2>")
    for key, sections in c.tokenize(text).items():  # two sections; the concept words where CONCEPT_ROWS says
        flat = [t for section in sections for t, *_ in section]
        assert len(sections) == 2 and [i for i, t in enumerate(flat) if isinstance(t, dict)] == CONCEPT_ROWS, key
    positive = nodes.CLIPTextEncode().encode(c, text)[0]
    negative = nodes.CLIPTextEncode().encode(c, "blurry, lowres")[0]  # one section
    lw = positive[0][1][clip_mod.LAYERWISE_KEY]
    assert tuple(lw.layers.shape) == (1, 70, 2 * SECTION, 2048) and lw.reference is positive[0][0]

    # 1. the per-layer encodings are the prompt encoded with each layer's CLIP-L and CLIP-G tokens; the pooled
    #    output is layer 0's (as Concept Conductor's trainer and pipelines use it)
    emb = {
        w: {"l": params["new_concept_embedding"][w], "g": params["new_concept_embedding_2"][w]}
        for w in params["new_concept_embedding"]
    }
    slots = {"a": emb["<dog1>"], "b": emb["<dog2>"]}
    want, want_pooled = reference_layer_encodings(c, slots, REFERENCE_LAYERS)
    for i, layer in enumerate(REFERENCE_LAYERS):
        err = (lw.layers[0, layer] - want[i]).abs().max()
        assert err <= 1e-6, f"layer {layer}: {err}"
    assert (positive[0][1]["pooled_output"][0] - want_pooled).abs().max() <= 1e-6
    # every layer's encoding differs from every other's in both halves (CLIP-L: :768, CLIP-G: 768:), so a
    # layer reading another layer's encoding cannot go unnoticed
    at = lw.layers[0, :, CONCEPT_ROWS]
    for half in (slice(0, 768), slice(768, 2048)):
        x = at[..., half].flatten(1)
        gap = torch.cdist(x, x) + torch.eye(70) * 1e9
        assert gap.min() > 1e-3, half

    # 2. inside sampling, key and value of each layer get exactly that layer's encoding in the positive rows
    #    and the negative prompt's conditioning, untouched, in the negative rows (ComfyUI repeats the shorter
    #    negative to the positive's two sections when it batches them)
    cap = Capture()
    sample(m, positive, negative, cap)
    index_of = concept_conductor_layers(model)
    assert sorted(index_of.values()) == list(range(70))
    neg = negative[0][0][0].repeat(2, 1)
    for proj in ("to_k", "to_v"):
        seen = cap.inputs[proj]
        assert sorted(index_of[name] for name, _ in seen) == list(range(70)), proj  # one call per layer
        for (name, x), (block, number, depth, cond_or_uncond) in zip(seen, cap.calls, strict=True):
            assert name.startswith(f"{block}_blocks.{number}." if block != "middle" else "middle_block.")
            assert name.endswith(f".transformer_blocks.{depth}.attn2")
            (cond,) = rows(x, cond_or_uncond, 0)
            (uncond,) = rows(x, cond_or_uncond, 1)
            layer = index_of[name]
            assert same_bits(cond[0], lw.layers[0, layer].to(x.dtype)), f"{proj} of layer {layer} ({name})"
            assert same_bits(uncond[0], neg.to(x.dtype)), f"{proj} of layer {layer}: negative rows changed"


def test_prompts_without_concept_words_are_bit_identical_to_plain(comfy, sdxl, files):
    import nodes

    model, clip = sdxl
    # encoding: the loader's CLIP (text LoRA off) encodes plain prompts exactly as the stock CLIP
    _, c0, _, _ = load_edlora(comfy, model, clip, "xl_dog.pth", su=0.0, st=0.0)
    for text in ("a photo of a sofa", "", "(blurry:1.3), lowres"):
        ours = nodes.CLIPTextEncode().encode(c0, text)[0]
        stock = nodes.CLIPTextEncode().encode(clip, text)[0]
        assert same_bits(ours[0][0], stock[0][0]), text
        assert same_bits(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"]), text
        assert set(ours[0][1]) == set(stock[0][1])

    # sampling: with the loader's MODEL (routing installed; UNet LoRA off, so that only the routing can act)
    # and CLIP (text LoRA on), a prompt without concept words gives the latent of the plain MODEL bit for bit,
    # and every cross-attention layer reads the conditioning as encoded, in both rows
    m0, c, _, _ = load_edlora(comfy, model, clip, "xl_dog.pth", su=0.0, st=ALPHA_TEXT)
    positive = nodes.CLIPTextEncode().encode(c, "a photo of a sofa")[0]
    negative = nodes.CLIPTextEncode().encode(c, "blurry")[0]
    cap = Capture()
    routed = sample(m0, positive, negative, cap)
    assert same_bits(routed, sample(model, positive, negative))
    assert len(cap.inputs["to_k"]) == len(cap.inputs["to_v"]) == 70
    for proj in ("to_k", "to_v"):
        for (_, x), (_, _, _, cond_or_uncond) in zip(cap.inputs[proj], cap.calls, strict=True):
            (cond,) = rows(x, cond_or_uncond, 0)
            (uncond,) = rows(x, cond_or_uncond, 1)
            assert same_bits(cond[0], positive[0][0][0].to(x.dtype)), proj
            assert same_bits(uncond[0], negative[0][0][0].to(x.dtype)), proj


# ------------------------------------------------------------------------------------------ refusals


def message_of(excinfo) -> str:
    return str(excinfo.value)


def test_sd15_edlora_on_the_sdxl_model_is_refused_naming_the_fix(comfy, sdxl, files):
    model, clip = sdxl
    with pytest.raises(Exception) as e:
        load_edlora(comfy, model, clip, "xl_sd15.pth")
    text = message_of(e)
    for part in ("ED-LoRA Loader", "SD1.5 ED-LoRA", "not SD1.5-shaped", "70 cross-attention layers",
                 "Load an SD1.5-family checkpoint", "the MODEL is SDXL"):  # fmt: skip
        assert part in text, text
    assert not model.patches and not clip.patcher.patches


def test_sdxl_edlora_on_an_sd15_model_or_clip_is_refused_naming_the_fix(comfy, sdxl, files):
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sd15 import build_small_sd15_model

    sd15_model = build_small_sd15_model(seed=1)
    sd15_clip = build_tiny_clip("sd15", seed=2, layers=TE_LAYERS, max_length=SECTION)
    with pytest.raises(Exception) as e:
        load_edlora(comfy, sd15_model, sd15_clip, "xl_dog.pth")
    text = message_of(e)
    for part in ("SDXL ED-LoRA", "not SDXL-shaped", "16 cross-attention layers", "Load an SDXL base checkpoint",
                 "the MODEL is SD1.5"):  # fmt: skip
        assert part in text, text
    # an SDXL MODEL with the SD1.5 CLIP: the CLIP is named
    with pytest.raises(Exception) as e:
        load_edlora(comfy, sdxl[0], sd15_clip, "xl_dog.pth")
    text = message_of(e)
    assert "this CLIP has ['l']" in text and "not an SDXL CLIP" in text, text


# ------------------------------------------------------------------------------------------ concept stack


def test_concept_stack_and_regional_lora_take_sdxl_edloras_on_sdxl(comfy, sdxl, files):
    import nodes

    adapters = comfy.pack_module("samplers.scoped_lora.adapters")
    model, clip = sdxl
    stack = comfy.node_class("MultiConceptStackEDLoRA").execute("xl_dog.pth", 0.7, 0.7, "left")
    stack, words = stack.result if hasattr(stack, "result") else stack
    assert words == "<dog1> <dog2>"
    (concept,) = stack.concepts
    resolved = adapters.resolve_concept(model, concept)
    to_comfy = comfy_module_of(model)
    assert set(resolved.factors) == {to_comfy[mod] for mod in sdxl_unet_modules(channels_of=tiny_channels)}

    regions = comfy.node_class("MultiConceptRegions").execute(
        64, 64, json.dumps({"boxes": [{"x": 0, "y": 0, "w": 0.5, "h": 1, "label": "left"}]})
    )
    regions = (regions.result if hasattr(regions, "result") else regions)[0]
    out = comfy.node_class("MultiConceptRegionalLoRA").execute(model, stack, regions)
    scoped = (out.result if hasattr(out, "result") else out)[0]
    positive = nodes.CLIPTextEncode().encode(clip, "a photo of a dog")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    assert (sample(scoped, positive, negative) - sample(model, positive, negative)).abs().max() > 0

    # an SD1.5 ED-LoRA in the stack is refused on the SDXL model, by name
    sd15 = comfy.node_class("MultiConceptStackEDLoRA").execute("xl_sd15.pth", 0.7, 0.7, "left")
    (sd15_concept,) = (sd15.result if hasattr(sd15, "result") else sd15)[0].concepts
    with pytest.raises(adapters.ScopedLoRAError, match="is an SD1.5 ED-LoRA, but the MODEL is SDXL"):
        adapters.resolve_concept(model, sd15_concept)
