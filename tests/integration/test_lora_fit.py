"""A LoRA made for another family, or matching no layer, is refused by every node that applies it (issue 26).

ComfyUI's own loader skips entries that name no layer and only logs shape errors when it patches, so such a
file used to load and do nothing or half of itself. Each case here is a file as real trainers write them
(kohya names, the family's real shapes), applied through every route the pack has: the scoped runtime
(Regional LoRA, Mix-of-Show scoped), merged (Mix-of-Show merged, Response-Weighted Mix), the text encoder
(every method that encodes a concept's prompt) and Fuse Concepts, which must not save a file.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.lora import (
    FLUX_STYLE_LAYERS,
    SD15_ALL,
    SD15_ATTENTION,
    SDXL_STYLE_LAYERS,
    family_style_lora,
    make_lora,
)

W, H = 128, 96
LEFT = {"x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0, "label": "left", "prompt": "a cat"}
RIGHT = {"x": 0.5, "y": 0.0, "w": 0.5, "h": 1.0, "label": "right", "prompt": "a dog"}
TEXT_LAYER = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def text_lora(seed: int) -> dict[str, torch.Tensor]:
    """An SD1.5 text-encoder LoRA on CLIP-L's first layer (kohya's lora_te_ names)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{TEXT_LAYER}.lora_down.weight": torch.randn(4, 768, generator=gen) * 0.01,
        f"{TEXT_LAYER}.lora_up.weight": torch.randn(768, 4, generator=gen) * 0.01,
        f"{TEXT_LAYER}.alpha": torch.tensor(4.0),
    }


@pytest.fixture(scope="module")
def files(comfy, tiny_models):
    model = tiny_models[0]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    good = make_lora(model, SD15_ALL, seed=71)
    good.update(text_lora(72))
    partial = dict(good)
    partial.update(
        {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
         "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}
    )  # fmt: skip
    sdxl_text = {k: v for k, v in family_style_lora(SDXL_STYLE_LAYERS, seed=74).items() if "_te" in k}
    made = {
        "fit_good.safetensors": good,
        "fit_sdxl.safetensors": family_style_lora(SDXL_STYLE_LAYERS, seed=73),
        "fit_flux.safetensors": family_style_lora(FLUX_STYLE_LAYERS, seed=75),
        "fit_partial.safetensors": partial,
        "fit_sdxl_text.safetensors": sdxl_text,
        "fit_sd15_attention.safetensors": make_lora(model, SD15_ATTENTION, seed=76),
    }
    for name, tensors in made.items():
        save_file(tensors, str(d / name))
    return made


def node_error(comfy, node_id):
    return sys.modules[comfy.node_class(node_id).__module__].NodeError


def stack_of(comfy, *entries):
    """entries: (LoRA file, region label, trigger words)."""
    node = comfy.node_class("MultiConceptStackLoRA")
    stack = None
    for name, label, trigger in entries:
        stack = node.execute(name, 0.8, 0.8, label, concepts=stack, trigger_words=trigger).result[0]
    return stack


def regions(comfy):
    layout = comfy.pack_module("samplers.regions")
    return layout.parse_regions(json.dumps({"boxes": [LEFT, RIGHT]}), W, H)


# ------------------------------------------------------------------------------------- the check itself


def test_a_lora_of_the_models_family_fits_whole(comfy, tiny_models, files):
    fit = comfy.pack_module("samplers.concept_stack.lora_fit")
    model, clip = tiny_models[:2]
    patches = fit.lora_patches(files["fit_good.safetensors"], "fit_good.safetensors", model, clip)
    assert len(patches.unet) == len(SD15_ALL) and len(patches.text) == 1 and patches.text_layers == 1
    assert fit.lora_patches(files["fit_good.safetensors"], "x", model).text == {}  # no CLIP: text not loaded


@pytest.mark.parametrize(
    "name, target, parts",
    [
        (
            "fit_sdxl.safetensors",
            "model",
            [
                "was made for SDXL, not for this SD1.5 MODEL",
                "2 of its 4 layers have another shape",
                "and 2 have no counterpart",
                "Use a LoRA trained for SD1.5",
            ],
        ),  # fmt: skip
        ("fit_flux.safetensors", "model", ["matches no layer of this SD1.5 MODEL", "was made for Flux"]),
        (
            "fit_partial.safetensors",
            "model",
            [
                f"only {len(SD15_ALL)} of its {len(SD15_ALL) + 1} layers match this SD1.5 MODEL",
                "1 has no counterpart (e.g. lora_unet_down_blocks_7_attentions_0_proj_in)",
            ],
        ),  # fmt: skip
        (
            "fit_sdxl_text.safetensors",
            "clip",
            [
                "only 1 of its 2 layers match this SD1.5 CLIP",
                "was made for SDXL",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
            ],
        ),  # fmt: skip
    ],
)
def test_files_of_another_family_are_refused_naming_the_family(comfy, tiny_models, files, name, target, parts):
    fit = comfy.pack_module("samplers.concept_stack.lora_fit")
    model, clip = tiny_models[:2]
    where = {"model": {"model_patcher": model}, "clip": {"clip": clip}}[target]
    with pytest.raises(fit.LoRAFitError) as info:
        fit.lora_patches(files[name], name, **where)
    message = str(info.value)
    assert message.startswith(name), message
    for part in parts:
        assert part in message, message


def test_an_sd15_lora_on_an_sdxl_model_is_refused(comfy, files):
    from tests.support.builders.sdxl import build_tiny_sdxl

    fit = comfy.pack_module("samplers.concept_stack.lora_fit")
    with pytest.raises(fit.LoRAFitError, match="was made for SD1.5, not for this SDXL MODEL"):
        fit.lora_patches(files["fit_sd15_attention.safetensors"], "a.safetensors", build_tiny_sdxl(seed=3))


def test_the_family_hint_reads_names_and_widths(comfy, files):
    hint = comfy.pack_module("formats.lora").family_hint
    assert hint(files["fit_sdxl.safetensors"]) == "SDXL"
    assert hint(files["fit_flux.safetensors"]) == "Flux"
    assert hint(files["fit_sd15_attention.safetensors"]) == "SD1.5"  # attn2 to_k reads 768-wide text
    assert hint({k: v for k, v in files["fit_sdxl.safetensors"].items() if "attn2" in k}) == "SDXL"  # 2048 wide
    assert hint(text_lora(1)) is None  # CLIP-L alone: SD1.5's and SDXL's first encoder look the same


# ---------------------------------------------------------------------------------- through every node


def test_regional_lora_refuses_it(comfy, tiny_models, files):
    node = comfy.node_class("MultiConceptRegionalLoRA")
    stack = stack_of(comfy, ("fit_good.safetensors", "left", ""), ("fit_sdxl.safetensors", "right", ""))
    with pytest.raises(node_error(comfy, "MultiConceptRegionalLoRA"), match=r"^Regional LoRA: fit_sdxl.safetensors "
                       "was made for SDXL, not for this SD1.5 MODEL"):  # fmt: skip
        node.execute(tiny_models[0], stack, regions(comfy))
    node.execute(tiny_models[0], stack_of(comfy, ("fit_good.safetensors", "left", "")), regions(comfy))  # fits


@pytest.mark.parametrize("adapters", ["scoped", "merged"])
def test_mixofshow_regional_refuses_it_scoped_and_merged(comfy, tiny_models, files, adapters):
    node = comfy.node_class("MultiConceptMixOfShowRegional")
    model, clip = tiny_models[:2]
    stack = stack_of(comfy, ("fit_good.safetensors", "left", ""), ("fit_flux.safetensors", "right", ""))
    with pytest.raises(ValueError, match=r"^Mix-of-Show Regional: .*fit_flux.safetensors matches no layer of "
                       "this SD1.5 MODEL"):  # fmt: skip
        node.execute(model, clip, regions(comfy), "a cat and a dog", "", concepts=stack, adapters=adapters)


def test_a_text_part_for_another_clip_is_refused_where_prompts_are_encoded(comfy, tiny_models, files):
    node = comfy.node_class("MultiConceptMixOfShowRegional")
    model, clip = tiny_models[:2]
    stack = stack_of(comfy, ("fit_good.safetensors", "left", ""), ("fit_sdxl_text.safetensors", "right", ""))
    with pytest.raises(ValueError, match=r"^Mix-of-Show Regional: .*fit_sdxl_text.safetensors: only 1 of its 2 "
                       "layers match this SD1.5 CLIP"):  # fmt: skip
        node.execute(model, clip, regions(comfy), "a cat and a dog", "", concepts=stack, adapters="merged")


def test_the_clip_family_is_named_when_the_clip_knows_concept_words(comfy, tiny_models, files):
    # with an ED-LoRA in the stack the CLIP is wrapped to know its words; the message still names SD1.5
    from tests.support.builders.edlora import official_edlora

    torch.save(official_edlora(seed=77), comfy.models_dir / "loras" / "fit_concept.pth")
    stack = comfy.node_class("MultiConceptStackEDLoRA").execute("fit_concept.pth", 0.7, 0.7, "").result[0]
    stack = comfy.node_class("MultiConceptStackLoRA").execute("fit_sdxl_text.safetensors", 0.8, 0.8, "",
                                                              concepts=stack, trigger_words="zqb").result[0]  # fmt: skip
    node = comfy.node_class("MultiConceptResponseWeightedMix")
    with pytest.raises(ValueError, match="only 1 of its 2 layers match this SD1.5 CLIP"):
        node.execute(tiny_models[0], tiny_models[1], stack, "a photo of <cat1> <cat2> and zqb")


def test_response_weighted_mix_refuses_it(comfy, tiny_models, files):
    node = comfy.node_class("MultiConceptResponseWeightedMix")
    model, clip = tiny_models[:2]
    stack = stack_of(comfy, ("fit_good.safetensors", "", "zqa"), ("fit_sdxl.safetensors", "", "zqb"))
    with pytest.raises(ValueError, match=r"^Response-Weighted Concept Mix: concept 2 \(fit_sdxl.safetensors\) was "
                       "made for SDXL"):  # fmt: skip
        node.execute(model, clip, stack, "a photo of zqa and zqb")


def test_fuse_concepts_refuses_it_and_saves_nothing(comfy, tiny_models, files):
    node = comfy.node_class("MultiConceptFuseConcepts")
    model, clip = tiny_models[:2]
    d = comfy.models_dir / "loras"
    before = set(d.iterdir())
    stack = stack_of(comfy, ("fit_good.safetensors", "", "zqa"), ("fit_sdxl.safetensors", "", "zqb"))
    with pytest.raises(ValueError, match=r"^Fuse Concepts: fit_sdxl.safetensors was made for SDXL"):
        node.execute(model, clip, stack, "closed form", "fit_fused", 1, 64, 0)
    assert set(d.iterdir()) == before
