"""CLIP-I / CLIP-T / SA / NSD on a tiny random open_clip model, the open_clip file loader, the report."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def oc(tmp_path_factory):
    from multiconcept.evaluation.open_clip_model import load_open_clip
    from tests.support.builders.open_clip import save_tiny_open_clip

    path = save_tiny_open_clip(tmp_path_factory.mktemp("oc") / "tiny.safetensors", seed=3)
    return load_open_clip(path, "auto")


def _images(n, h, w, seed):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _ref(label, images, **kw):
    from multiconcept.evaluation.scores import ConceptReference

    return ConceptReference(label, images, **kw)


def test_identical_images_give_clip_i_one_and_different_ones_less(oc):
    from multiconcept.evaluation.scores import score_images

    img = _images(1, 48, 40, 0)
    same = score_images(oc, img, "a photo", [_ref("cat", img.clone())])
    assert same.clip_i == pytest.approx(1.0, abs=1e-5)
    assert same.concepts[0].clip_i == pytest.approx(1.0, abs=1e-5)
    other = score_images(oc, img, "a photo", [_ref("cat", _images(1, 48, 40, 1) * 0.3)])
    assert other.clip_i < 0.95  # the tiny model tells pictures apart, so the 1.0 above means something


def test_the_crop_is_exactly_the_box_pixels(oc):
    from multiconcept.evaluation.scores import crop, score_images

    img = _images(2, 64, 64, 2)
    box = (8, 16, 40, 48)  # 32x32: the tiny model's input size, so CLIP's centre crop keeps every box pixel
    assert torch.equal(crop(img, box), img[:, 16:48, 8:40])
    refs = [_ref("cat", _images(2, 32, 32, 3))]
    base = score_images(oc, img, "a cat", refs, {"cat": box}).concepts[0]
    outside = img.clone()
    outside[:, :16] = 0.0  # rows above the box
    outside[:, :, 40:] = 1.0  # columns right of it
    outside[:, 48:, :8] = 0.5
    moved = score_images(oc, outside, "a cat", refs, {"cat": box}).concepts[0]
    assert moved.clip_i == base.clip_i and moved.clip_t == base.clip_t  # bit-identical: nothing outside is read
    inside = img.clone()
    inside[:, 16:20, 8:40] = 0.0  # the box's first rows
    assert score_images(oc, inside, "a cat", refs, {"cat": box}).concepts[0].clip_i != base.clip_i
    edge = img.clone()
    edge[:, 47, 39] = 1.0 - edge[:, 47, 39]  # the box's last pixel (x1, y1 exclusive)
    assert score_images(oc, edge, "a cat", refs, {"cat": box}).concepts[0].clip_i != base.clip_i
    # and the crop is what is embedded: the same as scoring the cropped images without boxes
    cropped = score_images(oc, img[:, 16:48, 8:40].contiguous(), "a cat", refs).concepts[0]
    assert cropped.clip_i == pytest.approx(base.clip_i, abs=1e-6)


def test_class_words_replace_concept_words_before_clip_t(oc):
    from multiconcept.evaluation.scores import embed_images, embed_texts, score_images, substitute_class_words

    img = _images(2, 40, 40, 4)
    refs = [_ref("cat", img[:1], class_word="cat", words=("<cat1>", "<cat2>")),
            _ref("dog", img[1:], class_word="dog", words=("<dog1>", "<dog2>"))]  # fmt: skip
    prompt = "a <cat1> <cat2> cat and a <dog1> <dog2> on a sofa"
    result = score_images(oc, img, prompt, refs)
    assert result.text == "a cat and a dog on a sofa"
    expected = float((embed_images(oc, img) @ embed_texts(oc, [result.text]).T).mean())
    raw = float((embed_images(oc, img) @ embed_texts(oc, [prompt]).T).mean())
    assert result.clip_t == pytest.approx(expected, abs=1e-6)
    assert abs(raw - expected) > 1e-4  # the substitution changes the number: measured after it
    # per concept: its own prompt substituted, else "a photo of a <class word>"
    assert [c.text for c in result.concepts] == ["a photo of a cat", "a photo of a dog"]
    pairs = [(("<cat1>", "<cat2>"), "cat"), (("<fz>",), "")]
    assert substitute_class_words("<cat1> <cat2>, <fz> style", pairs) == "cat, style"
    assert substitute_class_words("photo of a <cat1>", pairs) == "photo of a cat"
    assert substitute_class_words("a <cat1><cat2> cat", pairs) == "a cat"  # CLIP reads these as two words too
    assert substitute_class_words("a x<cat1> cat", pairs) == "a x<cat1> cat"  # part of another word: kept


def test_sa_reads_only_the_mask_and_nsd_only_its_complement(oc):
    from multiconcept.evaluation.scores import embed_images, masked, score_images

    gen = _images(2, 48, 48, 5)
    refs = _images(2, 32, 32, 6)
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:24, 4:20] = 1.0
    base = score_images(oc, gen, "x", [_ref("cat", refs, masks=masks)]).concepts[0]
    g = embed_images(oc, gen)
    sa = float((embed_images(oc, refs * masks[..., None]) @ g.T).mean())
    nsd = 1.0 - float((embed_images(oc, refs * (1 - masks[..., None])) @ g.T).mean())
    assert base.sa == pytest.approx(sa, abs=1e-6) and base.nsd == pytest.approx(nsd, abs=1e-6)
    assert torch.equal(masked(refs, masks, inside=True)[:, :8], torch.zeros(2, 8, 32, 3))
    out = refs.clone()
    out[:, :8] = 1.0 - out[:, :8]  # outside the mask
    changed_out = score_images(oc, gen, "x", [_ref("cat", out, masks=masks)]).concepts[0]
    assert changed_out.sa == base.sa and changed_out.nsd != base.nsd
    inside = refs.clone()
    inside[:, 8:24, 4:20] = 1.0 - inside[:, 8:24, 4:20]
    changed_in = score_images(oc, gen, "x", [_ref("cat", inside, masks=masks)]).concepts[0]
    assert changed_in.sa != base.sa and changed_in.nsd == base.nsd
    assert changed_in.clip_i != base.clip_i  # CLIP-I reads the whole reference


def test_bad_input_is_refused_with_what_to_do(oc):
    from multiconcept.evaluation.scores import EvaluationError, boxes_for_images, score_images

    img = _images(1, 32, 32, 7)
    with pytest.raises(EvaluationError, match="no concept references"):
        score_images(oc, img, "x", [])
    with pytest.raises(EvaluationError, match="masks of 'cat' are 16x16 but its reference images are 32x32"):
        score_images(oc, img, "x", [_ref("cat", img, masks=torch.ones(1, 16, 16))])
    with pytest.raises(EvaluationError, match="'cat' is given to two"):
        score_images(oc, img, "x", [_ref("cat", img), _ref("cat", img)])
    with pytest.raises(EvaluationError, match="'dog' has no box in the regions"):
        score_images(oc, img, "x", [_ref("dog", img)], {"cat": (0, 0, 8, 8)})
    with pytest.raises(EvaluationError, match="not inside the 32x32 image"):
        score_images(oc, img, "x", [_ref("cat", img)], {"cat": (0, 0, 40, 8)})
    with pytest.raises(EvaluationError, match="NaN"):
        score_images(oc, img * float("nan"), "x", [_ref("cat", img)])
    with pytest.raises(EvaluationError, match="another aspect ratio"):
        boxes_for_images({"cat": (0, 0, 32, 32)}, (64, 64), (128, 64))
    # an upscale keeps each box on the same content
    assert boxes_for_images({"cat": (8.0, 4.0, 24.5, 30.0)}, (64, 64), (128, 128)) == {"cat": (16, 8, 49, 60)}
    empty = score_images(oc, img, "  ", [_ref("cat", img)])
    assert empty.clip_t is None and "no prompt" in empty.notes[0]


def test_loader_reads_the_open_clip_and_openai_layouts_and_refuses_other_files(tmp_path, oc):
    from safetensors.torch import save_file

    from multiconcept.evaluation.open_clip_model import load_open_clip
    from multiconcept.evaluation.scores import embed_images
    from multiconcept.formats.open_clip import OpenClipFileError
    from tests.support.builders.open_clip import build_tiny_open_clip, save_tiny_open_clip

    img = _images(2, 40, 40, 8)
    # a training checkpoint ({"state_dict": {"module.*": ...}}) with its config beside it: the same model
    ckpt = load_open_clip(save_tiny_open_clip(tmp_path / "a" / "epoch_3.pt", seed=3, torch_format=True))
    assert torch.allclose(embed_images(ckpt, img), embed_images(oc, img), atol=1e-6)
    # OpenAI layout, no config: the architecture read from the shapes, QuickGELU
    openai = load_open_clip(save_tiny_open_clip(tmp_path / "b" / "openai.safetensors", seed=4, openai_layout=True))
    reference = build_tiny_open_clip(seed=4, quick_gelu=True)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(openai.model.encode_image(x), reference.encode_image(x), atol=1e-5)
    assert openai.architecture.startswith("auto (OpenAI")
    # the Hub's open_clip_config.json beside open_clip_model.safetensors
    hub = tmp_path / "hub"
    save_tiny_open_clip(hub / "open_clip_model.safetensors", seed=3)
    (hub / "open_clip_model.json").rename(hub / "open_clip_config.json")
    assert torch.allclose(embed_images(load_open_clip(hub / "open_clip_model.safetensors"), img), embed_images(oc, img))
    # not an open_clip file: an SD-like checkpoint
    sd_like = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(sd_like))
    with pytest.raises(OpenClipFileError, match="not an open_clip checkpoint: it has no image tower"):
        load_open_clip(sd_like)
    # the wrong architecture: named, with what does not fit
    with pytest.raises(OpenClipFileError, match="does not fit the architecture ViT-B-32: .*another shape"):
        load_open_clip(tmp_path / "b" / "openai.safetensors", "ViT-B-32")
    # open_clip weights without a config under auto: asks for the architecture
    save_tiny_open_clip(tmp_path / "c" / "laion.safetensors", seed=3)
    (tmp_path / "c" / "laion.json").unlink()
    sd = {k: v for k, v in build_tiny_open_clip(3).state_dict().items() if k != "visual.proj"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "c" / "laion.safetensors"))
    with pytest.raises(OpenClipFileError, match="Pick its architecture in the node"):
        load_open_clip(tmp_path / "c" / "laion.safetensors")
    # NaN weights, a TorchScript archive, a cut-short file, a pickle that needs code
    bad = {k: v.clone() for k, v in build_tiny_open_clip(3).state_dict().items()}
    bad["visual.proj"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(OpenClipFileError, match="NaN"):
        load_open_clip(tmp_path / "nan.safetensors", "auto")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(OpenClipFileError, match="TorchScript archive"):
        load_open_clip(tmp_path / "ViT-B-32.pt")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "nan.safetensors").read_bytes()[:300])
    with pytest.raises(OpenClipFileError, match="truncated or corrupt"):
        load_open_clip(tmp_path / "cut.safetensors")
    torch.save({"state_dict": {"visual.x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "code.pt")
    with pytest.raises(OpenClipFileError, match="needs pickle code execution"):
        load_open_clip(tmp_path / "code.pt")


def test_table_json_and_chart(oc):
    from multiconcept.evaluation.report import chart_image, markdown_table, scores_json
    from multiconcept.evaluation.scores import score_images

    img = _images(1, 32, 32, 9)
    masks = torch.ones(1, 32, 32)
    masks[:, :8] = 0
    runs = [score_images(oc, img, "a cat", [_ref("cat", img, masks=masks, class_word="cat")], run="A"),
            score_images(oc, img * 0.5, "a cat", [_ref("cat", img, masks=masks)], run="B")]  # fmt: skip
    table = markdown_table(runs)
    assert f"| A | cat | {100 * runs[0].concepts[0].clip_i:.2f} |" in table
    assert f"| B | **mean** | **{100 * runs[1].clip_i:.2f}** | **{100 * runs[1].clip_t:.2f}** |" in table
    data = json.loads(scores_json(runs))
    assert [r["run"] for r in data["runs"]] == ["A", "B"]
    assert data["runs"][0]["concepts"][0]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert data["runs"][1]["sa"] == pytest.approx(runs[1].concepts[0].sa)
    chart = chart_image(runs)
    assert chart.shape == (1, 400, 768, 3) and chart.min() >= 0 and chart.max() <= 1
    assert chart.std() > 0.05  # bars and text drawn, not a blank canvas
    colours = {tuple(p) for p in (chart[0].reshape(-1, 3) * 255).round().int().unique(dim=0).tolist()}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # a bar of each run
