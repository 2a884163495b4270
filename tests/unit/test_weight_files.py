"""formats/weights.py: every kind of broken weights file gets a message that says what it is."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from multiconcept.formats.weights import CheckpointFileError, check_weight_tensor, read_tensor_file


class _TouchOnLoad:
    """Unpickling this creates a file: proves the reader never executes pickle code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_reads_torch_and_safetensors_files(tmp_path):
    data = {"a": torch.randn(3, 4), "b": {"c": torch.ones(2)}}
    torch.save(data, tmp_path / "w.pth")
    content, meta, kind = read_tensor_file(tmp_path / "w.pth")
    assert kind == "torch" and meta == {} and torch.equal(content["a"], data["a"])
    save_file({"x": torch.arange(6.0).reshape(2, 3)}, tmp_path / "w.safetensors", metadata={"k": "v"})
    content, meta, kind = read_tensor_file(tmp_path / "w.safetensors")
    assert kind == "safetensors" and meta == {"k": "v"} and content["x"][1, 2] == 5


def test_safetensors_under_a_pth_name_is_read_as_safetensors(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "renamed.pth")
    content, _, kind = read_tensor_file(tmp_path / "renamed.pth")
    assert kind == "safetensors" and torch.equal(content["x"], torch.ones(2))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_file_says_empty(tmp_path, suffix):
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(CheckpointFileError, match=r"empty\.\w+ is empty \(0 bytes\).*did not finish"):
        read_tensor_file(tmp_path / f"empty{suffix}", what="SAM checkpoint")


@pytest.mark.parametrize(
    "payload, words",
    [
        (bytes(range(7, 71)), "starts with the bytes 07 08 09"),
        (b"<!DOCTYPE html><html>404</html>", "starts with the text '<!DOCTYPE h"),
        (b"version https://git-lfs.github.com/spec/v1\n", "starts with the text 'version http"),
    ],
)
def test_random_bytes_are_not_called_unsafe(tmp_path, payload, words):
    (tmp_path / "junk.pth").write_bytes(payload)
    with pytest.raises(CheckpointFileError) as e:
        read_tensor_file(tmp_path / "junk.pth")
    message = str(e.value)
    assert "is not a PyTorch or safetensors file" in message and words in message
    assert "pickle code" not in message and "safety" not in message


def test_pickle_needing_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    torch.save({"x": _TouchOnLoad(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointFileError, match="needs pickle code execution.*refused for safety"):
        read_tensor_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_legacy_pickle_with_a_bad_opcode_is_corrupt_not_unsafe(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02" + b"\xff" * 30)
    with pytest.raises(CheckpointFileError, match="truncated or corrupt") as e:
        read_tensor_file(tmp_path / "bad.pt")
    assert "safety" not in str(e.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_files_are_corrupt(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    tensors = {"w": torch.randn(64, 64)}
    if suffix == ".pth":
        torch.save(tensors, full)
    else:
        save_file(tensors, full)
    raw = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointFileError, match="cut.* could not be read.*truncated or corrupt"):
        read_tensor_file(cut)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointFileError, match="was not found"):
        read_tensor_file(tmp_path / "nope.pth")


def test_weight_checks():
    assert check_weight_tensor(torch.ones(2, 2), "w") is not None
    for bad, words in [
        (torch.tensor([1.0, float("nan")]), "1 NaN or infinite"),
        (torch.tensor([1.0, float("inf"), -float("inf")]), "2 NaN or infinite"),
        (torch.tensor([3.0e6]), r"values up to 3e\+06"),
        (torch.ones(2, dtype=torch.int64), "holds int64 values, not floats"),
        (torch.ones(0, 4), "is empty"),
        ([1.0, 2.0], "is a list, not a tensor"),
    ]:
        with pytest.raises(CheckpointFileError, match=words):
            check_weight_tensor(bad, "unet.x.lora_up")


# ------------------------------------------------------------------------------------ writing (issue 26)


def _victim(tmp_path):
    """A file outside the output folder that a planted link points at; it must never change."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "user_file.txt"
    victim.write_text("the user's own file")
    return victim


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") and not p.is_symlink())


def test_written_files_read_back_and_leave_no_temporary_file(tmp_path):
    from multiconcept.formats.weights import write_safetensors

    out = tmp_path / "out"
    out.mkdir()
    path = write_safetensors(out / "a.safetensors", {"w": torch.arange(6.0).reshape(2, 3)}, {"k": "v"})
    content, metadata, _ = read_tensor_file(path)
    assert torch.equal(content["w"], torch.arange(6.0).reshape(2, 3)) and metadata["k"] == "v"
    assert _leftovers(out) == []
    with pytest.raises(FileExistsError, match="already exists"):
        write_safetensors(path, {"w": torch.zeros(1)}, {})
    assert torch.equal(read_tensor_file(path)[0]["w"], torch.arange(6.0).reshape(2, 3))  # untouched
    with pytest.raises(ValueError):  # safetensors refuses a non-contiguous tensor mid-write
        write_safetensors(out / "b.safetensors", {"w": torch.zeros(3, 3).t()[:, :2]}, {})
    assert not (out / "b.safetensors").exists() and _leftovers(out) == []


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this system")
def test_links_planted_at_the_name_or_its_partial_are_never_written_through(tmp_path):
    from multiconcept.formats.weights import write_safetensors

    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    tensors = {"w": torch.ones(2, 2)}
    # a link at the target name, live or dangling, is something that exists: refused, nothing written
    (out / "live.safetensors").symlink_to(victim)
    (out / "dangling.safetensors").symlink_to(tmp_path / "outside" / "new_file")
    for name in ("live.safetensors", "dangling.safetensors"):
        with pytest.raises(FileExistsError):
            write_safetensors(out / name, tensors, {})
        assert (out / name).is_symlink()
    assert not (tmp_path / "outside" / "new_file").exists()
    # a link at <name>.partial (where a writer might put its temporary file) is never opened
    (out / "a.safetensors.partial").symlink_to(victim)
    (out / ".a.safetensors.partial").symlink_to(victim)
    write_safetensors(out / "a.safetensors", tensors, {})
    assert read_tensor_file(out / "a.safetensors")[0]["w"].sum() == 4
    # overwrite (the training state): the link itself is replaced by the file, its target is untouched
    (out / "state.safetensors").symlink_to(victim)
    write_safetensors(out / "state.safetensors", tensors, {}, overwrite=True)
    assert not (out / "state.safetensors").is_symlink()
    assert victim.read_text() == "the user's own file"
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["user_file.txt"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this system")
def test_the_pack_writers_go_through_the_safe_writer(tmp_path):
    """ED-LoRA files (Train ED-LoRA, Convert), fused files (Fuse Concepts) and training states."""
    from multiconcept.formats.edlora import EDLoRAFileError, read_edlora, write_edlora_safetensors
    from multiconcept.formats.fused import FusedConceptInfo, FusedConcepts, FusedFileError, read_fused, write_fused
    from multiconcept.training.state import save_state
    from tests.support.builders.edlora import save_official_edlora

    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    save_official_edlora(tmp_path / "src.pth", seed=4)
    weights = read_edlora(str(tmp_path / "src.pth"))
    fused = FusedConcepts(fusion_id="f1", base_model="sd15", unet={"diffusion_model.x.weight": torch.ones(2, 2)},
                          clip={}, concepts=(FusedConceptInfo("lora", "a.safetensors", ("sks",), "dog", "", 1.0, 1.0, {}),), solver="closed form", residuals=[], base_fingerprint={})  # fmt: skip
    for name in ("taken.safetensors", "concept.safetensors", "fused.safetensors", "run.state.safetensors"):
        (out / f"{name}.partial").symlink_to(victim)
    (out / "taken.safetensors").symlink_to(victim)
    with pytest.raises(EDLoRAFileError, match="already exists"):
        write_edlora_safetensors(weights, out / "taken.safetensors")
    with pytest.raises(FusedFileError, match="already exists"):
        write_fused(fused, out / "taken.safetensors")
    assert read_edlora(write_edlora_safetensors(weights, out / "concept.safetensors")).words == weights.words
    assert read_fused(write_fused(fused, out / "fused.safetensors")).fusion_id == "f1"
    (out / "run.state.safetensors").symlink_to(victim)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    save_state(str(out / "run.state.safetensors"), {"p": param}, optimizer, 1, {"id": 1}, {}, [0.5])
    assert not (out / "run.state.safetensors").is_symlink()
    assert victim.read_text() == "the user's own file"
    assert _leftovers(out) == []
