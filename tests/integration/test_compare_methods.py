"""benchmarks/compare_methods.py: on the random test checkpoint (``--quick`` demo) it runs every method of the
loaded pack and writes a table with a row per method, in Markdown and CSV, with finite numbers; a suite with a
missing weight file stops before sampling, naming the file and its folder."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from benchmarks import compare_methods as cm


@pytest.fixture(scope="module")
def demo(comfy, tiny_checkpoint_path, tmp_path_factory):
    """One ``--demo --quick`` run in this process (the session's checkpoint build is reused)."""
    out = tmp_path_factory.mktemp("compare_out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cm.main(["--demo", "--quick", "--out", str(out)])
    return code, out, printed.getvalue()


def _csv_rows(out) -> list[dict]:
    with open(out / "comparison.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_demo_writes_a_row_per_existing_method(comfy, demo):
    code, out, printed = demo
    assert code == 0, printed[-3000:]
    expected = [m.key for m in cm.available_methods(comfy.pack_node_ids, ("edlora",))]
    # every method of this pack is there (the list above is what the script derives from the loaded pack)
    assert expected == list(cm.METHOD_KEYS), expected
    rows = _csv_rows(out)
    assert [r["key"] for r in rows] == expected
    assert all(r["error"] == "" for r in rows), [(r["key"], r["error"]) for r in rows if r["error"]]
    for r in rows:
        for col in ("P1 CLIP-I", "P1 CLIP-T", "avg CLIP-I", "avg CLIP-T"):
            v = float(r[col])
            assert math.isfinite(v) and -100 <= v <= 100, (r["key"], col, v)
        assert float(r["P1 CLIP-I"]) == pytest.approx(float(r["avg CLIP-I"]))  # one prompt: its average
        ratio, seconds = float(r["time x plain"]), float(r["run s"])
        assert math.isfinite(ratio) and ratio > 0 and seconds > 0, r
    by_key = {r["key"]: r for r in rows}
    assert float(by_key["plain"]["time x plain"]) == 1.0 and by_key["plain"]["locality"] == ""
    leaks = {k: float(r["locality"]) for k, r in by_key.items() if k != "plain"}
    assert all(math.isfinite(v) and v >= 0 for v in leaks.values()), leaks
    # locality is measured, not just filled in: merged LoRAs act everywhere, Regional LoRA and Mix-of-Show scope
    # the adapter to its box (on this random network about 0.9 vs 0.4-0.6; tests/integration/test_scoped_lora.py)
    assert leaks["merged"] > 0.6, leaks
    assert leaks["regional_lora"] < 0.8 * leaks["merged"] and leaks["mixofshow"] < 0.8 * leaks["merged"], leaks


def test_demo_markdown_says_the_numbers_mean_nothing(demo):
    code, out, printed = demo
    text = (out / "comparison.md").read_text()
    assert cm.DEMO_NOTE in text and text in printed
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method | P1 CLIP-I | P1 CLIP-T | avg CLIP-I | avg CLIP-T | time x plain")
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == [m.title for m in cm.METHODS]
    assert "(failed)" not in text


def test_demo_ends_with_one_figure_per_line(demo):
    code, out, printed = demo
    lines = printed.strip().splitlines()
    figures = []
    for line in reversed(lines):
        if not line.startswith('{"metric"'):
            break
        figures.append(json.loads(line))
    names = {f["metric"]: f["value"] for f in figures}
    for key in cm.METHOD_KEYS:
        if key != "plain":
            assert (
                math.isfinite(names[f"compare_demo_{key}_time_ratio"]) and names[f"compare_demo_{key}_time_ratio"] > 0
            )
            assert math.isfinite(names[f"compare_demo_{key}_locality"])
        assert f"compare_demo_{key}_clip_i" in names and f"compare_demo_{key}_clip_t" in names
    assert "compare_demo_peak_rss" in names


def test_demo_images_are_pictures(demo):
    code, out, printed = demo
    files = sorted((out / "comparison_images").glob("*.png"))
    assert [f.name for f in files] == sorted(f"{k}_p1_seed0.png" for k in cm.METHOD_KEYS)
    pixels = {f.stem: np.asarray(Image.open(f), dtype=np.float32) for f in files}
    for name, p in pixels.items():
        assert p.shape == (cm.QUICK_DEMO_SIZE[1], cm.QUICK_DEMO_SIZE[0], 3) and p.std() > 3, (name, p.std())
    # the concepts change the picture: no method gives plain sampling's image (OMG least: at 2 steps it blends
    # the concepts into the last step only, a mean change of about 0.1 of 255)
    for name, p in pixels.items():
        if not name.startswith("plain"):
            assert np.abs(p - pixels["plain_p1_seed0"]).mean() > 0.02, name


def test_a_method_whose_node_is_missing_has_no_row(comfy):
    ids = set(comfy.pack_node_ids) - {"MultiConceptOMG", "MultiConceptLoadFusedConcepts"}
    keys = [m.key for m in cm.available_methods(ids, ("edlora",))]
    assert "omg" not in keys and "fusion" not in keys and "mixofshow" in keys and "plain" in keys
    no_stack = [m.key for m in cm.available_methods(set(ids) - {"MultiConceptStackEDLoRA"}, ("edlora",))]
    assert no_stack == ["plain", "merged"]  # every concept method reads the stack


def _suite(tmp_path, **changes) -> dict:
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(refs / "a.png")
    suite = {
        "checkpoint": "mc_tiny_sd15.safetensors",
        "clip": {"file": "nowhere_open_clip.safetensors"},
        "concepts": [{"label": "man", "file": "compare_missing.pth", "class_word": "man", "references": "refs"}],
        "prompts": [{"prompt": "a man", "boxes": [{"label": "man", "x": 0.1, "y": 0.1, "w": 0.5, "h": 0.8}]}],
        "steps": 2,
        "size": 64,
    }
    suite.update(changes)
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    return suite


def _run(args) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cm.main(args)
    return code, printed.getvalue()


def test_missing_weights_are_named_with_their_folder(comfy, tiny_checkpoint_path, tmp_path):
    _suite(tmp_path, checkpoint="compare_no_such_checkpoint.safetensors")
    code, printed = _run(["--suite", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "checkpoint 'compare_no_such_checkpoint.safetensors' not found: put it in models/checkpoints" in printed
    _suite(tmp_path)
    code, printed = _run(["--suite", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2 and "'compare_missing.pth' not found: put it in models/loras" in printed
    (comfy.models_dir / "loras" / "compare_missing.pth").write_bytes(b"")  # found, so the CLIP is next
    try:
        code, printed = _run(["--suite", str(tmp_path), "--out", str(tmp_path / "out")])
    finally:
        (comfy.models_dir / "loras" / "compare_missing.pth").unlink()
    assert (
        code == 2 and "open_clip file 'nowhere_open_clip.safetensors' not found: put it in models/open_clip" in printed
    )
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompts": [{"prompt": "a man", "boxes": [{"label": "man", "x": 0.7, "y": 0, "w": 0.5, "h": 1}]}]},
         "prompt 1 box 1: the box must have a size and lie inside the image"),
        ({"prompts": [{"prompt": "a cat", "boxes": [{"label": "cat", "x": 0, "y": 0, "w": 1, "h": 1}]}]},
         "prompt 1: no box carries a concept's label"),
        ({"methods": ["plain", "magic"]}, "unknown methods ['magic']"),
        ({"size": 100}, "suite width is 100; it must be at least 64 and a multiple of 8"),
        ({"concepts": [{"label": "man", "file": "x.pth", "references": "refs"}]}, "concept 1 ('man'): 'class_word' is missing"),
    ],
)  # fmt: skip
def test_bad_suites_say_what_to_fix(tmp_path, change, message):
    _suite(tmp_path, **change)
    with pytest.raises(cm.SuiteError, match=re.escape(message)):
        cm.load_suite(tmp_path)


def test_merged_prompt_puts_words_before_class_words():
    pairs = [("<man1> <man2>", "man"), ("<dog1> <dog2>", "dog"), ("rdchr", "chair")]
    assert cm.with_words("a man and a dog in a garden", pairs) == (
        "a <man1> <man2> man and a <dog1> <dog2> dog in a garden, rdchr chair"
    )
    # a class word inside another word is not a mention; inserted words are not searched again
    assert cm.with_words("a woman and a man", [("<man1>", "man")]) == "a woman and a <man1> man"
