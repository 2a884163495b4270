"""ED-LoRA training on the real test checkpoint: the loss goes down, only the concept's own parameters move,
the saved file reproduces the trained model through the loader and the concept stack, interrupt + resume is
exact, NaN keeps the last good state, plain sampling is untouched afterwards, bad input is refused."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from tests.support.tensors import changed_keys, state_dict_copy

RES = 64
WORDS = ("<tcat1>", "<tcat2>")
CAPTIONS = ["a photo of <tcat1> <tcat2> on a red rug", "a photo of <tcat1> <tcat2> by a window"]
NODE = "MultiConceptTrainEDLoRA"


@pytest.fixture(scope="module")
def base(comfy, tiny_models_shallow_clip):
    """The tiny checkpoint with a 3-layer CLIP-L (tests/conftest.py): a training step costs a quarter."""
    model, clip, vae = tiny_models_shallow_clip
    return model, clip, vae


@pytest.fixture(scope="module")
def tr(comfy):
    return {
        "trainer": comfy.pack_module("training.edlora_trainer"),
        "loop": comfy.pack_module("training.loop"),
        "state": comfy.pack_module("training.state"),
        "file": comfy.pack_module("formats.edlora"),
    }


def pictures(n=2, size=RES, seed=0):
    """Synthetic training pictures: a bright blob (the 'subject') on a textured background."""
    g = torch.Generator().manual_seed(seed)
    imgs = 0.3 + 0.1 * torch.rand(n, size, size, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size)
    for i in range(n):
        cy, cx = size * (0.4 + 0.2 * i), size * 0.5
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (size * 0.25) ** 2
        imgs[i][blob] = torch.tensor([0.9, 0.6, 0.2])
        masks[i] = blob.float()
    return imgs, masks


def settings(tr, **kw):
    args = dict(concept_words=WORDS, class_word="cat", steps=6, lr_embedding=5e-3, lr_text=1e-4, lr_unet=1e-3,
                rank=4, batch_size=1, seed=7, resolution=RES)  # fmt: skip
    args.update(kw)
    return tr["trainer"].TrainSettings(**args)


def make(tr, base, masks=None, **kw):
    model, clip, vae = base
    imgs, _ = pictures()
    return tr["trainer"].EDLoRATrainer(model, clip, vae, imgs, CAPTIONS, settings(tr, **kw), masks)


def probe_loss(trainer, steps=(0, 1, 2)):
    """The loss on the draws of the given steps (pictures, timesteps, noise), without gradients."""
    with torch.no_grad():
        return sum(float(trainer.loss(k)[0]) for k in steps) / len(steps)


def weights_of(patcher):
    return state_dict_copy(patcher.model)


def has_range(t):
    return bool(torch.isfinite(t).all()) and float(t.max() - t.min()) > 1e-3


# ------------------------------------------------------------------------------------------ learning


def test_short_run_lowers_the_loss_and_moves_only_the_concept(tr, base):
    model, clip, _ = base
    unet_before, clip_before = weights_of(model), weights_of(clip.patcher)
    flags = [p.requires_grad for p in model.model.parameters()]
    trainer = make(tr, base, steps=3, batch_size=2, lr_unet=3e-3, lr_embedding=1e-2)
    initial = {k: v.detach().clone() for k, v in trainer.params.flat().items()}
    trainer.load()
    before = probe_loss(trainer)
    result = tr["loop"].train(trainer, save_states=False)
    after = probe_loss(trainer)
    assert result.status == "done" and len(result.losses) == 3
    assert after < before, (before, after)
    # the concept's parameters moved: embeddings, and the LoRA up matrices (zero at the start)
    flat = trainer.params.flat()
    for w in WORDS:
        assert not torch.equal(flat[f"embedding.{w}"], initial[f"embedding.{w}"])
    # (at 64² the middle block is 1×1: its self-attention has one key, so its query/key LoRA gets no gradient)
    ups = [k for k in flat if k.endswith(".up") and not re.search(r"mid_block.*attn1\.to_[qk]", k)]
    assert ups and not [k for k in ups if float(flat[k].detach().abs().max()) == 0]
    assert any(k.startswith("text.") for k in ups) and any(k.startswith("unet.") for k in ups)
    # ...and nothing else did: the checkpoint's UNet and text encoder are bit-identical
    assert changed_keys(unet_before, weights_of(model)) == []
    assert changed_keys(clip_before, weights_of(clip.patcher)) == []
    # no gradient reached a model weight, and the weights' requires_grad flags are as they were
    for module in (model.model, clip.patcher.model):
        assert all(p.grad is None for p in module.parameters())
    assert flags == [p.requires_grad for p in model.model.parameters()]


def test_norm_cap_and_frozen_parts(tr, base):
    trainer = make(tr, base, steps=1, lr_embedding=0.5, norm_cap=0.3, lr_text=0.0, embedding_rule="cap each row")
    tr["loop"].train(trainer, save_states=False)
    for w in WORDS:
        assert float(trainer.params.embedding(w).norm(dim=-1).max()) <= 0.3 + 1e-5
    assert all(float(lora.up.abs().max()) == 0 for _m, lora in trainer.params.text_items())  # lr 0: untouched
    weights = trainer.weights()
    assert weights.text_encoder_lora == {} and weights.unet_lora


def test_embeddings_freeze_once_their_mean_norm_reaches_the_threshold_and_the_loras_go_on(tr, base):
    # train_edlora.py l. 138-143: after the step whose update brings the mean norm to emb_norm_threshold, the
    # concept embeddings are put back after every step; the LoRAs keep learning
    trainer = make(tr, base, steps=3, lr_embedding=1e-2, norm_cap=1e-4)  # reached by the first step
    after: list[dict] = []
    tr["loop"].train(trainer, save_states=False,
                     report=lambda k, v, p: after.append({n: t.detach().clone() for n, t in trainer.params.flat().items()}))  # fmt: skip
    assert trainer.frozen_at == 1
    for w in WORDS:
        assert torch.equal(after[0][f"embedding.{w}"], after[2][f"embedding.{w}"])
    unet_ups = [k for k in after[0] if k.startswith("unet.") and k.endswith(".up")]
    assert any(not torch.equal(after[0][k], after[2][k]) for k in unet_ups)
    # the rule off: the embeddings keep moving
    free = make(tr, base, steps=2, lr_embedding=1e-2, norm_cap=1e-4, embedding_rule="off")
    before = free.params.embedding(WORDS[0]).detach().clone()
    tr["loop"].train(free, save_states=False)
    assert free.frozen_embeddings is None and not torch.equal(before, free.params.embedding(WORDS[0]))


def test_learning_rates_fall_linearly_to_zero_over_the_run(tr, base):
    trainer = make(tr, base, steps=4, lr_text=0.0)
    seen = []
    tr["loop"].train(trainer, save_states=False,
                     report=lambda k, v, p: seen.append([g["lr"] for g in trainer.optimizer.param_groups]))  # fmt: skip
    base_lrs = [5e-3, 1e-3]  # the embeddings' and the UNet LoRA's (settings() above); text LoRA off
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([lr * (4 - step) / 4 for lr in base_lrs]), step


@pytest.mark.parametrize("regulariser", ["mix-of-show", "share outside"])
def test_attention_regulariser_reads_its_layers(tr, base, regulariser):
    _, masks = pictures()
    trainer = make(tr, base, masks=masks, attention_weight=0.05, steps=1, attention_regulariser=regulariser)
    # Mix-of-Show: all 16 cross-attention layers (by resolution); ours: input 7, 8 and output 3, 4, 5
    assert len(trainer.probe_layers) == (16 if regulariser == "mix-of-show" else 5)
    trainer.load()
    with torch.inference_mode(False), torch.enable_grad():
        loss, parts = trainer.loss(0)
    assert "attention" in parts and 0.0 < parts["attention"] and math.isfinite(parts["attention"])
    assert math.isfinite(parts["denoise"]) and float(loss) >= parts["denoise"]
    no_mask = make(tr, base, attention_weight=0.05, steps=1, attention_regulariser=regulariser,
                   image_augmentation="centre crop")  # fmt: skip
    no_mask.load()
    with torch.inference_mode(False), torch.enable_grad():
        _, parts = no_mask.loss(0)
    assert "attention" not in parts  # nothing to keep the attention in


def test_orthogonality_penalty_and_frozen_basis(tr, base):
    first = make(tr, base, steps=1)
    tr["loop"].train(first, save_states=False)
    earlier = first.weights()
    model, clip, vae = base
    imgs, _ = pictures()
    T = tr["trainer"]
    pen = T.EDLoRATrainer(model, clip, vae, imgs, CAPTIONS, settings(tr, orthogonal="penalty"), None, (earlier,))
    pen.load()
    with torch.inference_mode(False), torch.enable_grad():
        _, parts = pen.loss(0)
    assert parts["orthogonality"] > 0
    frozen = T.EDLoRATrainer(
        model, clip, vae, imgs, CAPTIONS, settings(tr, orthogonal="frozen basis"), None, (earlier,)
    )
    for module, lora in frozen.params.unet_items():
        old = earlier.unet_lora[module].down.float()
        assert not lora.down.requires_grad
        assert float((lora.down @ old.T).abs().max()) < 1e-3 * float(lora.down.norm() * old.norm())


# ------------------------------------------------------------------------------ saving and reloading


def _sample(model, clip, text, seed=5, steps=3):
    import comfy.sample

    import nodes

    pos = nodes.CLIPTextEncode().encode(clip, text)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = torch.zeros(1, 4, RES // 8, RES // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, 4.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed
    )


def test_node_saves_a_file_the_loader_and_the_stack_reproduce(comfy, tr, base):
    model, clip, vae = base
    imgs, masks = pictures()
    node = comfy.node_class(NODE)
    out = node.execute(model, clip, vae, imgs, "\n".join(c.replace("<tcat1> <tcat2>", "<TOK>") for c in CAPTIONS),
                       "<tcat1> <tcat2>", "cat", "trained_cat", 2, 5e-3, 1e-4, 1e-3, 4, 2, RES, 3, masks=masks)  # fmt: skip
    new_model, new_clip, concept, curve, words = out.result
    assert words == "<tcat1> <tcat2>" and concept.class_word == "cat"
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and has_range(curve)
    path = comfy.models_dir / "loras" / "trained_cat.safetensors"
    assert path.is_file()
    weights = tr["file"].read_edlora(path)
    assert weights.words == ("<tcat1>", "<tcat2>") and weights.class_word == "cat" and weights.layer_tokens == 16
    assert weights.base_model == "sd15" and weights.unet_lora and weights.text_encoder_lora["text_encoder"]

    # the same file through the ED-LoRA Loader samples exactly what the node's outputs sample
    loader = comfy.node_class("MultiConceptEDLoRALoader")
    l_model, l_clip = loader.execute(model, clip, "trained_cat.safetensors", 1.0, 1.0).result[:2]
    prompt = "a photo of <tcat1> <tcat2> on a sofa"
    a = _sample(new_model, new_clip, prompt)
    b = _sample(l_model, l_clip, prompt)
    plain = _sample(model, clip, "a photo of a cat on a sofa")
    assert has_range(a) and has_range(plain)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert float((a - plain).abs().mean()) > 1e-3  # the concept does something

    # and it joins a concept stack by file name
    stack = comfy.node_class("MultiConceptStackEDLoRA").execute("trained_cat.safetensors", 1.0, 1.0, "cat").result[0]
    assert stack[0].words == ("<tcat1>", "<tcat2>") and stack[0].class_word == "cat"

    # a second run with the same name never overwrites: it gets a new name
    before = path.read_bytes()
    node.execute(model, clip, vae, imgs, "a photo of <TOK>", "<tcat1> <tcat2>", "cat", "trained_cat", 1, 5e-3, 0.0,
                 0.0, 4, 1, RES, 3)  # fmt: skip
    assert path.read_bytes() == before
    assert (comfy.models_dir / "loras" / "trained_cat_2.safetensors").is_file()


def test_trained_concept_matches_the_trainer_forward_and_plain_sampling_is_untouched(comfy, tr, base):
    """What the trainer optimised is what the saved file gives (its own forward vs the loader's), and plain
    sampling afterwards is bit-identical to plain sampling before."""
    model, clip, _ = base
    before = _sample(model, clip, "a photo of a cat on a sofa", seed=11)
    trainer = make(tr, base, steps=1)
    tr["loop"].train(trainer, save_states=False)
    trainer.preview("a photo of <TOK>", seed=1, steps=2)
    T = trainer.weights()
    apply_edlora = comfy.pack_module("samplers.edlora.model").apply_edlora
    l_model, l_clip, _ = apply_edlora(model, clip, T, "mem", 1.0, 1.0)
    prompt = "a photo of <tcat1> <tcat2> on a sofa"
    a = _sample(trainer.model, trainer.clip, prompt)
    b = _sample(l_model, l_clip, prompt)
    assert has_range(a)
    # the loader merges the LoRA into the fp16-stored test weights, the trainer adds it in float32: equal to
    # the stored precision, and far from the plain model
    plain = _sample(model, clip, "a photo of a cat on a sofa")
    assert float((a - b).abs().max()) < 2e-3 * float(a.abs().max())
    assert float((a - b).abs().max()) < 0.05 * float((a - plain).abs().max())
    after = _sample(model, clip, "a photo of a cat on a sofa", seed=11)
    assert has_range(before) and torch.equal(before, after)


def test_previews_show_the_concept_at_each_lora_strength(tr, base):
    # Mix-of-Show's validation: alpha_list [0, 0.7, 1.0], 0 = the embeddings alone (train_edlora.py l. 176-187)
    trainer = make(tr, base, steps=1, lr_unet=3e-2, lr_text=3e-3)
    tr["loop"].train(trainer, save_states=False)
    images = trainer.preview("a photo of <TOK>", seed=1, steps=2, strengths=(0.0, 1.0))
    assert images.shape[0] == 2 and has_range(images[0]) and not torch.equal(images[0], images[1])
    loras = [lora for _m, lora in trainer.params.unet_items() + trainer.params.text_items()]
    assert all(lora.scale == 1.0 for lora in loras)  # put back after the previews
    with torch.no_grad():
        for lora in loras:
            lora.up.zero_()
    embeddings_alone = trainer.preview("a photo of <TOK>", seed=1, steps=2)
    assert torch.equal(embeddings_alone[0], images[0])


def test_a_tiny_update_on_float16_weights_is_not_lost(comfy, tr, tiny_checkpoint_path):
    """The LoRA runs beside the layer in float32 (Mix-of-Show's LoRALinearLayer): on a float16 model an early,
    tiny update reaches the layer's output, where adding it into the float16 weight mostly rounds it away."""
    from comfy.sd import load_checkpoint_guess_config

    model, clip, vae = load_checkpoint_guess_config(str(tiny_checkpoint_path), model_options={"dtype": torch.float16})[
        :3
    ]
    imgs, _ = pictures(1)
    trainer = tr["trainer"].EDLoRATrainer(model, clip, vae, imgs, CAPTIONS[:1], settings(tr, steps=1, lr_text=0.0))
    trainer.load()
    module, lora = trainer.params.unet_items()[0]
    key = trainer.unet_targets[module][0][: -len(".weight")]
    import comfy.utils

    layer = comfy.utils.get_attr(trainer.model.model, key)
    weight = layer.weight
    assert weight.dtype == torch.float16
    x = torch.randn(1, 4, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        lora.up.fill_(1e-4)  # every entry one Adam step at the official UNet rate (1e-4) from zero
        merged = weight + lora.delta().to(weight.dtype)
        plain = torch.nn.functional.linear(x, weight, layer.bias)
        with_branch = layer(x)  # the trainer's patched forward: the branch is there
        exact = (x.float() @ lora.down.T) @ lora.up.T  # the update's effect on the output
        kept_merged = (torch.nn.functional.linear(x, merged, layer.bias) - plain).float()
        kept_branch = (with_branch - plain).float()
        # added into the float16 weight, most of the update rounds away (only entries near zero keep theirs)...
        assert float((merged == weight).float().mean()) > 0.6
        # ...while the branch brings it to the output, to the output's own float16 resolution: the error against
        # the exact effect is far below what merging leaves, and the effect points the exact way
        error_branch, error_merged = (float((k - exact).norm()) for k in (kept_branch, kept_merged))
        assert error_branch < 0.7 * error_merged, (error_branch, error_merged)
        cosine = float((kept_branch * exact).sum() / (kept_branch.norm() * exact.norm()))
        assert cosine > 0.4, cosine
        lora.up.zero_()
        assert torch.equal(layer(x), plain)  # a zero LoRA is exactly the layer
    # (on the CPU ComfyUI computes a float16 model in float32: no loss scaling; tests/unit/test_training_parts.py
    # runs the loop's scaling)
    assert trainer.scaler is None


def _grads_after_one_step(tr, base, count_module=None, **kw):
    """The gradients of a one-step run (left in ``.grad`` after the optimiser step) and how many times the
    ``count_module``-th transformer block's self-attention ran."""
    trainer = make(tr, base, steps=1, batch_size=2, attention_weight=0.0, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # each layer's row its own (they start as copies), so a layer routed wrong would show
        for w in WORDS:
            e = trainer.params.embedding(w)
            e.add_(0.02 * torch.randn(e.shape, generator=g).to(e))
    calls = []
    blocks = [m for m in trainer.model.model.diffusion_model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    handle = blocks[0].attn1.register_forward_hook(lambda *a: calls.append(1))
    try:
        tr["loop"].train(trainer, save_states=False)
    finally:
        handle.remove()
    grads = {k: v.grad.detach().clone() for k, v in trainer.params.flat().items() if v.grad is not None}
    return grads, len(calls)


def test_checkpointing_and_accumulation_change_the_memory_not_the_gradients(tr, base):
    """Gradient checkpointing recomputes each block in the backward pass (the block runs twice per step) and
    accumulation runs the batch as micro-batches: both give the gradients of the plain run. (The attention
    regulariser is off here: it divides by each micro-batch's own maximum, as the official code per process.)"""
    plain, plain_calls = _grads_after_one_step(tr, base)
    checkpointed, checkpointed_calls = _grads_after_one_step(tr, base, gradient_checkpointing=True)
    accumulated, accumulated_calls = _grads_after_one_step(tr, base, accumulation=2)
    assert plain_calls == 1 and checkpointed_calls == 2 and accumulated_calls == 2
    assert set(plain) == set(checkpointed) == set(accumulated) and any(k.startswith("unet.") for k in plain)
    # every LoRA's up starts at 0, so no down has a gradient in the first step (and a key projection where one key
    # is all there is — the 1×1 middle block — has none either)
    ups = [n for n in plain if n.endswith(".up")]
    assert sum(float(plain[n].abs().max()) > 0 for n in ups) > 0.8 * len(ups)
    for name, g in plain.items():
        scale = float(g.abs().max())
        assert torch.allclose(checkpointed[name], g, atol=1e-6 * scale, rtol=0), name
        assert torch.allclose(accumulated[name], g, atol=1e-4 * scale, rtol=1e-4), name


# ------------------------------------------------------------------------------ interrupt and resume


def test_node_cancel_saves_a_state_and_resume_finishes_the_run(comfy, base):
    import comfy.model_management as mm

    model, clip, vae = base
    imgs, _ = pictures()
    node = comfy.node_class(NODE)
    args = dict(model=model, clip=clip, vae=vae, images=imgs, captions="a photo of <TOK>",
                concept_words="<ccat1> <ccat2>", class_word="cat", output_name="cancelled_cat", steps=2,
                lr_embedding=1e-3, lr_text=1e-5, lr_unet=1e-4, rank=4, batch_size=1, resolution=RES, seed=0)  # fmt: skip
    mm.interrupt_current_processing(True)  # what the UI's Cancel does
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(**args)
    finally:
        mm.interrupt_current_processing(False)
    states = comfy.output_dir / "edlora_training"
    assert (states / "cancelled_cat.state.safetensors").is_file()
    assert not (comfy.models_dir / "loras" / "cancelled_cat.safetensors").exists()
    out = node.execute(**args, resume="cancelled_cat.state.safetensors")
    assert out.result[4] == "<ccat1> <ccat2>"
    assert (comfy.models_dir / "loras" / "cancelled_cat.safetensors").is_file()


def test_interrupt_and_resume_equals_an_uninterrupted_run(tr, base, tmp_path):
    # with Mix-of-Show's recipe: augmentations, posterior samples, linear decay, and the freeze saved in the state
    # (a threshold the first step's embeddings pass: they learn in step 1, then stay, across the interruption).
    # (Checkpointing and accumulation keep the plain run's gradients: test_checkpointing_and_accumulation_...)
    memory = dict(batch_size=1)
    norm_cap = 1e-4
    whole = make(tr, base, steps=4, norm_cap=norm_cap, **memory)
    tr["loop"].train(whole, save_states=False)

    first = make(tr, base, steps=4, norm_cap=norm_cap, **memory)
    state = str(tmp_path / "run.state.safetensors")
    seen: list[float] = []
    stopped = tr["loop"].train(first, state_path=state, cancelled=lambda: len(seen) >= 2,
                               report=lambda s, v, p: seen.append(v))  # fmt: skip
    assert stopped.status == "cancelled" and stopped.step == 2 and os.path.isfile(state)

    second = make(tr, base, steps=4, norm_cap=norm_cap, **memory)
    done = tr["loop"].train(second, state_path=state, resume=state)
    assert second.frozen_embeddings is not None and second.frozen_at == whole.frozen_at == 1
    assert done.status == "done" and len(done.losses) == 4
    a, b = whole.params.flat(), second.params.flat()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_keeps_the_last_good_state(tr, base, tmp_path):
    trainer = make(tr, base, steps=3)
    state = str(tmp_path / "nan.state.safetensors")
    kept = {}

    def step_loss(k, rows):
        loss, parts = trainer.loss(k, rows)
        if k == 2:
            kept.update({n: v.detach().clone() for n, v in trainer.params.flat().items()})
            return loss * float("nan"), parts
        return loss, parts

    result = tr["loop"].train(trainer, state_path=state, step_loss=step_loss)
    assert result.status == "nan" and result.step == 2 and "NaN" in result.message
    for n, v in trainer.params.flat().items():
        assert torch.equal(v, kept[n]), n
    saved = tr["state"].load_state(state, trainer.identity)
    assert saved["step"] == 2


def test_resume_state_of_another_concept_is_refused(tr, base, tmp_path):
    trainer = make(tr, base, steps=1)
    state = str(tmp_path / "a.state.safetensors")
    tr["loop"].train(trainer, state_path=state)
    other = make(tr, base, steps=3, concept_words=("<dog1>", "<dog2>"), class_word="dog")
    with pytest.raises(tr["state"].StateError, match="another training run"):
        tr["loop"].train(other, resume=state)
    more = make(tr, base, steps=1)
    with pytest.raises(tr["state"].StateError, match="raise 'steps'"):
        tr["loop"].train(more, resume=state)


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(captions="one\ntwo\nthree"), "3 caption lines for 2 images"),
        (dict(captions="<TOK> " + "a very long caption " * 40), "caption 1 is longer than the text encoder"),
        (dict(images=torch.rand(2, 16, 16, 3)), "too small to train"),
        (dict(images=torch.zeros(0, 64, 64, 3)), "no images"),
        (dict(lr_embedding=0.0), "embedding learning rate is 0"),
        (dict(class_word=" "), "class word is empty"),
        (dict(concept_words=""), "concept words are empty"),
        (dict(output_name="../evil"), "output_name"),
        (dict(orthogonal="penalty"), "nothing is connected to orthogonal_to"),
        (dict(resume="missing.state.safetensors"), "is not in output"),
        (dict(preview_every=1, preview_strengths="0, strong"), "preview_strengths is '0, strong'"),
        (dict(preview_every=1, preview_strengths="nan"), "preview_strengths is 'nan'"),
        (dict(lr_schedule="cosine"), "lr_schedule must be one of"),
        (dict(batch_size=3), "2 picture\\(s\\) for batch_size 3"),
        (dict(batch_size=2, accumulation=3), "accumulation 3 does not divide batch_size 2"),
        (dict(lr_unet=-0.5), "lr_unet = -0.5 must be a finite number ≥ 0 \\(or -1: official\\)"),
    ],
)
def test_bad_input_is_refused_by_name(comfy, base, change, match):
    model, clip, vae = base
    imgs, _ = pictures()
    args = dict(model=model, clip=clip, vae=vae, images=imgs, captions="a photo of <TOK>",
                concept_words="<bcat1> <bcat2>", class_word="cat", output_name="bad_one", steps=1, lr_embedding=1e-3,
                lr_text=1e-5, lr_unet=1e-4, rank=4, batch_size=1, resolution=RES, seed=0)  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=f"^Train ED-LoRA: .*{match}"):
        comfy.node_class(NODE).execute(**args)
    assert not (comfy.models_dir / "loras" / "bad_one.safetensors").exists()


def test_orthogonality_against_a_stack_without_an_edlora_is_refused(comfy, base):
    from safetensors.torch import save_file

    from tests.support.builders.lora import SD15_ALL, make_lora

    model, clip, vae = base
    save_file(make_lora(model, SD15_ALL[:2], seed=3), str(comfy.models_dir / "loras" / "tr_plain_lora.safetensors"))
    stack = comfy.node_class("MultiConceptStackLoRA").execute("tr_plain_lora.safetensors", 1.0, 1.0, "dog",
                                                              class_word="dog").result[0]  # fmt: skip
    imgs, _ = pictures()
    with pytest.raises(ValueError, match="^Train ED-LoRA: orthogonal is 'penalty' but the concept stack in orthogonal_to "
                       "holds no ED-LoRA"):  # fmt: skip
        comfy.node_class(NODE).execute(model=model, clip=clip, vae=vae, images=imgs, captions="<TOK>",
                                       concept_words="<ocat1> <ocat2>", class_word="cat", output_name="orth_none",
                                       steps=1, lr_embedding=1e-3, lr_text=1e-5, lr_unet=1e-4, rank=4, batch_size=1,
                                       resolution=RES, seed=0, orthogonal="penalty", orthogonal_to=stack)  # fmt: skip
    assert not (comfy.models_dir / "loras" / "orth_none.safetensors").exists()
