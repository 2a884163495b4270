"""ComfyUI's attention under the pack's replace patches: a call that batches more than one CFG pair (OMG's
stage 2) is computed in slices of one pair's rows when the kernel holds the score matrix, with the same
result; fused kernels and other packs' patches get the whole batch."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture()
def patches(comfy):
    return comfy.pack_module("samplers.attention_patches")


def _recording(monkeypatch, name, calls):
    attention = importlib.import_module("comfy.ldm.modules.attention")
    real = attention.attention_sub_quad

    def kernel(q, k, v, heads, **kw):
        calls.append(q.shape[0])
        return real(q, k, v, heads, **kw)

    kernel.__name__ = name
    monkeypatch.setattr(attention, "optimized_attention", kernel)
    return real


def _qkv(rows, tokens=64, width=32):
    g = torch.Generator().manual_seed(rows)
    return [torch.randn(rows, tokens, width, generator=g) for _ in range(3)]


def test_a_six_row_call_is_three_pair_slices_with_the_same_result(comfy, patches, monkeypatch):
    calls = []
    real = _recording(monkeypatch, "attention_sub_quad", calls)
    q, k, v = _qkv(6)
    options = {"n_heads": 4, "cond_or_uncond": [0, 1, 0, 1, 0, 1]}
    out = patches.chained_attention(None, q, k, v, options)
    assert calls == [2, 2, 2]
    whole = real(q, k, v, 4)
    assert float(whole.std()) > 0.01
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)


def test_a_latent_batch_of_two_slices_by_four_rows(comfy, patches, monkeypatch):
    calls = []
    _recording(monkeypatch, "attention_split", calls)
    q, k, v = _qkv(12)
    patches.chained_attention(None, q, k, v, {"n_heads": 4, "cond_or_uncond": [0, 1, 0, 1, 0, 1]})
    assert calls == [4, 4, 4]  # 2 rows per cond (a latent batch of 2), one pair = 4 rows


@pytest.mark.parametrize("kinds", [[0, 1], [0], None])
def test_a_plain_call_is_not_sliced(comfy, patches, monkeypatch, kinds):
    calls = []
    _recording(monkeypatch, "attention_sub_quad", calls)
    q, k, v = _qkv(2)
    patches.chained_attention(None, q, k, v, {"n_heads": 4, "cond_or_uncond": kinds})
    assert calls == [2]


def test_fused_kernels_and_other_packs_patches_get_the_whole_batch(comfy, patches, monkeypatch):
    calls = []
    _recording(monkeypatch, "attention_pytorch", calls)
    q, k, v = _qkv(6)
    options = {"n_heads": 4, "cond_or_uncond": [0, 1, 0, 1, 0, 1]}
    patches.chained_attention(None, q, k, v, options)
    assert calls == [6]
    seen = []
    patches.chained_attention(lambda q, k, v, o: seen.append(q.shape[0]) or q, q, k, v, options)
    assert seen == [6]
