"""The trainer's pure parts on small tensors: captions, picture fitting, every loss against its formula, the
norm cap, the orthogonal basis, the trainable parameters' flat view and file conversion, resume states,
the loss-curve picture."""

from __future__ import annotations

import pytest
import torch

from multiconcept.training.captions import CaptionError, prepare_captions
from multiconcept.training.dataset import DatasetError, fit_images, fit_masks
from multiconcept.training.edlora_params import EDLoRAParameters, LoRADelta, initial_embeddings
from multiconcept.training.losses import (
    attention_outside_loss,
    cap_norm_,
    denoising_loss,
    keep_from_zero,
    orthogonal_basis,
    orthogonality_penalty,
)
from multiconcept.training.plots import loss_curve_image, moving_average
from multiconcept.training.state import StateError, load_state, restore_optimizer, save_state

# --------------------------------------------------------------------------------------------- captions


def test_captions_replace_the_placeholder_and_prepend_it_where_missing():
    c = prepare_captions("a photo of <TOK> on a sofa\n\n<tok> by a window\na dog in the park", 3, "<c1> <c2>")
    assert c.texts == ("a photo of <c1> <c2> on a sofa", "<c1> <c2> by a window", "<c1> <c2> a dog in the park")
    assert len(c.warnings) == 1 and "caption 3 has no <TOK>" in c.warnings[0]


def test_one_caption_serves_every_image_and_none_gives_a_default():
    assert prepare_captions("<TOK> smiling", 3, "<a>").texts == ("<a> smiling",) * 3
    c = prepare_captions("  \n ", 2, "<a>")
    assert c.texts == ("a photo of <a>",) * 2 and c.warnings
    assert prepare_captions("", 1, "<a>", default="<TOK>").texts == ("<a>",)


def test_caption_count_must_match_and_words_are_needed():
    with pytest.raises(CaptionError, match="2 caption lines for 3 images"):
        prepare_captions("one <TOK>\ntwo <TOK>", 3, "<a>")
    with pytest.raises(CaptionError, match="concept words are empty"):
        prepare_captions("<TOK>", 1, "  ")
    # replacement text is literal, never a regex template
    assert prepare_captions("<TOK>", 1, r"<a\1>").texts == (r"<a\1>",)


# --------------------------------------------------------------------------------------------- pictures


def test_fit_scales_the_short_side_and_crops_the_centre_and_masks_follow():
    img = torch.zeros(1, 80, 160, 3)
    img[:, :, 60:100] = 1.0  # a bright band in the middle of the wide picture
    out = fit_images(img, 64)
    assert out.shape == (1, 64, 64, 3)
    # 160 wide -> 128 wide, centre crop 32..96 of it: the band (48..80 scaled) sits at 16..48
    assert float(out[0, 32, 32, 0]) > 0.9 and float(out[0, 32, 4, 0]) < 0.1
    mask = (img[..., 0] > 0.5).float()
    m = fit_masks(mask, 1, (80, 160), 64)
    assert m.shape == (1, 64, 64)
    assert torch.allclose((m > 0.5).float(), (out[..., 0] > 0.5).float())


def test_pictures_too_small_or_masks_that_do_not_fit_are_refused():
    with pytest.raises(DatasetError, match="too small"):
        fit_images(torch.rand(1, 20, 40, 3), 64)
    with pytest.raises(DatasetError, match="no images"):
        fit_images(torch.zeros(0, 64, 64, 3), 64)
    with pytest.raises(DatasetError, match="3 subject masks for 2 images"):
        fit_masks(torch.ones(3, 64, 64), 2, (64, 64), 64)
    with pytest.raises(DatasetError, match="same pictures"):
        fit_masks(torch.ones(2, 64, 32), 2, (64, 64), 64)
    with pytest.raises(DatasetError, match="empty"):
        fit_masks(torch.zeros(2, 64, 64), 2, (64, 64), 64)


# ----------------------------------------------------------------------------------------------- losses


def test_denoising_loss_is_mix_of_shows_and_masked_loss_ignores_outside_pixels():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    # trainer_edlora.py l. 251-252 with a one-channel mask: the channels are summed, the pixels averaged
    assert torch.allclose(denoising_loss(pred, target), ((pred - target) ** 2).sum(1).mean())
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:6, 1:5] = 1.0
    masked = denoising_loss(pred, target, mask)
    official = ((pred - target) ** 2 * mask[:, None]).sum([1, 2, 3]) / mask[:, None].sum([1, 2, 3])
    assert torch.allclose(masked, official.mean())
    # change everything outside the mask: nothing changes
    pred2, target2 = pred.clone(), target.clone()
    outside = (mask == 0)[:, None].expand_as(pred)
    pred2[outside] = 100.0
    target2[outside] = -7.0
    assert torch.equal(denoising_loss(pred2, target2, mask), masked)
    # an empty mask counts as a full one
    assert torch.allclose(denoising_loss(pred, target, torch.zeros(2, 8, 8)), denoising_loss(pred, target))


def test_attention_loss_is_the_share_outside_and_zero_inside():
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :2] = 1.0
    inside = torch.zeros(1, 2, 4, 4)
    inside[0, 0, 0, 0], inside[0, 1, :2, :2] = 3.0, 0.25
    assert float(attention_outside_loss(inside, mask)) == pytest.approx(0.0, abs=1e-7)
    half = torch.zeros(1, 1, 4, 4)
    half[0, 0, 0, 0], half[0, 0, 3, 3] = 1.0, 1.0
    assert float(attention_outside_loss(half, mask)) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(1)
    maps, m = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 4, 4, generator=g)
    a = maps.flatten(2) / maps.flatten(2).sum(-1, keepdim=True)
    expected = (a * (1 - m.flatten(1))[:, None]).sum(-1).mean()
    assert torch.allclose(attention_outside_loss(maps, m), expected)


def test_orthogonality_penalty_equals_its_formula():
    g = torch.Generator().manual_seed(2)
    new = [torch.randn(4, 10, generator=g), torch.randn(4, 6, generator=g)]
    old = [[torch.randn(3, 10, generator=g), torch.randn(4, 10, generator=g)], [torch.randn(2, 6, generator=g)]]
    expected = sum(((a @ b.T) ** 2).sum() for a, bs in zip(new, old, strict=True) for b in bs)
    assert torch.allclose(orthogonality_penalty(new, old), expected)
    # rows orthogonal to the earlier ones: zero
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    assert float(orthogonality_penalty([q[:, :4].T], [[q[:, 4:7].T]])) == pytest.approx(0.0, abs=1e-10)
    assert float(orthogonality_penalty([q[:, :4].T], [[]])) == 0.0
    assert torch.allclose(keep_from_zero([torch.zeros(2, 3), torch.ones(1, 4)]), torch.tensor(6 / 10))


def test_orthogonal_basis_avoids_earlier_rows_and_fails_when_full():
    g = torch.Generator().manual_seed(3)
    earlier = [torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g)]
    rows = orthogonal_basis(4, 12, earlier, g, scale=2.0)
    assert rows.shape == (4, 12)
    assert torch.allclose(rows @ rows.T, 4.0 * torch.eye(4), atol=1e-5)
    for e in earlier:
        assert float((rows @ e.T).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="no room"):
        orthogonal_basis(5, 12, earlier, g, scale=1.0)


def test_norm_cap_scales_only_long_rows():
    emb = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    cap_norm_(emb, 1.0)
    assert torch.allclose(emb, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


# ---------------------------------------------------------------------------------- parameters, states


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    init = initial_embeddings(("<a1>", "<a2>"), torch.full((8,), 0.5), 3, g)
    init = {w: {"l": rows} for w, rows in init.items()}
    return EDLoRAParameters(("<a1>", "<a2>"), init, {"l": {"text_model.encoder.layers.0.self_attn.q_proj": (8, 8)}},
                            {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (6, 5)},
                            {"unet": 2, "l": 2}, g)  # fmt: skip


def _rates(embedding=1e-3, text=1e-5, unet=1e-4):
    return {"embedding_l": embedding, "text_l": text, "unet": unet}


def test_initialisation_follows_mix_of_show():
    p = _params()
    assert torch.equal(p.embedding("<a2>"), torch.full((3, 8), 0.5))  # the last word: the class word, every layer
    first = p.embedding("<a1>")
    assert 0.001 < float(first.std()) < 0.05  # the others: small noise...
    assert torch.equal(first, first[:1].expand(3, -1))  # ...one vector copied to every layer
    for _m, lora in p.text_items() + p.unet_items():
        assert float(lora.up.abs().max()) == 0.0  # training starts from the base model exactly
    w = torch.randn(6, 5)
    lora = p.unet_items()[0][1]
    assert torch.equal(lora(w), w)


def test_flat_view_round_trips_and_converts_to_the_file_format():
    p, q = _params(0), _params(1)
    with torch.no_grad():
        for t in p.flat().values():
            t.add_(0.1)
    q.load_flat(p.flat())
    assert all(torch.equal(a, b) for a, b in zip(p.flat().values(), q.flat().values(), strict=True))
    w = p.to_weights("cat", "sd15")
    assert w.words == ("<a1>", "<a2>") and w.class_word == "cat"
    pair = w.unet_lora["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    lora = p.unet_items()[0][1]
    assert torch.allclose(pair.delta(), lora.delta().detach())
    assert "text_encoder" in w.text_encoder_lora
    assert p.to_weights("cat", "sd15", include_text=False).text_encoder_lora == {}


def test_resume_state_round_trips_and_refuses_another_run(tmp_path):
    p = _params()
    opt = torch.optim.AdamW(p.param_groups(_rates()))
    for _ in range(2):
        opt.zero_grad()
        sum((t**2).sum() for t in p.flat().values() if t.requires_grad).backward()
        opt.step()
    ident = {"model": "abc", "concept_words": ["<a1>", "<a2>"]}
    path = save_state(str(tmp_path / "s.state.safetensors"), p.flat(), opt, 2, ident, {"steps": 5}, [0.5, 0.4])
    st = load_state(path, ident)
    assert st["step"] == 2 and st["losses"] == [0.5, 0.4]
    q = _params(5)
    opt2 = torch.optim.AdamW(q.param_groups(_rates()))
    q.load_flat(st["params"])
    restore_optimizer(opt2, st)
    assert all(torch.equal(a, b) for a, b in zip(p.flat().values(), q.flat().values(), strict=True))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    with pytest.raises(StateError, match="another training run.*model"):
        load_state(path, {**ident, "model": "xyz"})
    (tmp_path / "junk.state.safetensors").write_bytes(b"not a state")
    with pytest.raises(StateError, match="not a readable training state"):
        load_state(str(tmp_path / "junk.state.safetensors"), ident)


def test_loss_curve_is_a_picture_with_range():
    img = loss_curve_image([1.0, 0.8, 0.9, 0.5, 0.4, float("nan"), 0.3])
    assert img.shape == (1, 360, 640, 3) and float(img.max() - img.min()) > 0.5
    assert moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    assert loss_curve_image([]).shape == (1, 360, 640, 3)


# ---------------------------------------------------------------------------------------- the loop


class _FakeTrainer:
    """What training.loop.train needs of a trainer: one weight, a loss per row computed in float16 whose
    gradient (``tiny`` per entry) is below float16's smallest number unless the loss is scaled."""

    def __init__(self, accumulation=1, scaled=False, tiny=1e-8):
        from types import SimpleNamespace

        self.settings = SimpleNamespace(steps=1, batch_size=4, accumulation=accumulation, as_dict=lambda: {})
        self.w = torch.nn.Parameter(torch.ones(3))
        self.params = SimpleNamespace(flat=lambda: {"w": self.w}, load_flat=lambda t: None)
        self.optimizer = torch.optim.SGD([self.w], lr=0.0)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        self.tiny, self.calls, self.released = tiny, [], 0
        self.rows = torch.arange(1.0, 5.0)  # row r's loss is (r + 1) * tiny * sum(w)

    def load(self):
        pass

    def base_frozen(self):
        import contextlib

        return contextlib.nullcontext()

    def snapshot(self):
        return {"w": self.w.detach().clone()}

    def loss(self, step, rows):
        self.calls.append(list(rows))
        # the float16 part's gradient is ``tiny`` (times the scale, when scaled) per entry
        return (self.w.half() * self.rows[rows].mean().half()).sum().float() * self.tiny, {"denoise": 0.0}

    def release(self):
        self.released += 1

    def before_step(self, step):
        pass

    def after_step(self, step):
        pass

    def extra_state(self):
        return {}


def test_loop_accumulates_micro_batches_to_the_whole_batchs_gradient():
    from multiconcept.training.loop import micro_batches, train

    whole, split = _FakeTrainer(tiny=1e-3), _FakeTrainer(accumulation=2, tiny=1e-3)
    train(whole, save_states=False)
    train(split, save_states=False)
    assert whole.calls == [[0, 1, 2, 3]] and split.calls == [[0, 1], [2, 3]] and split.released == 2
    assert torch.allclose(whole.w.grad, split.w.grad, rtol=2e-3)  # (the loss is float16 here)
    assert micro_batches([4, 5, 6, 7, 8, 9], 3) == [[4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="cannot split"):
        micro_batches([0, 1, 2], 2)


def test_loop_scales_a_float16_loss_so_small_gradients_survive():
    from multiconcept.training.loop import train

    plain, scaled = _FakeTrainer(), _FakeTrainer(scaled=True)
    train(plain, save_states=False)
    train(scaled, save_states=False)
    exact = float(plain.rows.mean()) * 1e-8
    assert float(plain.w.grad.abs().max()) == 0.0  # 1e-8 rounds to 0 in float16: the update is lost
    assert torch.allclose(scaled.w.grad, torch.full((3,), exact), rtol=0.05)  # unscaled back to float32


def test_a_lora_branch_stays_float32_inside_an_autocast_region():
    # mixed precision: the layer runs in half precision under autocast, its LoRA branch in float32 all the same
    g = torch.Generator().manual_seed(0)
    lora = LoRADelta(6, 5, 2, g)
    with torch.no_grad():
        lora.up.copy_(torch.randn(6, 2, generator=g))
    x = torch.randn(3, 5, generator=g)
    exact = lora.branch(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ torch.randn(5, 5)).dtype == torch.bfloat16  # (autocast is on: a plain matmul is bfloat16)
        inside = lora.branch(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, exact)
