"""Gradient fusion maths on small random layers: the closed form solves the normal equations, matches L-BFGS,
keeps one concept exactly, beats the plain sum; moments accumulate XᵀX; the fused file round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from multiconcept.formats.fused import (
    FusedConceptInfo,
    FusedConcepts,
    FusedFileError,
    read_fused,
    write_fused,
)
from multiconcept.samplers.fusion.moments import MomentAccumulator, input_group, recording, rows_of
from multiconcept.samplers.fusion.solvers import (
    LayerProblem,
    closed_form,
    lbfgs,
    objective,
    plain_sum,
    relative_errors,
)


def _problem(n_concepts=2, out_f=6, in_f=5, rows=40, rank=2, seed=0, missing=()):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_f, in_f, generator=g)
    deltas, moments, counts = [], [], []
    for i in range(n_concepts):
        x = torch.randn(rows, in_f, generator=g) * torch.linspace(0.5, 2.0, in_f)
        moments.append(x.T @ x)
        counts.append(rows)
        if i in missing:
            deltas.append(None)
        else:
            deltas.append(0.3 * torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g))
    return LayerProblem(base=base.double(), deltas=[None if d is None else d.double() for d in deltas],
                        moments=[m.double() for m in moments], counts=counts)  # fmt: skip


def test_closed_form_satisfies_the_normal_equations():
    p = _problem(n_concepts=3)
    w = closed_form(p, ridge=0.0 + 1e-12)
    lhs = w @ sum(p.moments)
    rhs = sum((p.base + p.delta_or_zero(i)) @ c for i, c in enumerate(p.moments))
    assert torch.allclose(lhs, rhs, atol=1e-8 * float(rhs.abs().max()))
    # ...and it is the minimum: any perturbation raises the objective
    best = float(objective(p, w - p.base))
    for s in range(3):
        bump = 1e-3 * torch.randn(p.base.shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        assert float(objective(p, w - p.base + bump)) > best


def test_lbfgs_matches_closed_form_to_tolerance():
    p = _problem(n_concepts=2, seed=3)
    exact = closed_form(p)
    iterative = lbfgs(p, iters=200)
    assert torch.allclose(iterative.double(), exact, atol=1e-4, rtol=1e-4)
    assert float(objective(p, iterative.double() - p.base)) <= float(objective(p, exact - p.base)) * (1 + 1e-4)


def test_one_concept_gives_its_own_weight():
    p = _problem(n_concepts=1, seed=5)
    want = p.base + p.deltas[0]
    assert torch.equal(closed_form(p), want)
    assert torch.equal(lbfgs(p, iters=5), want)
    assert relative_errors(p, closed_form(p))[0] < 1e-6


def test_fused_beats_the_plain_sum_and_respects_concepts_without_lora():
    p = _problem(n_concepts=2, seed=7, missing=(1,))
    fused = closed_form(p)
    errs_fused = relative_errors(p, fused)
    errs_sum = relative_errors(p, plain_sum(p))
    # concept 1 has no LoRA here: the sum changes its outputs, the fusion keeps them closer to W0's
    assert errs_fused[1] < errs_sum[1]
    assert sum(errs_fused) < sum(errs_sum)


def test_directions_no_concept_reaches_stay_at_the_base():
    # inputs only in the first 3 of 5 dimensions: the last two columns of W must stay W0's
    g = torch.Generator().manual_seed(11)
    base = torch.randn(4, 5, generator=g, dtype=torch.float64)
    moments, deltas = [], []
    for _ in range(2):
        x = torch.zeros(30, 5, dtype=torch.float64)
        x[:, :3] = torch.randn(30, 3, generator=g, dtype=torch.float64)
        moments.append(x.T @ x)
        deltas.append(torch.randn(4, 5, generator=g, dtype=torch.float64))
    p = LayerProblem(base=base, deltas=deltas, moments=moments, counts=[30, 30])
    w = closed_form(p)
    assert torch.allclose(w[:, 3:], base[:, 3:], atol=1e-6)
    assert not torch.allclose(w[:, :3], base[:, :3], atol=1e-3)


def test_moments_accumulate_xtx_without_storing_inputs():
    lin = torch.nn.Linear(5, 3)
    conv = torch.nn.Conv2d(4, 2, 1)
    acc: dict = {}
    xs = [torch.randn(2, 7, 5) for _ in range(3)]
    ys = [torch.randn(1, 4, 3, 3) for _ in range(2)]
    with recording({"lin": lin, "conv": conv}, acc):
        for x in xs:
            lin(x)
        for y in ys:
            conv(y)
    lin(torch.randn(2, 7, 5))  # after the block: no hook any more
    rows = torch.cat([x.reshape(-1, 5) for x in xs])
    assert acc["lin"].count == rows.shape[0]
    assert torch.allclose(acc["lin"].moment, rows.T @ rows, atol=1e-5)
    crow = torch.cat([rows_of(y, conv) for y in ys])
    assert crow.shape == (18, 4)
    assert torch.allclose(acc["conv"].moment, crow.T @ crow, atol=1e-5)
    assert not lin._forward_pre_hooks and not conv._forward_pre_hooks


def test_recording_selects_rows_and_accumulator_skips_empty():
    lin = torch.nn.Linear(3, 3)
    acc: dict = {}
    x = torch.randn(2, 6, 3)
    with recording({"g": lin}, acc, select=lambda group, t: t[:, :2]):
        lin(x)
    rows = x[:, :2].reshape(-1, 3)
    assert acc["g"].count == 4 and torch.allclose(acc["g"].moment, rows.T @ rows, atol=1e-6)
    a = MomentAccumulator()
    a.add(torch.zeros(0, 3))
    assert a.moment is None and a.count == 0


def test_input_groups_share_qkv_and_context():
    assert input_group("input_blocks.1.1.transformer_blocks.0.attn1.to_q") == input_group(
        "input_blocks.1.1.transformer_blocks.0.attn1.to_v"
    )
    assert input_group("x.attn2.to_k") == input_group("x.attn2.to_v") == "x.attn2:context"
    assert input_group("x.attn2.to_q") == "x.attn2.to_q"
    assert input_group("clip_l.t.layers.0.self_attn.k_proj") == "clip_l.t.layers.0.self_attn:input"
    assert input_group("clip_l.t.layers.0.self_attn.out_proj") == "clip_l.t.layers.0.self_attn.out_proj"


def _fused(tmp_words=("<a1>", "<a2>")):
    g = torch.Generator().manual_seed(2)
    return FusedConcepts(
        fusion_id="abc123",
        base_model="sd15",
        unet={"diffusion_model.x.attn1.to_q.weight": torch.randn(4, 4, generator=g).half()},
        clip={"clip_l.transformer.q_proj.weight": torch.randn(3, 3, generator=g).half()},
        concepts=(
            FusedConceptInfo(
                "edlora",
                "a.pth",
                tmp_words,
                "cat",
                "left",
                0.7,
                0.6,
                {w: {"l": torch.randn(16, 8, generator=g)} for w in tmp_words},
            ),  # fmt: skip
            FusedConceptInfo("lora", "b.safetensors", ("sks",), "dog", "right", 1.0, 1.0, {}),
        ),
        solver="closed form",
        residuals=[{"layer": "k", "stage": "UNet", "fused": [0.1, 0.2], "sum": [0.3, 0.4]}],
        base_fingerprint={"k": 1.5},
    )


def test_fused_file_round_trip(tmp_path):
    fused = _fused()
    path = write_fused(fused, tmp_path / "f.safetensors")
    back = read_fused(path)
    assert back.fusion_id == "abc123" and back.base_model == "sd15" and back.solver == "closed form"
    for part in ("unet", "clip"):
        a, b = getattr(fused, part), getattr(back, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert [c.words for c in back.concepts] == [("<a1>", "<a2>"), ("sks",)]
    assert [c.label for c in back.concepts] == ["left", "right"]
    assert back.concepts[0].strength_unet == 0.7 and back.concepts[0].class_word == "cat"
    for w in ("<a1>", "<a2>"):
        assert torch.equal(back.concepts[0].embeddings[w]["l"], fused.concepts[0].embeddings[w]["l"])
    assert back.residuals == fused.residuals and back.base_fingerprint == {"k": 1.5}
    with pytest.raises(FusedFileError, match="never overwritten"):
        write_fused(fused, path)
    assert not list(tmp_path.glob("*.partial"))


def test_other_files_are_not_fused_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(FusedFileError, match="not a fused-concepts file"):
        read_fused(tmp_path / "l.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(FusedFileError):
        read_fused(tmp_path / "broken.safetensors")


def test_single_concept_readers_refuse_a_fused_file(tmp_path):
    from multiconcept.formats.edlora import EDLoRAFileError, read_edlora
    from multiconcept.formats.lora import read_lora_file
    from multiconcept.formats.weights import CheckpointFileError

    path = write_fused(_fused(), tmp_path / "fused.safetensors")
    with pytest.raises(EDLoRAFileError, match="Load Fused Concepts"):
        read_edlora(path)
    with pytest.raises(CheckpointFileError, match="Load Fused Concepts"):
        read_lora_file(path)


def _tampered(tmp_path, name, change_tensors=None, change_metadata=None):
    """A fused file written by write_fused's own layout, then changed as a damaged or hostile file would be."""
    from safetensors.torch import save_file

    from multiconcept.formats.fused import to_safetensors_dict

    tensors, metadata = to_safetensors_dict(_fused())
    if change_tensors:
        change_tensors(tensors)
    if change_metadata:
        change_metadata(metadata)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _first(prefix):
    return lambda tensors: next(k for k in tensors if k.startswith(prefix))


@pytest.mark.parametrize(
    ("case", "tensors", "metadata", "message"),
    [
        ("huge", lambda t: t.update({_first("unet.")(t): t[_first("unet.")(t)].float() + 1e30}), None,
         "far beyond any trained weight"),
        ("nan", lambda t: t.update({_first("clip.")(t): t[_first("clip.")(t)] * float("nan")}), None,
         "NaN or infinite"),
        ("integer", lambda t: t.update({_first("unet.")(t): torch.ones(4, 4, dtype=torch.int32)}), None,
         "int32 values, not floats"),
        ("scalar", lambda t: t.update({_first("unet.")(t): torch.tensor(0.5)}), None, "a single number"),
        ("flat_embedding", lambda t: t.update({_first("embedding.")(t): torch.zeros(8)}), None,
         "not \\[layers, width\\]"),
        ("family", None, lambda m: m.update(base_model="sd3"), "base_model is 'sd3', not one of sd15, sdxl"),
        ("concepts_string", None, lambda m: m.update(concepts=json.dumps("two concepts")),
         "'concepts' metadata is a str, not a list"),
        ("words_number", None, lambda m: m.update(concepts=json.dumps([{"kind": "lora", "words": 5}])),
         "concept 1's words are 5"),
        ("strength_text", None,
         lambda m: m.update(concepts=json.dumps([{"kind": "lora", "words": ["sks"], "strength_unet": "strong"}])),
         "'concepts' metadata is damaged"),
        ("strength_nan", None,
         lambda m: m.update(concepts=json.dumps([{"kind": "lora", "words": ["sks"], "strength_unet": "nan"}])),
         "strengths are \\(nan, 1.0\\)"),
    ],
)  # fmt: skip
def test_damaged_fused_files_are_refused_by_name(tmp_path, case, tensors, metadata, message):
    path = _tampered(tmp_path, case, tensors, metadata)
    with pytest.raises(FusedFileError, match=f"^{case}.safetensors: .*{message}"):
        read_fused(path)
