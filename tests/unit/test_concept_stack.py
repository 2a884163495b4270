"""The concept stack and region placement (pure Python + torch)."""

from __future__ import annotations

import json

import pytest
import torch

from multiconcept.formats.edlora import _weights_from_tree
from multiconcept.formats.lora import read_lora_file
from multiconcept.formats.weights import CheckpointFileError
from multiconcept.samplers.concept_stack import Concept, ConceptStack, ConceptStackError, LoRAFile
from multiconcept.samplers.concept_stack.placement import concept_masks, labelled_for_preview
from multiconcept.samplers.regions import parse_regions
from tests.support.builders.edlora import official_edlora


def edlora_concept(words=("<cat1>", "<cat2>"), label="", seed=0):
    weights = _weights_from_tree(
        official_edlora(words=words, seed=seed, unet_modules={}, te_modules={}), "x.pth", "pth", {}
    )
    return Concept(uid="", kind="edlora", source=f"{words[0]}.pth", words=weights.words, label=label, adapter=weights)


def lora_concept(name="a.safetensors", label="", words=()):
    return Concept(uid="", kind="lora", source=name, words=tuple(words), label=label, adapter=LoRAFile(name, {}))


def test_stacks_are_immutable_and_number_their_concepts():
    empty = ConceptStack()
    one = empty.with_concept(lora_concept(label="left"))
    two = one.with_concept(lora_concept("b.safetensors", label="right"))
    assert len(empty) == 0 and len(one) == 1 and len(two) == 2
    assert [c.uid for c in two] == ["c0", "c1"] and two.labels() == ["left", "right"]
    assert one.concepts[0] is two.concepts[0]


def test_clashing_edlora_words_are_renamed_like_the_loader_does():
    stack = ConceptStack().with_concept(edlora_concept(seed=1)).with_concept(edlora_concept(seed=2))
    second = stack[1]
    assert second.words == ("<cat1_2>", "<cat2_2>") and second.renamed_from == ("<cat1>", "<cat2>")
    assert second.adapter.words == second.words and set(second.adapter.embeddings) == set(second.words)
    third = stack.with_concept(edlora_concept(seed=3))[2]
    assert third.words == ("<cat1_3>", "<cat2_3>")


def test_lora_trigger_words_are_never_renamed():
    stack = ConceptStack().with_concept(lora_concept(words=["ohwx"])).with_concept(lora_concept("b", words=["ohwx"]))
    assert stack[1].words == ("ohwx",)


def regions(boxes, width=64, height=48):
    return parse_regions(json.dumps({"boxes": boxes}), width, height)


LEFT = {"x": 0, "y": 0, "w": 0.5, "h": 1, "label": "left"}
RIGHT = {"x": 0.5, "y": 0, "w": 0.5, "h": 1, "label": "right"}


def test_concepts_go_to_the_regions_with_their_label():
    stack = ConceptStack().with_concept(lora_concept(label="right")).with_concept(lora_concept("b", label="left"))
    extra = {"x": 0.25, "y": 0.5, "w": 0.25, "h": 0.5, "label": "left"}
    placed = concept_masks(stack, regions([LEFT, RIGHT, extra]))
    (c0, m0), (c1, m1) = placed
    assert c0.label == "right" and m0.shape == (48, 64) and m0[:, 32:].min() == 1 and m0[:, :32].max() == 0
    assert c1.label == "left" and m1[:, :32].min() == 1 and m1[:, 32:].max() == 0  # the two 'left' boxes joined
    preview = labelled_for_preview(stack, regions([LEFT, RIGHT, {**RIGHT, "label": "spare"}]))
    assert [r.label for r in preview.regions] == ["left: b", "right: a.safetensors", "spare (no concept)"]


@pytest.mark.parametrize(
    "concepts, boxes, words",
    [
        ([lora_concept(label="")], [LEFT], ["has no region label", "'left'"]),
        ([lora_concept(label="middle")], [LEFT, RIGHT], ["labelled 'middle'", "'left', 'right'"]),
        ([], [LEFT], ["concept stack is empty"]),
        ([lora_concept(label="left")], [], ["there are no regions"]),
    ],
)
def test_placement_errors_say_which_labels_exist(concepts, boxes, words):
    stack = ConceptStack()
    for c in concepts:
        stack = stack.with_concept(c)
    regs = regions(boxes) if boxes else parse_regions('{"boxes": []}', 64, 48, allow_empty=True)
    with pytest.raises(ConceptStackError) as e:
        concept_masks(stack, regs)
    for w in words:
        assert w in str(e.value)


def test_an_empty_mask_is_an_error():
    regs = regions([LEFT]).with_masks(torch.zeros(1, 48, 64))
    with pytest.raises(ConceptStackError, match="mask of region 'left' is empty"):
        concept_masks(ConceptStack().with_concept(lora_concept(label="left")), regs)


def test_lora_files_are_checked_when_read(tmp_path):
    from safetensors.torch import save_file

    good = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.alpha": torch.tensor(2.0)}
    save_file(good, tmp_path / "good.safetensors")
    assert set(read_lora_file(str(tmp_path / "good.safetensors")).tensors) == set(good)
    save_file({"a.lora_up.weight": torch.tensor([[float("nan")]])}, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointFileError, match="NaN"):
        read_lora_file(str(tmp_path / "nan.safetensors"))
    torch.save(official_edlora(unet_modules={}, te_modules={}), tmp_path / "ed.pth")
    with pytest.raises(CheckpointFileError, match="is an ED-LoRA.*Concept Stack: ED-LoRA"):
        read_lora_file(str(tmp_path / "ed.pth"))
    save_file({"model.diffusion_model.x.weight": torch.ones(1)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(CheckpointFileError, match="full checkpoint"):
        read_lora_file(str(tmp_path / "ckpt.safetensors"))
    torch.save({"w": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointFileError, match="not a tensor"):
        read_lora_file(str(tmp_path / "list.pt"))
    # integer weights (issue 26: they used to be accepted); an integer alpha is a setting, kohya may write one
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3, dtype=torch.int32)}, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointFileError, match="'lora_unet_x.lora_down.weight' holds int32 values, not float"):
        read_lora_file(str(tmp_path / "int.safetensors"))
    save_file({"lora_unet_x.lora_up.weight": torch.ones(3, 2, dtype=torch.bool)}, tmp_path / "bool.safetensors")
    with pytest.raises(CheckpointFileError, match="holds bool values"):
        read_lora_file(str(tmp_path / "bool.safetensors"))
    int_alpha = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.alpha": torch.tensor(2)}
    save_file(int_alpha, tmp_path / "int_alpha.safetensors")
    assert read_lora_file(str(tmp_path / "int_alpha.safetensors")).tensors["lora_unet_x.alpha"].item() == 2


def test_files_are_parsed_once_per_version(tmp_path):
    import os

    from safetensors.torch import save_file

    from multiconcept.samplers.concept_stack.files import load_lora

    path = tmp_path / "cached.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(path))
    first = load_lora(str(path))
    assert load_lora(str(path)) is first
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, str(path))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new version of the file
    second = load_lora(str(path))
    assert second is not first and second.tensors["lora_unet_x.lora_down.weight"].sum() == 0


def test_a_methods_official_strength_replaces_only_strengths_left_at_the_default():
    import dataclasses

    from multiconcept.samplers.concept_stack.stack import DEFAULT_STRENGTHS

    assert DEFAULT_STRENGTHS == {"edlora": 0.7, "lora": 1.0}  # the Concept Stack nodes' widget defaults
    ed = dataclasses.replace(edlora_concept(), strength_unet=0.7, strength_text=0.7)
    lora = dataclasses.replace(lora_concept(), strength_unet=1.0, strength_text=1.0)
    changed = dataclasses.replace(lora_concept("b.safetensors"), strength_unet=0.0, strength_text=1.3)
    stack = ConceptStack().with_concept(ed).with_concept(lora).with_concept(changed)
    got = [(c.strength_unet, c.strength_text) for c in stack.at_strength(0.8)]
    assert got == [(0.8, 0.8), (0.8, 0.8), (0.0, 1.3)]  # a switched-off part (0) and a chosen 1.3 are kept
    assert [c.words for c in stack.at_strength(0.8)] == [c.words for c in stack]
