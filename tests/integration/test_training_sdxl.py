"""ED-LoRA training on an SDXL-shaped model (issue 27): Concept Conductor's SDXL recipe — 70 layer tokens per
word, CLIP-L and CLIP-G embeddings, LoRA on both text encoders and the UNet — trains, saves a file the ED-LoRA
Loader reads, samples what the trainer optimised; each text encoder's embedding threshold freezes both; the wrong
CLIP or stack is refused by name; gradient checkpointing and accumulation change the memory, not the update.

The UNet has all 70 of SDXL's cross-attention layers at a tenth of its widths (tests/support/builders/sdxl.py),
the CLIP is ComfyUI's own SDXL CLIP (CLIP-L + CLIP-G at full width, 3 layers each, 32-token sections:
tests/support/builders/clip.py), the VAE is the tiny test checkpoint's.
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.test_training import pictures  # (its size is the same 64 px)

RES = 64
WORDS = ("<xdog1>", "<xdog2>")
CAPTIONS = ["<xdog1> <xdog2>, on a red rug", "<xdog1> <xdog2>, by a window"]
NODE = "MultiConceptTrainEDLoRA"
SECTION = 32  # tokens per prompt section: an SDXL concept prompt is 71 sections through both encoders


@pytest.fixture(scope="module")
def tr(comfy):
    return {
        "trainer": comfy.pack_module("training.edlora_trainer"),
        "loop": comfy.pack_module("training.loop"),
        "file": comfy.pack_module("formats.edlora"),
        "model": comfy.pack_module("samplers.edlora.model"),
        "state": comfy.pack_module("training.state"),
    }


@pytest.fixture(scope="module")
def sdxl(comfy, tiny_models_shallow_clip):
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sdxl import build_tiny_sdxl

    vae = tiny_models_shallow_clip[2]
    return build_tiny_sdxl(seed=5, all_cross_attention=True), build_tiny_clip("sdxl", seed=6, max_length=SECTION), vae


def make(tr, models, masks=None, **kw):
    model, clip, vae = models
    args = dict(concept_words=WORDS, class_word="dog", steps=2, seed=3, resolution=RES, batch_size=1)
    args.update(kw)
    imgs, _ = pictures()
    return tr["trainer"].EDLoRATrainer(model, clip, vae, imgs, CAPTIONS, tr["trainer"].TrainSettings(**args), masks)


def _sample(model, clip, text, seed=5, steps=2):
    import comfy.sample

    import nodes

    size = {"width": RES, "height": RES}
    pos = nodes.CLIPTextEncode().encode(clip, text)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    pos, neg = ([[c[0], {**c[1], **size}] for c in cond] for cond in (pos, neg))
    latent = torch.zeros(1, 4, RES // 8, RES // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", pos, neg, latent, disable_pbar=True,
                               seed=seed)  # fmt: skip


def has_range(t):
    return bool(torch.isfinite(t).all()) and float(t.max() - t.min()) > 1e-3


def test_sdxl_concept_trains_saves_reloads_in_the_loader_and_samples(comfy, tr, sdxl):
    model, clip, vae = sdxl
    prompt = "a photo of <xdog1> <xdog2> on a sofa"
    plain_before = _sample(model, clip, "a photo of a dog on a sofa", seed=11)
    trainer = make(tr, sdxl, lr_embedding=5e-3, lr_text=1e-4, lr_unet=1e-3, masks=pictures()[1])
    s = trainer.settings
    # the SDXL recipe's parts, sized as Concept Conductor's: ranks 4 (CLIP-L), 32 (CLIP-G, UNet); 70 rows per word
    assert (s.rank_text, s.rank_text_g, s.rank) == (4, 32, 32) and s.norm_cap_g == 1.5
    start = {k: v.detach().clone() for k, v in trainer.params.flat().items()}
    assert start["embedding.<xdog1>"].shape == (70, 768) and start["embedding_g.<xdog1>"].shape == (70, 1280)
    # the class word starts the last word in both encoders (Concept Conductor computes CLIP-G's start but never
    # writes it; we do)
    for key, group in (("l", "embedding"), ("g", "embedding_g")):
        expected = tr["trainer"].class_word_embedding(clip, "dog", key)
        assert torch.equal(start[f"{group}.<xdog2>"], expected.expand(70, -1)), key

    losses = []
    result = tr["loop"].train(trainer, save_states=False, report=lambda k, v, p: losses.append(p))
    assert result.status == "done" and len(result.losses) == 2
    assert all("attention" in p for p in losses)  # the regulariser read the 70 layers' maps (mask given)
    moved = {k for k, v in trainer.params.flat().items() if not torch.equal(v, start[k])}
    for prefix in ("embedding.", "embedding_g.", "text.", "text_g.", "unet."):
        assert any(k.startswith(prefix) for k in moved), prefix  # every part of the concept learned

    weights = trainer.weights()
    assert weights.base_model == "sdxl" and weights.layer_tokens == 70 and weights.clip_keys == ("g", "l")
    assert set(weights.text_encoder_lora) == {"text_encoder", "text_encoder_2"}
    pair = next(iter(weights.text_encoder_lora["text_encoder_2"].values()))
    assert pair.rank == 32 and next(iter(weights.text_encoder_lora["text_encoder"].values())).rank == 4
    path = comfy.models_dir / "loras" / "trained_xl_dog.safetensors"
    tr["file"].write_edlora_safetensors(weights, path)

    # the file through the ED-LoRA Loader samples what the trainer's own forward samples
    loader = comfy.node_class("MultiConceptEDLoRALoader")
    l_model, l_clip = loader.execute(model, clip, path.name, 1.0, 1.0).result[:2]
    a = _sample(trainer.model, trainer.clip, prompt)
    b = _sample(l_model, l_clip, prompt)
    plain = _sample(model, clip, "a photo of a dog on a sofa")
    assert has_range(a) and has_range(plain)
    assert float((a - b).abs().max()) < 2e-3 * float(a.abs().max()), float((a - b).abs().max())
    assert float((a - plain).abs().max()) > 20 * float((a - b).abs().max())
    # the training forward's ADM input (CLIP-G's pooled output of layer 0's prompt + the picture's size) is the
    # one sampling builds for the same prompt at the same size
    seen = []

    def record(apply, args):
        rows = [i for i, c in enumerate(args["cond_or_uncond"]) if c == 0]
        seen.append(args["c"]["y"][rows].detach().clone())
        return apply(args["input"], args["timestep"], **args["c"])

    recording = l_model.clone()
    recording.set_model_unet_function_wrapper(record)
    _sample(recording, l_clip, prompt, steps=1)
    with torch.no_grad():
        y = trainer._adm(trainer.encode(prompt)[2])
    trainer.release()
    assert seen and seen[0].shape == y.shape == (1, 2816)
    sampled, trained = seen[0].float(), y.float()
    assert torch.allclose(sampled[:, 1280:], trained[:, 1280:], atol=1e-6)  # the six size embeddings
    # the pooled text: equal to the precision the loader merges the text LoRA in (the trainer adds it in float32)
    error = float((sampled[:, :1280] - trained[:, :1280]).abs().max())
    assert error < 5e-3 * float(trained[:, :1280].abs().max()), error
    # plain SDXL sampling afterwards is bit-identical to before
    assert torch.equal(plain_before, _sample(model, clip, "a photo of a dog on a sofa", seed=11))


def test_sdxl_node_trains_with_checkpointing_and_saves(comfy, tr, sdxl):
    model, clip, vae = sdxl
    imgs, _ = pictures()
    node = comfy.node_class(NODE)
    out = node.execute(model, clip, vae, imgs, "<TOK>, on a rug", " ".join(WORDS), "dog", "node_xl_dog", 1, -1.0,
                       -1.0, -1.0, 0, 0, RES, 3, gradient_checkpointing=True)  # fmt: skip
    new_model, new_clip, concept, curve, words = out.result
    assert words == " ".join(WORDS) and concept.class_word == "dog"
    weights = tr["file"].read_edlora(comfy.models_dir / "loras" / "node_xl_dog.safetensors")
    assert weights.base_model == "sdxl" and weights.layer_tokens == 70
    assert has_range(_sample(new_model, new_clip, "a photo of <xdog1> <xdog2>"))


def test_either_encoders_threshold_freezes_both_and_the_loras_go_on(tr, sdxl, tiny_models_shallow_clip, tmp_path):
    # CLIP-G's threshold reached after the first step (CLIP-L's never): from then on neither encoder's embeddings
    # change (Concept Conductor puts CLIP-G's back to their start when CLIP-L's rule fires; we keep both as they are)
    trainer = make(tr, sdxl, steps=2, lr_embedding=5e-3, lr_unet=1e-3, norm_cap=100.0, norm_cap_g=1e-6)
    seen = []

    def report(step, loss, parts):
        seen.append({k: v.detach().clone() for k, v in trainer.params.flat().items()})

    state = str(tmp_path / "xl.state.safetensors")
    tr["loop"].train(trainer, state_path=state, report=report)
    assert trainer.frozen_at == 1
    for name in seen[0]:
        same = torch.equal(seen[0][name], seen[1][name])
        assert same if name.startswith("embedding") else True, name
    assert any(not torch.equal(seen[0][n], seen[1][n]) for n in seen[0] if n.startswith("unet."))
    # its resume state on an SD1.5 checkpoint (same words, pictures and settings) is refused by family
    sd15 = make(tr, tiny_models_shallow_clip, steps=3, lr_embedding=5e-3, lr_unet=1e-3, norm_cap=100.0)
    with pytest.raises(tr["state"].StateError, match="family: state 'SDXL', now 'SD1.5'"):
        tr["loop"].train(sd15, resume=state)


def test_wrong_clip_or_stack_family_is_refused_by_name(comfy, tr, sdxl, tiny_models_shallow_clip):
    from tests.support.builders.edlora import official_edlora

    model, clip, vae = sdxl
    sd_model, sd_clip, _ = tiny_models_shallow_clip
    error = tr["trainer"].TrainingError
    with pytest.raises(error, match=r"MODEL is SDXL but the CLIP is an SD1\.5 CLIP"):
        make(tr, (model, sd_clip, vae))
    with pytest.raises(error, match=r"MODEL is SD1\.5 but the CLIP is an SDXL CLIP"):
        make(tr, (sd_model, clip, vae))
    sd15_concept = tr["file"]._weights_from_tree(official_edlora(words=("<o1>", "<o2>"), seed=1), "o.pth", "pth", {})
    imgs, _ = pictures()
    settings = tr["trainer"].TrainSettings(concept_words=WORDS, class_word="dog", steps=1, resolution=RES,
                                           batch_size=1, orthogonal="penalty")  # fmt: skip
    with pytest.raises(error, match=r"orthogonal_to holds an SD1\.5 ED-LoRA .* this MODEL is SDXL"):
        tr["trainer"].EDLoRATrainer(model, clip, vae, imgs, CAPTIONS, settings, None, (sd15_concept,))
