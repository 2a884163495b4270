"""ED-LoRA files: official .pth, our .safetensors, conversion, and refusal of bad files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multiconcept.formats.edlora import EDLoRAFileError, read_edlora, write_edlora_safetensors
from tests.support.builders.edlora import official_edlora, save_official_edlora

PACK_ROOT = Path(__file__).resolve().parents[2]


def test_official_pth_loads_with_and_without_params_wrapper(tmp_path):
    data = official_edlora(words=("<dog1>", "<dog2>"), seed=3)
    wrapped, bare = tmp_path / "w.pth", tmp_path / "b.pth"
    torch.save(data, wrapped)
    torch.save(data["params"], bare)
    for path in (wrapped, bare):
        w = read_edlora(path)
        assert w.words == ("<dog1>", "<dog2>")
        assert w.base_model == "sd15" and w.layer_tokens == 16 and w.source_format == "mixofshow-pth"
        assert len(w.unet_lora) == 128 and len(w.text_encoder_lora["text_encoder"]) == 48
        emb = data["params"]["new_concept_embedding"]["<dog1>"]
        assert torch.equal(w.embeddings["<dog1>"]["l"], emb)
        pair = w.unet_lora["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
        src = data["params"]["unet"]
        assert torch.equal(pair.up, src["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_up.weight"])
        assert torch.allclose(pair.delta(), pair.up @ pair.down)


def test_safetensors_round_trip_keeps_words_order_and_metadata(tmp_path):
    src = tmp_path / "c.pth"
    save_official_edlora(src, words=("<zeta1>", "<alpha2>"), seed=1)
    w = read_edlora(src)
    from dataclasses import replace

    out = write_edlora_safetensors(replace(w, class_word="cat"), tmp_path / "c.safetensors")
    back = read_edlora(out)
    assert back.words == ("<zeta1>", "<alpha2>")  # order comes from metadata, not from key sorting
    assert back.class_word == "cat" and back.source_format == "safetensors"
    for word in w.words:
        assert torch.equal(back.embeddings[word]["l"], w.embeddings[word]["l"])
    for module, pair in w.unet_lora.items():
        assert torch.equal(back.unet_lora[module].up, pair.up) and torch.equal(back.unet_lora[module].down, pair.down)
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "multiconcept.edlora" and json.loads(meta["concept_words"]) == ["<zeta1>", "<alpha2>"]
    assert "new_concept_embedding.<zeta1>" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_up.weight" in keys
    assert "text_encoder.text_model.encoder.layers.11.self_attn.out_proj.lora_down.weight" in keys


def test_writer_never_overwrites(tmp_path):
    src = tmp_path / "c.pth"
    save_official_edlora(src)
    dst = tmp_path / "c.safetensors"
    dst.write_bytes(b"user data")
    with pytest.raises(EDLoRAFileError, match="already exists"):
        write_edlora_safetensors(read_edlora(src), dst)
    assert dst.read_bytes() == b"user data"


def test_renaming_words(tmp_path):
    src = tmp_path / "c.pth"
    save_official_edlora(src)
    w = read_edlora(src)
    r = w.with_words(["<a1>", "<a2>"])
    assert r.words == ("<a1>", "<a2>") and torch.equal(r.embeddings["<a1>"]["l"], w.embeddings["<cat1>"]["l"])
    with pytest.raises(EDLoRAFileError, match="2 concept word"):
        w.with_words(["<only>"])
    with pytest.raises(EDLoRAFileError, match="single word"):
        w.with_words(["<a 1>", "<a2>"])


def test_ordinary_lora_is_refused_with_pointer_to_stock_loader(tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, str(path))
    with pytest.raises(EDLoRAFileError, match="not an ED-LoRA.*ordinary LoRA.*Load LoRA"):
        read_edlora(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_refused(tmp_path, suffix):
    src = tmp_path / "x.pth"
    save_official_edlora(src)
    full = tmp_path / ("full" + suffix)
    if suffix == ".pth":
        full.write_bytes(src.read_bytes())
    else:
        write_edlora_safetensors(read_edlora(src), full)
    cut = tmp_path / ("cut" + suffix)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(EDLoRAFileError, match="truncated or corrupt"):
        read_edlora(cut)


class _Payload:
    """Pickles as 'call os.mkdir(sentinel)': loading it must never run that."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


def test_pickle_needing_code_execution_is_refused_and_not_run(tmp_path):
    sentinel = tmp_path / "was_executed"
    data = official_edlora()
    data["params"]["payload"] = _Payload(str(sentinel))
    path = tmp_path / "evil.pth"
    torch.save(data, path)
    with pytest.raises(EDLoRAFileError, match="pickle code execution.*refused"):
        read_edlora(path)
    assert not sentinel.exists()


def test_sdxl_edlora_is_recognised(tmp_path):
    path = tmp_path / "xl.pth"
    save_official_edlora(path, sdxl=True, unet_modules={}, te_modules={})
    w = read_edlora(path)
    assert w.base_model == "sdxl" and w.layer_tokens == 70 and w.clip_keys == ("g", "l")


def test_bad_shapes_and_halves_are_refused(tmp_path):
    data = official_edlora()
    data["params"]["new_concept_embedding"]["<cat1>"] = torch.zeros(16, 700)
    torch.save(data, tmp_path / "a.pth")
    with pytest.raises(EDLoRAFileError, match=r"expected \[layers, 768\]"):
        read_edlora(tmp_path / "a.pth")
    data = official_edlora()
    del data["params"]["unet"]["mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_up.weight"]
    torch.save(data, tmp_path / "b.pth")
    with pytest.raises(EDLoRAFileError, match="without a partner"):
        read_edlora(tmp_path / "b.pth")
    with pytest.raises(EDLoRAFileError, match="not found"):
        read_edlora(tmp_path / "missing.pth")


def test_cli_converts_and_refuses_to_overwrite(tmp_path):
    src = tmp_path / "concept.pth"
    save_official_edlora(src, words=("<p1>", "<p2>"))
    cmd = [sys.executable, "-m", "formats.convert_edlora", str(src), "--class-word", "man"]
    first = subprocess.run(cmd, cwd=PACK_ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "concept.safetensors"
    assert "words <p1> <p2>" in first.stdout and out.is_file()
    assert read_edlora(out).class_word == "man"
    before = out.read_bytes()
    second = subprocess.run(cmd, cwd=PACK_ROOT, capture_output=True, text=True)
    assert second.returncode == 2 and "already exists" in second.stderr
    assert out.read_bytes() == before
