"""formats/weights.py: every kind of broken weights file gets a message that says what it is."""

from __future__ import annotations

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
