"""Evaluation nodes in a real ComfyUI: open_clip loading from models/open_clip, scoring with regions and a stack."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.support.builders.edlora import official_edlora
from tests.support.builders.open_clip import save_tiny_open_clip
from tests.support.graphs import plain_txt2img

pytestmark = pytest.mark.integration

OC = "tiny_oc.safetensors"
REGIONS = json.dumps({"boxes": [
    {"x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0, "label": "cat", "prompt": "a <cat1> <cat2> cat sleeping"},
    {"x": 0.5, "y": 0.0, "w": 0.5, "h": 1.0, "label": "dog"},
]})  # fmt: skip


@pytest.fixture(scope="module")
def oc_files(comfy):
    d = comfy.models_dir / "open_clip"
    save_tiny_open_clip(d / OC, seed=5)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(d / "not_open_clip.safetensors"))
    (d / "open_clip_cut.safetensors").write_bytes((d / OC).read_bytes()[:500])
    return d


def _error_class(comfy, node_id):
    return sys.modules[comfy.node_class(node_id).__module__].NodeError


def _execute(comfy, node_id, *args, **kw):
    return comfy.node_class(node_id).execute(*args, **kw)


def _images(n, h, w, seed):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_loader_finds_the_file_and_names_the_folder_when_it_is_missing(comfy, oc_files):
    NodeError = _error_class(comfy, "MultiConceptOpenCLIPLoader")
    clip = _execute(comfy, "MultiConceptOpenCLIPLoader", OC, "auto").result[0]
    assert clip.image_size == (32, 32) and clip.architecture == "config beside the file"
    info = comfy.node_class("MultiConceptOpenCLIPLoader").GET_SCHEMA()
    names = {i.id: i for i in info.inputs}
    assert OC in names["clip_name"].options and "ViT-B-32" in names["architecture"].options
    assert not any(a.startswith(("roberta", "mt5", "nllb")) for a in names["architecture"].options)  # need downloads
    with pytest.raises(NodeError, match=r"^Load open_clip Model: open_clip model 'ViT-L-14.safetensors' was not found "
                                        r"in models/open_clip"):  # fmt: skip
        _execute(comfy, "MultiConceptOpenCLIPLoader", "ViT-L-14.safetensors", "auto")
    with pytest.raises(NodeError, match="not an open_clip checkpoint.*open_clip files go in models/open_clip"):
        _execute(comfy, "MultiConceptOpenCLIPLoader", "not_open_clip.safetensors", "auto")
    with pytest.raises(NodeError, match="truncated or corrupt"):
        _execute(comfy, "MultiConceptOpenCLIPLoader", "open_clip_cut.safetensors", "auto")
    with pytest.raises(NodeError, match="does not fit the architecture ViT-B-32"):
        _execute(comfy, "MultiConceptOpenCLIPLoader", OC, "ViT-B-32")


def test_scores_use_the_boxes_and_the_stack_and_chain(comfy, oc_files):
    clip = _execute(comfy, "MultiConceptOpenCLIPLoader", OC, "auto").result[0]
    scores_mod = comfy.pack_module("evaluation.scores")
    torch.save(official_edlora(words=("<cat1>", "<cat2>"), seed=11), comfy.models_dir / "loras" / "ev_cat.pth")
    stack = _execute(comfy, "MultiConceptStackEDLoRA", "ev_cat.pth", 1.0, 1.0, "cat", class_word="cat").result[0]
    regions = _execute(comfy, "MultiConceptRegions", 128, 64, REGIONS).result[0]
    img = _images(1, 64, 128, 1)
    cat_refs, dog_refs = img[:, :, :64].clone(), _images(2, 40, 40, 2)
    refs = _execute(comfy, "MultiConceptEvalReferences", "cat", cat_refs).result[0]
    refs = _execute(comfy, "MultiConceptEvalReferences", "dog", dog_refs, class_word="dog", references=refs).result[0]
    out = _execute(comfy, "MultiConceptScoreConcepts", clip, img, "a <cat1> <cat2> cat and a dog", refs,
                   run_name="first", regions=regions, concepts=stack)  # fmt: skip
    runs, table, text, chart = out.result
    first = runs[0]
    cat, dog = first.concepts
    assert cat.box == (0, 0, 64, 64) and dog.box == (64, 0, 128, 64)
    assert cat.clip_i == pytest.approx(1.0, abs=1e-5)  # the cat's box is exactly its reference
    assert dog.clip_i < 0.95
    assert first.text == "a cat and a dog"  # the stack's words replaced by its class word
    assert cat.text == "a cat sleeping"  # the box's prompt, substituted
    assert dog.text == "a photo of a dog"
    direct = scores_mod.score_images(clip, img[:, :, 64:], "", [scores_mod.ConceptReference("dog", dog_refs)])
    assert dog.clip_i == pytest.approx(direct.clip_i, abs=1e-6)
    assert json.loads(text)["runs"][0]["concepts"][0]["label"] == "cat"
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.std() > 0.05
    assert out.ui is not None and "| first | cat | 100.00 |" in table
    # chained: a second run beside the first
    runs2, table2, _, _ = _execute(comfy, "MultiConceptScoreConcepts", clip, img.flip(2), "a cat and a dog", refs,
                                   run_name="second", regions=regions, previous_scores=runs).result  # fmt: skip
    assert [r.run for r in runs2] == ["first", "second"] and "| second | **mean** |" in table2
    assert runs2[1].concepts[0].clip_i < 0.99


def test_bad_input_names_the_node_and_the_fix(comfy, oc_files):
    clip = _execute(comfy, "MultiConceptOpenCLIPLoader", OC, "auto").result[0]
    RefError = _error_class(comfy, "MultiConceptEvalReferences")
    ScoreError = _error_class(comfy, "MultiConceptScoreConcepts")
    torch.save(official_edlora(words=("<dog1>", "<dog2>"), seed=12), comfy.models_dir / "loras" / "ev_dog.pth")
    img = _images(1, 64, 128, 3)
    refs = _execute(comfy, "MultiConceptEvalReferences", "cat", img[:, :, :64]).result[0]
    regions = _execute(comfy, "MultiConceptRegions", 128, 64, REGIONS).result[0]
    # a concept of the stack without references
    stack = _execute(comfy, "MultiConceptStackEDLoRA", "ev_dog.pth", 1.0, 1.0, "dog", class_word="dog").result[0]
    with pytest.raises(ScoreError, match="^Score Concepts: the concept 'dog' has no references: add an Evaluation "
                                         "References node labelled 'dog'"):  # fmt: skip
        _execute(comfy, "MultiConceptScoreConcepts", clip, img, "a dog", refs, concepts=stack)
    # a labelled region without references
    with pytest.raises(ScoreError, match="^Score Concepts: the region 'dog' has no matching concept references"):
        _execute(comfy, "MultiConceptScoreConcepts", clip, img, "a cat", refs, regions=regions)
    # references whose label is no box
    odd = _execute(comfy, "MultiConceptEvalReferences", "bird", img).result[0]
    one_box = _execute(comfy, "MultiConceptRegions", 128, 64, json.dumps({"boxes": [{"x": 0, "y": 0, "w": 0.5, "h": 1,
                                                                                  "label": "cat"}]})).result[0]  # fmt: skip
    with pytest.raises(ScoreError, match="the concept 'bird' has no box in the regions"):
        _execute(comfy, "MultiConceptScoreConcepts", clip, img, "a bird", [*refs, *odd], regions=one_box)
    # images of another shape than the regions
    with pytest.raises(
        ScoreError, match="the images are 64x64 but the regions are for 128x64 .*set the Regions node to the size"
    ):
        _execute(comfy, "MultiConceptScoreConcepts", clip, img[:, :, :64], "a cat", refs, regions=one_box)
    # reference masks of another size, an empty label, a label used twice, no references
    with pytest.raises(
        RefError,
        match="^Evaluation References: the reference masks of 'cat' are 8x8 but its reference images are 128x64",
    ):
        _execute(comfy, "MultiConceptEvalReferences", "cat", img, masks=torch.ones(1, 8, 8))
    with pytest.raises(RefError, match="label is empty"):
        _execute(comfy, "MultiConceptEvalReferences", "  ", img)
    with pytest.raises(RefError, match="'cat' is already used"):
        _execute(comfy, "MultiConceptEvalReferences", "cat", img, references=refs)
    with pytest.raises(ScoreError, match="no references"):
        _execute(comfy, "MultiConceptScoreConcepts", clip, img, "a cat", [])


def test_in_a_graph_the_generated_image_is_scored_and_plain_sampling_is_unchanged(comfy, oc_files, tiny_checkpoint):
    plain = plain_txt2img(tiny_checkpoint)
    graph = dict(plain)
    graph.update({
        "20": {"class_type": "MultiConceptOpenCLIPLoader", "inputs": {"clip_name": OC, "architecture": "auto"}},
        "21": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 48, "batch_size": 2, "color": 0x806040}},
        "22": {"class_type": "MultiConceptEvalReferences", "inputs": {"label": "cat", "images": ["6", 0],
                                                                      "class_word": "cat"}},
        "23": {"class_type": "MultiConceptEvalReferences", "inputs": {"label": "sofa", "images": ["21", 0],
                                                                      "references": ["22", 0]}},
        "24": {"class_type": "MultiConceptScoreConcepts", "inputs": {"open_clip": ["20", 0], "images": ["6", 0],
                                                                      "prompt": "a photo of a cat on a sofa",
                                                                      "references": ["23", 0], "run_name": "plain"}},
        "25": {"class_type": "PreviewImage", "inputs": {"images": ["24", 3]}},
    })  # fmt: skip
    result = comfy.run(graph)
    assert result.success, result.error
    image = result.value("6")
    assert torch.isfinite(image).all() and image.std() > 0.02  # not flat: a score of a flat picture means little
    runs = result.value("24", 0)
    assert runs[0].concepts[0].clip_i == pytest.approx(1.0, abs=1e-5)  # scored against itself
    assert runs[0].concepts[1].clip_i < 0.99
    assert "| plain | cat | 100.00 |" in result.outputs["24"]["text"][0]
    assert result.outputs["25"]["images"]
    after = comfy.run(plain)  # the same picture without our nodes in the graph
    assert torch.equal(image, after.value("6"))
