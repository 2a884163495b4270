"""The concept stack nodes and the Regional LoRA node in real ComfyUI graphs: effects, errors, no leaks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.edlora import official_edlora
from tests.support.builders.lora import SD15_ALL, make_lora
from tests.support.graphs import plain_txt2img

W, H = 128, 96
LEFT = {"x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0, "label": "left"}
RIGHT = {"x": 0.5, "y": 0.0, "w": 0.5, "h": 1.0, "label": "right"}
EVERYWHERE = {"x": 0.0, "y": 0.0, "w": 1.0, "h": 1.0, "label": "all"}


@pytest.fixture(scope="module")
def loras(comfy, tiny_models):

    model = tiny_models[0]
    d = comfy.models_dir / "loras"
    d.mkdir(parents=True, exist_ok=True)
    save_file(make_lora(model, SD15_ALL, seed=21, scale=0.6), str(d / "rl_a.safetensors"))
    save_file(make_lora(model, SD15_ALL, seed=22, scale=0.6), str(d / "rl_b.safetensors"))
    # LoRAs that must be refused, each for a reason the message has to name
    wrong = make_lora(model, ["input_blocks.1.1.transformer_blocks.0.attn2.to_k"], seed=23)
    key = next(k for k in wrong if k.endswith("lora_up.weight"))
    wrong[key] = torch.randn(1280, wrong[key].shape[1])  # SDXL-sized output: another architecture
    save_file(wrong, str(d / "rl_wrong_shape.safetensors"))
    save_file(
        {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
         "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
        str(d / "rl_unknown_layer.safetensors"),
    )  # fmt: skip
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = {f"{prefix}.hada_w{i}_{ab}": torch.randn(4, 320) * 0.01 for i in (1, 2) for ab in "ab"}
    loha.update({f"{prefix}.hada_w1_a": torch.randn(320, 4) * 0.01, f"{prefix}.hada_w2_a": torch.randn(320, 4) * 0.01})
    save_file(loha, str(d / "rl_loha.safetensors"))
    dora = make_lora(model, ["input_blocks.1.1.transformer_blocks.0.attn1.to_q"], seed=24)
    dora[next(k for k in dora if k.endswith("lora_up.weight")).replace("lora_up.weight", "dora_scale")] = torch.ones(
        320, 1
    )
    save_file(dora, str(d / "rl_dora.safetensors"))
    save_file(make_lora(model, ["time_embed.0"], seed=25), str(d / "rl_time.safetensors"))
    torch.save(official_edlora(seed=26), d / "rl_concept.pth")
    return d


def stack_node(name, label, previous=None, strength=1.0):
    inputs = {"lora_name": name, "strength_unet": strength, "strength_text": 1.0, "region_label": label}
    if previous:
        inputs["concepts"] = previous
    return {"class_type": "MultiConceptStackLoRA", "inputs": inputs}


def regional_graph(ckpt, concepts: list[tuple[str, str]], boxes, seed=3, prefix="rl", size=(W, H), regions_size=None):
    """Checkpoint -> Concept Stack: LoRA x n -> Regions -> Regional LoRA -> KSampler -> VAEDecode -> Save."""
    prompt = plain_txt2img(ckpt, positive="a photo of a man and a woman in a park", seed=seed, prefix=prefix, steps=3)
    prompt["4"]["inputs"].update(width=size[0], height=size[1])
    rw, rh = regions_size or size
    prompt["20"] = {
        "class_type": "MultiConceptRegions",
        "inputs": {"width": rw, "height": rh, "regions": json.dumps({"boxes": boxes})},
    }
    previous = None
    for i, (name, label) in enumerate(concepts):
        node = str(30 + i)
        prompt[node] = stack_node(name, label, previous)
        previous = [node, 0]
    prompt["40"] = {
        "class_type": "MultiConceptRegionalLoRA",
        "inputs": {"model": ["1", 0], "concepts": previous, "regions": ["20", 0]},
    }
    prompt["41"] = {"class_type": "PreviewImage", "inputs": {"images": ["40", 1]}}
    prompt["5"]["inputs"]["model"] = ["40", 0]
    return prompt


def image_of(result):
    assert result.success, result.error
    image = result.value("6")
    assert torch.isfinite(image).all() and image.std() > 0.02, "the image must have range"
    return image


def test_a_lora_over_the_whole_image_equals_the_stock_lora_loader(comfy, tiny_checkpoint, loras):
    ours = image_of(comfy.run(regional_graph(tiny_checkpoint, [("rl_a.safetensors", "all")], [EVERYWHERE])))
    stock = plain_txt2img(
        tiny_checkpoint, positive="a photo of a man and a woman in a park", seed=3, prefix="st", steps=3
    )
    stock["4"]["inputs"].update(width=W, height=H)
    stock["9"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": "rl_a.safetensors", "strength_model": 1.0},
    }
    stock["5"]["inputs"]["model"] = ["9", 0]
    theirs = image_of(comfy.run(stock))
    plain = plain_txt2img(
        tiny_checkpoint, positive="a photo of a man and a woman in a park", seed=3, prefix="pl", steps=3
    )
    plain["4"]["inputs"].update(width=W, height=H)
    plain = image_of(comfy.run(plain))
    assert (theirs - plain).abs().mean() > 1e-3, "the LoRA must change the picture"
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


def test_two_loras_in_two_boxes_change_each_half_by_its_own_lora(comfy, tiny_checkpoint, loras):
    both = image_of(
        comfy.run(
            regional_graph(
                tiny_checkpoint, [("rl_a.safetensors", "left"), ("rl_b.safetensors", "right")], [LEFT, RIGHT]
            )
        )
    )
    only_a = image_of(
        comfy.run(regional_graph(tiny_checkpoint, [("rl_a.safetensors", "left")], [LEFT, RIGHT], prefix="a"))
    )
    swapped = image_of(
        comfy.run(
            regional_graph(
                tiny_checkpoint,
                [("rl_a.safetensors", "right"), ("rl_b.safetensors", "left")],
                [LEFT, RIGHT],
                prefix="s",
            )
        )
    )
    # adding B on the right changes the right half far more than the left half
    d = (both - only_a).abs().mean(dim=(0, 3))
    # (the plain network carries part of any change across the image: see test_scoped_lora's locality test)
    assert d[:, W // 2 + 8 :].mean() > 1.5 * d[:, : W // 2 - 8].mean()
    assert (both - swapped).abs().mean() > 1e-3  # which LoRA goes where matters


def test_the_preview_names_the_concepts_in_their_boxes(comfy, tiny_checkpoint, loras):
    result = comfy.run(regional_graph(tiny_checkpoint, [("rl_a.safetensors", "left")], [LEFT, RIGHT]))
    preview = result.value("40", 1)
    assert preview.shape == (1, H, W, 3) and preview.std() > 0.01
    assert len(result.outputs["41"]["images"]) == 1


def test_chained_regional_lora_nodes_compose(comfy, tiny_checkpoint, loras):
    once = image_of(
        comfy.run(
            regional_graph(
                tiny_checkpoint, [("rl_a.safetensors", "left"), ("rl_b.safetensors", "right")], [LEFT, RIGHT]
            )
        )
    )
    prompt = regional_graph(tiny_checkpoint, [("rl_a.safetensors", "left")], [LEFT, RIGHT], prefix="chain")
    prompt["50"] = stack_node("rl_b.safetensors", "right")
    prompt["51"] = {
        "class_type": "MultiConceptRegionalLoRA",
        "inputs": {"model": ["40", 0], "concepts": ["50", 0], "regions": ["20", 0]},
    }
    prompt["5"]["inputs"]["model"] = ["51", 0]
    chained = image_of(comfy.run(prompt))
    assert torch.equal(once, chained)


def test_plain_prompts_before_and_after_are_bit_identical_in_one_persistent_executor(comfy, tiny_checkpoint, loras):
    session = comfy.persistent()
    plain = plain_txt2img(tiny_checkpoint, seed=4, prefix="p1")
    before = image_of(session.run(plain))
    regional = regional_graph(
        tiny_checkpoint, [("rl_a.safetensors", "left"), ("rl_b.safetensors", "right")], [LEFT, RIGHT], size=(64, 64)
    )
    regional["5"]["inputs"]["seed"] = 4
    changed = image_of(session.run(regional))
    assert (
        "1"
        in session.run(
            regional | {"7": {**regional["7"], "inputs": {**regional["7"]["inputs"], "filename_prefix": "again"}}}
        ).cached
    )
    assert not torch.equal(changed, before)
    model = session.executor.caches.outputs.get("1")
    after = image_of(session.run(plain_txt2img(tiny_checkpoint, seed=4, prefix="p2")))
    assert torch.equal(before, after)
    assert model is not None  # the checkpoint stayed loaded between prompts, as on a server


@pytest.mark.parametrize(
    "name, words",
    [
        ("rl_wrong_shape.safetensors", ["attn2.to_k", "another model architecture"]),
        ("rl_unknown_layer.safetensors", ["matches no layer of this SD1.5 MODEL", "down_blocks_7"]),
        ("rl_loha.safetensors", ["loha", "cannot act inside a region"]),
        ("rl_dora.safetensors", ["DoRA"]),
        ("rl_time.safetensors", ["time_embed.0", "acts on the whole image"]),
    ],
)
def test_loras_that_cannot_be_scoped_are_refused_by_name(comfy, tiny_checkpoint, loras, name, words):
    result = comfy.run(regional_graph(tiny_checkpoint, [(name, "left")], [LEFT]))
    assert not result.success and result.error["node_type"] == "MultiConceptRegionalLoRA"
    message = result.error["exception_message"]
    assert message.startswith("Regional LoRA: ") and all(w in message for w in words), message
    assert comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_refused")).success


@pytest.mark.parametrize(
    "concepts, boxes, words",
    [
        ([("rl_a.safetensors", "middle")], [LEFT, RIGHT], ["labelled 'middle'", "'left', 'right'"]),
        ([("rl_a.safetensors", "")], [LEFT], ["has no region label", "'left'"]),
    ],
)
def test_concepts_without_a_matching_region_are_errors_listing_the_labels(
    comfy, tiny_checkpoint, loras, concepts, boxes, words
):
    result = comfy.run(regional_graph(tiny_checkpoint, concepts, boxes))
    assert not result.success and result.error["node_type"] == "MultiConceptRegionalLoRA"
    assert all(w in result.error["exception_message"] for w in words), result.error["exception_message"]


def test_regions_for_another_image_shape_are_an_error_naming_the_node(comfy, tiny_checkpoint, loras):
    result = comfy.run(regional_graph(tiny_checkpoint, [("rl_a.safetensors", "left")], [LEFT], regions_size=(128, 128)))
    assert not result.success
    message = result.error["exception_message"]
    assert "Regional LoRA" in message and "128x128" in message and "128x96" in message, message
    same_shape = comfy.run(
        regional_graph(tiny_checkpoint, [("rl_a.safetensors", "left")], [LEFT], regions_size=(256, 192))
    )
    assert same_shape.success, same_shape.error  # the same shape at another size (e.g. a hires pass) is fine
    assert comfy.run(plain_txt2img(tiny_checkpoint, prefix="after_shape")).success


def test_a_concept_already_merged_by_its_loader_is_refused(comfy, tiny_checkpoint, loras):
    prompt = regional_graph(tiny_checkpoint, [("rl_a.safetensors", "left")], [LEFT])
    prompt["60"] = {"class_type": "MultiConceptEDLoRALoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                    "edlora_name": "rl_concept.pth", "strength_unet": 0.7, "strength_text": 0.7}}  # fmt: skip
    prompt["61"] = {"class_type": "MultiConceptStackLoaded", "inputs": {"concept": ["60", 2], "region_label": "left"}}
    prompt["40"]["inputs"].update(model=["60", 0], concepts=["61", 0])
    result = comfy.run(prompt)
    assert not result.success and "already has rl_concept.pth merged" in result.error["exception_message"]
    prompt["40"]["inputs"]["model"] = ["1", 0]  # the checkpoint's MODEL: fine
    assert comfy.run(prompt).success


def test_edlora_stack_node_renames_clashing_words_and_reports_them(comfy, loras):
    prompt = {
        "1": {"class_type": "MultiConceptStackEDLoRA", "inputs": {"edlora_name": "rl_concept.pth", "strength_unet": 0.7,
              "strength_text": 0.7, "region_label": "a"}},
        "2": {"class_type": "MultiConceptStackEDLoRA", "inputs": {"edlora_name": "rl_concept.pth", "strength_unet": 0.7,
              "strength_text": 0.7, "region_label": "b", "concepts": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }  # fmt: skip
    result = comfy.run(prompt)
    assert result.success, result.error
    stack = result.value("2", 0)
    assert [c.words for c in stack] == [("<cat1>", "<cat2>"), ("<cat1_2>", "<cat2_2>")]
    assert result.value("2", 1) == "<cat1_2> <cat2_2>" and [c.label for c in stack] == ["a", "b"]
