"""Training an ED-LoRA on ComfyUI's own model code (the ComfyUI glue of the trainer).

What one step does (Mix-of-Show's recipe, DESIGN.md §4 "Training"; the official values in :mod:`.recipe`):

1. pick ``batch_size`` pictures and, for each, a timestep ``t ~ U{0..999}``, noise ``ε`` (plus a per-channel
   offset, ``noise_offset``) and the augmentations (:mod:`.augment`: crop and place on a black canvas, caption
   shuffle and template) — all drawn from generators seeded by ``(seed, step)``, so a step is the same step
   whether or not the run was interrupted;
2. encode the augmented pictures with the VAE and draw a fresh sample of its posterior (``mean + std · n``);
3. encode each caption once per cross-attention layer with that layer's concept tokens (16 encodings on
   SD1.5) through the text encoder carrying the trainable text-encoder LoRA — the same encoder the loader
   uses at inference, so what is trained is what is sampled;
4. run the UNet (trainable LoRA on every attention projection, layer ``i`` reading encoding ``i``) on the
   noised latent and take the noise-prediction error (inside the subject mask, or the picture's own area),
   plus the attention regulariser when there is a mask to keep the words' attention in (:mod:`.losses`);
5. AdamW step on the three parameter groups at this step's learning rate (linear decay to 0), then the
   embedding rule (frozen for the rest of the run once their mean norm reaches 0.55).

The LoRAs run as branches beside their layers (``y = layer(x) + lora(x)``, in float32, as Mix-of-Show's
LoRALinearLayer), installed as object patches of each layer's ``forward`` on clones of the user's MODEL and CLIP
(``ModelPatcher.add_object_patch``), which ComfyUI undoes when another model is loaded; the inputs are never
modified. ComfyUI creates model weights in inference mode, and such tensors cannot be kept for the backward
pass, so every weight the backward pass needs gets an identity weight wrapper: ComfyUI then hands each layer a
fresh copy of its weight (what its own LoRA trainer does for every layer).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field, replace

import torch

from ..formats.edlora import EDLoRAWeights, validate_concept_words
from ..samplers.edlora.clip import LAYERWISE_KEY, with_vocabulary
from ..samplers.edlora.layerwise import cross_attention_order, layer_index
from ..samplers.edlora.model import FAMILIES, add_layerwise_routing, model_family, text_encoder_prefixes
from ..samplers.edlora.tokens import MARKER_KEY, is_marker
from ..samplers.edlora.vocabulary import ConceptEntry, ConceptVocabulary
from .augment import CAPTION_MODES, IMAGE_MODES, augment_caption, longest_template, official_crop
from .dataset import fit_images, fit_masks
from .edlora_params import EDLoRAParameters, initial_embeddings
from .losses import (
    attention_outside_loss,
    cap_norm_,
    denoising_loss,
    keep_from_zero,
    mean_norm,
    mixofshow_attention_loss,
    orthogonal_basis,
    orthogonality_penalty,
    resize_mask,
)
from .recipe import (
    ATTENTION_WEIGHT,
    EMBEDDING_RULES,
    LR_SCHEDULES,
    NOISE_OFFSET,
    NORM_THRESHOLD,
    OFFICIAL_BATCH,
    WEIGHT_DECAY,
    auto_steps,
    lr_factor,
)

log = logging.getLogger("multiconcept")

UNET_ATTENTION = re.compile(r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_ATTENTION = re.compile(r"text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
ORTHOGONAL_MODES = ("off", "penalty", "frozen basis")
ATTENTION_REGULARISERS = ("mix-of-show", "share outside")
TRAIN_TIMESTEPS = 1000


class TrainingError(ValueError):
    """Settings or inputs a training run cannot start (or continue) with; the message names the fix."""


@dataclass(frozen=True)
class TrainSettings:
    """One run's settings; the defaults are Mix-of-Show's (:mod:`.recipe` cites each)."""

    concept_words: tuple[str, ...]
    class_word: str
    steps: int = 0  # 0: pictures × 500 samples / batch_size, as the official configs
    lr_embedding: float = 1e-3
    lr_text: float = 1e-5
    lr_unet: float = 1e-4
    rank: int = 4
    batch_size: int = OFFICIAL_BATCH
    seed: int = 0
    resolution: int = 512
    masked_loss: bool = True
    attention_weight: float = ATTENTION_WEIGHT
    attention_regulariser: str = "mix-of-show"
    full_identity: bool = False
    orthogonal: str = "off"
    orthogonality_weight: float = 1e-3
    keep_from_zero_weight: float = 1e-4
    embedding_rule: str = "freeze at mean norm"
    norm_cap: float = NORM_THRESHOLD  # the threshold of the embedding rule (freeze or cap)
    lr_schedule: str = "linear to 0"
    weight_decay: float = WEIGHT_DECAY
    noise_offset: float = NOISE_OFFSET
    image_augmentation: str = IMAGE_MODES[0]
    caption_augmentation: str = CAPTION_MODES[0]
    sample_posterior: bool = True
    adam_epsilon: float = 1e-8

    def check(self) -> None:
        try:
            validate_concept_words(self.concept_words)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if not self.concept_words:
            raise TrainingError("give the concept one or more words, e.g. <cat1> <cat2>")
        if not self.class_word.strip():
            raise TrainingError("the class word is empty: name what the concept is (man, dog, chair)")
        for name in ("lr_embedding", "lr_text", "lr_unet"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise TrainingError(f"learning rate {name} = {value} must be a finite number ≥ 0")
        if self.lr_embedding == 0:
            raise TrainingError(
                "the embedding learning rate is 0: the concept words would learn nothing. Use about 1e-3 (set the "
                "LoRA rates to 0 instead to train the words alone)"
            )
        if self.steps < 0 or self.batch_size < 1 or self.rank < 1:
            raise TrainingError("batch size and rank must be at least 1, steps at least 0 (0 = Mix-of-Show's count)")
        choices = {"orthogonal": ORTHOGONAL_MODES, "attention_regulariser": ATTENTION_REGULARISERS,
                   "embedding_rule": EMBEDDING_RULES, "lr_schedule": LR_SCHEDULES, "image_augmentation": IMAGE_MODES,
                   "caption_augmentation": CAPTION_MODES}  # fmt: skip
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise TrainingError(f"{name} must be one of {options}, not {getattr(self, name)!r}")
        if not math.isfinite(self.adam_epsilon) or self.adam_epsilon <= 0:
            raise TrainingError(f"adam_epsilon = {self.adam_epsilon} must be a positive number")
        for name in ("attention_weight", "orthogonality_weight", "keep_from_zero_weight", "norm_cap", "weight_decay",
                     "noise_offset"):  # fmt: skip
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise TrainingError(f"{name} = {value} must be a finite number ≥ 0")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["concept_words"] = list(self.concept_words)
        return d


@dataclass
class StepReport:
    step: int
    loss: float
    parts: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ targets


def unet_lora_targets(model_patcher) -> dict[str, tuple[str, tuple[int, int]]]:
    """``diffusers module -> (ComfyUI weight key, (out, in))`` for every attention projection of the UNet."""
    import comfy.utils

    diffusers = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    sd = model_patcher.model.diffusion_model.state_dict()
    out = {}
    for key, comfy_key in diffusers.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if UNET_ATTENTION.search(module) and comfy_key in sd:
            w = sd[comfy_key]
            out[module] = ("diffusion_model." + comfy_key, (int(w.shape[0]), int(w.shape[1])))
    return dict(sorted(out.items()))


def text_lora_targets(clip, clip_key: str = "l") -> dict[str, tuple[str, tuple[int, int]]]:
    """``HF module -> (CLIP state key, (out, in))`` for the q/k/v/out projections of every text-encoder layer."""
    prefix = text_encoder_prefixes(clip).get(clip_key)
    if prefix is None:
        raise TrainingError(f"this CLIP has no CLIP-{clip_key.upper()} text encoder")
    out = {}
    for key, w in clip.patcher.model.state_dict().items():
        if key.startswith(prefix) and key.endswith(".weight"):
            module = key[len(prefix) : -len(".weight")]
            if TEXT_ATTENTION.fullmatch(module):
                out[module] = (key, (int(w.shape[0]), int(w.shape[1])))
    return dict(sorted(out.items()))


class _LoRABranch:
    """A layer's ``forward`` with its LoRA beside it: ``layer(x) + lora.branch(x)`` (the layer's own forward, with
    ComfyUI's casting and weight patches, stays as it is). Added in the layer's dtype once the branch's float32
    output is formed, as a mixed-precision run of Mix-of-Show's LoRALinearLayer adds it."""

    def __init__(self, module, lora):
        self.layer_forward = type(module).forward.__get__(module)
        self.lora = lora

    def __call__(self, x, *args, **kwargs):
        y = self.layer_forward(x, *args, **kwargs)
        return y + self.lora.branch(x).to(device=y.device, dtype=y.dtype)


def _add_branches(patcher, items, targets: dict, prefix: str = "") -> None:
    """Object patches installing each ``(module, lora)``'s branch on the layer whose weight key ``targets`` names."""
    import comfy.utils

    for module, lora in items:
        path = targets[module][0][: -len(".weight")]
        layer = comfy.utils.get_attr(patcher.model, path)
        patcher.add_object_patch(f"{path}.forward", _LoRABranch(layer, lora))


class _FreshCopy:
    """Identity weight wrapper: its presence makes ComfyUI copy the weight for each forward (see module doc)."""

    def __call__(self, weight):
        return weight

    def move_to(self, device=None) -> int:
        return 0


def _wrap_inference_weights(patcher, prefix: str, skip: set[str]) -> int:
    """Identity wrappers on every weight/bias under ``prefix`` that is an inference tensor (not in ``skip``)."""
    count = 0
    for name, module in patcher.model.named_modules():
        if not name.startswith(prefix) or not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            t = getattr(module, attr, None)
            key = f"{name}.{attr}"
            if t is None or key in skip or not t.is_inference():
                continue
            patcher.add_weight_wrapper(key, _FreshCopy())
            count += 1
    return count


def model_identity(model_patcher, clip) -> str:
    """A short fingerprint of the UNet and text encoder weights (a resume state must come from the same)."""
    h = hashlib.sha256()
    sd = model_patcher.model.diffusion_model.state_dict()
    for key in sorted(sd)[:: max(1, len(sd) // 16)]:
        t = sd[key].detach().float().cpu()
        h.update(f"{key}:{tuple(t.shape)}:{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}".encode())
    clip_sd = clip.patcher.model.state_dict()
    for key in sorted(clip_sd)[:: max(1, len(clip_sd) // 8)]:
        t = clip_sd[key].detach().float().cpu()
        h.update(f"{key}:{float(t.sum()):.6e}".encode())
    return h.hexdigest()[:16]


def class_word_embedding(clip, word: str, clip_key: str = "l") -> torch.Tensor:
    """The input embedding of ``word`` (its tokens' mean when the tokenizer splits it)."""
    tokens = clip.tokenize(word)[clip_key]
    empty = clip.tokenize("")[clip_key]
    special = {t[0] for s in empty for t in s}
    ids = [t[0] for s in tokens for t in s if isinstance(t[0], int) and t[0] not in special]
    if not ids:
        raise TrainingError(f"the class word {word!r} has no tokens")
    prefix = text_encoder_prefixes(clip)[clip_key]
    table = clip.patcher.model.state_dict()[prefix + "text_model.embeddings.token_embedding.weight"]
    return table[torch.tensor(ids)].float().mean(0).detach().clone()


# ------------------------------------------------------------------------------------- the trainer


class _OutOfPlaceCLIPLayer(torch.nn.Module):
    """ComfyUI's ``CLIPLayer`` with ``x = x + ...`` where it writes ``x += ...``: autograd keeps each layer
    norm's input for the backward pass, and the in-place add would overwrite it. Same children under the same
    names (so weight wrappers still find them), same values; installed as an object patch on the CLIP clone."""

    def __init__(self, layer):
        super().__init__()
        self.layer_norm1 = layer.layer_norm1
        self.self_attn = layer.self_attn
        self.layer_norm2 = layer.layer_norm2
        self.mlp = layer.mlp

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))


def _out_of_place_clip_layers(patcher) -> int:
    count = 0
    for name, module in patcher.model.named_modules():
        # (a layer may already be ours: a clone from an earlier run stays patched until ComfyUI unloads it)
        if type(module).__name__ in ("CLIPLayer", "_OutOfPlaceCLIPLayer") and all(
            hasattr(module, a) for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp")
        ):
            patcher.add_object_patch(name, _OutOfPlaceCLIPLayer(module))
            count += 1
    return count


class _LayerContextRouter:
    """attn2_patch: cross-attention layer ``i`` reads this step's layer-``i`` encodings (all batch rows)."""

    def __init__(self, order: dict):
        self.order = order
        self.layers: torch.Tensor | None = None  # [B, L, T, D]

    def __call__(self, n, context, value, extra_options):
        if self.layers is None:
            return n, context, value
        i = layer_index(extra_options, self.order)
        if i is None or not 0 <= i < self.layers.shape[1]:
            return n, context, value
        ctx = self.layers[:, i].to(device=context.device, dtype=context.dtype)
        return n, ctx, ctx


class _AttentionProbe:
    """attn2 replace patch on the probed layers: plain attention, computed explicitly so the concept tokens'
    attention maps are kept, with their graph, for the regulariser: per number of queries (one resolution), the
    sum over heads and layers of each word's map and the number of heads summed (Mix-of-Show averages over
    every head of every layer of a resolution)."""

    def __init__(self):
        self.positions: list[list[int]] | None = None  # per batch row: token positions of the concept words
        self.sums: dict[int, tuple[torch.Tensor, int]] = {}  # queries -> ([B, N, queries], heads)

    def reset(self, positions: list[list[int]] | None) -> None:
        self.positions = positions
        self.sums = {}

    def __call__(self, q, k, v, extra_options):
        heads = int(extra_options["n_heads"])
        b, nq, inner = q.shape
        d = inner // heads
        qh = q.reshape(b, nq, heads, d).transpose(1, 2)
        kh = k.reshape(b, -1, heads, d).transpose(1, 2)
        vh = v.reshape(b, -1, heads, d).transpose(1, 2)
        probs = torch.softmax((qh.float() @ kh.float().transpose(-1, -2)) * d**-0.5, dim=-1)  # [b, h, nq, T]
        out = (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, nq, inner)
        if self.positions is not None:
            summed = probs.sum(1)  # [b, nq, T]
            width = max(len(p) for p in self.positions)
            rows = []
            for r, pos in enumerate(self.positions):
                idx = torch.tensor(pos + pos[-1:] * (width - len(pos)), device=summed.device)
                rows.append(summed[r][:, idx].transpose(0, 1))  # [N, nq]
            maps = torch.stack(rows)
            total, count = self.sums.get(nq, (0, 0))
            self.sums[nq] = (maps + total, count + heads)
        return out


class EDLoRATrainer:
    """One training run: the data, the trainable concept, the wired-up model clones and the optimiser."""

    def __init__(self, model, clip, vae, images: torch.Tensor, captions: list[str], settings: TrainSettings,
                 masks: torch.Tensor | None = None, existing: tuple[EDLoRAWeights, ...] = ()):  # fmt: skip
        settings.check()
        self.settings = settings
        family = model_family(model)
        if family != "sd15":
            found = FAMILIES[family].name if family else type(model.model.model_config).__name__
            raise TrainingError(
                f"training is available for SD1.5-family checkpoints; this MODEL is {found}. Load an SD1.5 checkpoint "
                "(SDXL ED-LoRA training is not supported yet)."
            )
        if tuple(sorted(clip.tokenize("a").keys())) != ("l",):
            raise TrainingError("this CLIP is not an SD1.5 CLIP (it needs exactly the CLIP-L text encoder)")
        if len(captions) != images.shape[0]:
            raise TrainingError(f"{len(captions)} captions for {images.shape[0]} images")
        import comfy.model_management

        self.family = FAMILIES[family]
        self.placing = settings.image_augmentation == IMAGE_MODES[0]
        crop = not self.placing  # the official augmentation crops and places each sample itself
        pixels = fit_images(images, settings.resolution, crop=crop)
        self.pixels = pixels.permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
        self.masks = fit_masks(masks, pixels.shape[0], tuple(images.shape[1:3]), settings.resolution, crop=crop)
        self.captions = list(captions)
        self.num_images = pixels.shape[0]
        if self.num_images < settings.batch_size:
            raise TrainingError(
                f"{self.num_images} picture(s) for batch_size {settings.batch_size}: a step would show the same picture "
                f"more than once. Lower batch_size to {self.num_images} (steps 0 still gives each picture its 500 "
                "samples) or add pictures."
            )
        if settings.steps == 0:
            settings = replace(settings, steps=auto_steps(self.num_images, settings.batch_size))
            self.settings = settings
        self.vae = vae
        self.process_latent_in = model.model.process_latent_in
        with torch.inference_mode(False), torch.no_grad():
            r = settings.resolution
            self.latent_shape = tuple(vae.encode(torch.zeros(1, r, r, 3)).shape[1:])
            # without the crop-and-place augmentation the pictures never change: their posteriors are kept
            self.posteriors = None if self.placing else _encode_posterior(vae, self.pixels)
        self.device = comfy.model_management.get_torch_device()
        self.identity = {
            "model": None,  # filled in by load(): the weights as loaded, with the MODEL's own patches
            "concept_words": list(settings.concept_words),
            "class_word": settings.class_word,
            "rank": settings.rank,
            "resolution": settings.resolution,
            "images": _tensor_digest(self.pixels),
            "orthogonal": settings.orthogonal,
        }
        self.frozen_embeddings: dict[str, torch.Tensor] | None = None  # set when the embedding rule freezes them

        gen = torch.Generator().manual_seed(int(settings.seed))
        with torch.inference_mode(False):
            self.unet_targets = unet_lora_targets(model)
            self.text_targets = text_lora_targets(clip)
            class_emb = class_word_embedding(clip, settings.class_word)
            init = initial_embeddings(settings.concept_words, class_emb, self.family.layers, gen)
            frozen = self._frozen_downs(existing, gen) if settings.orthogonal == "frozen basis" else None
            self.params = EDLoRAParameters(
                settings.concept_words, init,
                {m: shape for m, (_, shape) in self.text_targets.items()},
                {m: shape for m, (_, shape) in self.unet_targets.items()},
                settings.rank, gen, frozen,
            )  # fmt: skip
            self.params.to(self.device)
            self.old_downs = self._old_downs(existing) if settings.orthogonal == "penalty" else None
            self.optimizer = torch.optim.AdamW(
                self.params.param_groups(settings.lr_embedding, settings.lr_text, settings.lr_unet,
                                         settings.weight_decay),
                eps=settings.adam_epsilon,
            )  # fmt: skip
            self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        for part, lr in ((self.params.text_lora, settings.lr_text), (self.params.unet_lora, settings.lr_unet)):
            if lr == 0:
                part.requires_grad_(False)  # not trained: no gradients, nothing for a distributed run to average
        self._wire(model, clip)
        template = longest_template(settings.caption_augmentation)
        for i, caption in enumerate(self.captions):
            sections = self.clip.tokenize(template.format(caption))["l"]
            if len(sections) > 1:
                added = "" if template == "{}" else f" once put in the longest caption template ({template!r})"
                raise TrainingError(
                    f"caption {i + 1} is longer than the text encoder's window of 75 tokens{added}: shorten it to "
                    "about 55 words"
                )

    # --- set-up -------------------------------------------------------------------------------

    def _old_downs(self, existing) -> list[list[torch.Tensor]]:
        out = []
        for module, _lora in self.params.unet_items():
            out.append([w.unet_lora[module].down.float().to(self.device) for w in existing if module in w.unet_lora])
        return out

    def _frozen_downs(self, existing, gen) -> dict[str, torch.Tensor]:
        out = {}
        for module, (_, (_o, width)) in self.unet_targets.items():
            earlier = [w.unet_lora[module].down for w in existing if module in w.unet_lora]
            try:
                out[module] = orthogonal_basis(
                    self.settings.rank, width, earlier, gen, math.sqrt(width) / self.settings.rank
                )
            except ValueError as e:
                raise TrainingError(f"orthogonal basis for {module}: {e}") from None
        return out

    def _wire(self, model, clip) -> None:
        """Clones of MODEL and CLIP with the trainable LoRAs and the trainable concept words."""
        self.model = model.clone()
        _add_branches(self.model, self.params.unet_items(), self.unet_targets)
        _wrap_inference_weights(self.model, "diffusion_model.", set())
        add_layerwise_routing(self.model)  # for preview sampling; a no-op in the training forward
        self.order = cross_attention_order(self.model.model.diffusion_model)
        self.router = _LayerContextRouter(self.order)
        self.probe = _AttentionProbe()
        self.probe_layers = self._probe_layers()

        clip = clip.clone()
        if self.settings.lr_text > 0:
            _add_branches(clip.patcher, self.params.text_items(), self.text_targets)
        _wrap_inference_weights(clip.patcher, "", set())
        if not _out_of_place_clip_layers(clip.patcher):
            raise TrainingError(
                "this CLIP's text encoder is not the CLIP-L layout the trainer knows (no CLIPLayer found)"
            )
        entry = ConceptEntry(
            uid="training",
            words=self.settings.concept_words,
            embeddings={w: {"l": self.params.embedding(w)} for w in self.settings.concept_words},
            source="training",
        )
        self.clip = with_vocabulary(clip, ConceptVocabulary().with_entry(entry))

    def _probe_layers(self) -> list[tuple]:
        """Where the attention regulariser reads the concept words' maps. Mix-of-Show's: every cross-attention
        layer (grouped by resolution in the loss). 'share outside': the layers at a quarter of the latent's side
        (16×16 at 512²), where the maps are sharp enough to say where the subject is, and cheap."""
        side = self.latent_shape[-1]
        keys = []
        for (kind, number, depth), _i in sorted(self.order.items(), key=lambda kv: kv[1]):
            block = "middle" if kind == "middle" else kind
            if self.settings.attention_regulariser != "mix-of-show":
                scale = _block_downscale(self.model.model.diffusion_model, kind, number)
                if not (scale == 4 and side % 4 == 0):
                    continue
            keys.append((block, number, depth))
        return keys

    # --- one step -----------------------------------------------------------------------------

    def draws(self, step: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Pictures, timesteps and noise (with its offset) of ``step`` (global batch), from a generator seeded by
        (seed, step); then the posterior samples' noise (:meth:`posterior_noise`) from the same generator."""
        order, t, noise, _ = self._draws(step)
        return order, t, noise

    def _draws(self, step: int):
        gen = torch.Generator().manual_seed((int(self.settings.seed) * 1_000_003 + int(step)) % (2**63))
        n, b = self.num_images, self.settings.batch_size
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-b // n))])[:b].tolist()
        t = torch.randint(0, TRAIN_TIMESTEPS, (b,), generator=gen)
        noise = torch.randn((b,) + self.latent_shape, generator=gen)
        offset = torch.randn((b, self.latent_shape[0]) + (1,) * (len(self.latent_shape) - 1), generator=gen)
        noise = noise + self.settings.noise_offset * offset  # trainer_edlora.py l. 207-209: the target includes it
        posterior = torch.randn((b,) + self.latent_shape, generator=gen)
        return order, t, noise, posterior

    def _sample_rng(self, step: int, row: int) -> random.Random:
        """The augmentations' randomness of one row of one step (same on every process and after a resume)."""
        return random.Random(f"{int(self.settings.seed)}:{int(step)}:{int(row)}")

    def samples(self, step: int, rows: list[int], order: list[int], posterior: torch.Tensor):
        """The clean latents ``[b, C, h, w]``, the loss masks ``[b, h, w]`` (or None), the subject/area masks at
        the latent's size for the attention regulariser (or None) and the captions of ``rows`` of ``step``, whose
        pictures and posterior noise :meth:`_draws` drew."""
        s = self.settings
        pictures, subjects, areas, captions = [], [], [], []
        for r in rows:
            i = order[r]
            rng = self._sample_rng(step, r)
            mask = self.masks[i] if self.masks is not None else None
            if self.placing:
                canvas, subject, area = official_crop(self.pixels[i], mask, s.resolution, rng)
            else:
                canvas, subject, area = self.pixels[i], mask, None
            pictures.append(canvas)
            subjects.append(subject)
            areas.append(area)
            captions.append(augment_caption(self.captions[i], s.caption_augmentation, rng))
        with torch.inference_mode(False), torch.no_grad():
            if self.posteriors is not None:
                mean, std = (p[[order[r] for r in rows]] for p in self.posteriors)
            else:
                mean, std = _encode_posterior(self.vae, torch.stack(pictures))
            z = mean + std * posterior[rows] if s.sample_posterior else mean
            x0 = self.process_latent_in(z.float()).detach()
        size = tuple(self.latent_shape[-2:])
        loss_mask = attention_mask = None
        if self.placing:
            # trainer_edlora.py l. 247-252: the subject mask when use_mask_loss, else the picture's area; and the
            # attention regulariser reads the subject mask, or the area when there is none (train_edlora.py l. 114)
            chosen = [sm if (sm is not None and s.masked_loss) else a for sm, a in zip(subjects, areas, strict=True)]
            loss_mask = _nearest(torch.stack(chosen), size)
            attention = [sm if sm is not None else a for sm, a in zip(subjects, areas, strict=True)]
            attention_mask = _nearest(torch.stack(attention), size)
        elif self.masks is not None:
            subject = torch.stack(subjects)
            loss_mask = resize_mask(subject, size) if s.masked_loss else None
            attention_mask = _nearest(subject, size)
        return x0, loss_mask, attention_mask, captions

    def encode(self, caption: str) -> tuple[torch.Tensor, list[int]]:
        """``[1, L, 77, 768]`` per-layer encodings of ``caption`` (with grad) and the concept tokens' positions."""
        tokens = self.clip.tokenize(caption)
        positions = [j for j, item in enumerate(tokens["l"][0]) if is_marker(item[0]) and MARKER_KEY in item[0]]
        out = self.clip.encode_from_tokens(tokens, return_dict=True)
        layers = out.get(LAYERWISE_KEY)
        if layers is None:
            raise TrainingError(f"the caption {caption!r} does not name the concept words")
        return layers.layers, positions

    def loss(self, step: int, rows: list[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``step`` on the given rows of its global batch (all rows by default)."""
        s = self.settings
        order, t, noise, posterior = self._draws(step)
        rows = list(range(len(order))) if rows is None else rows
        x0, loss_mask, attention_mask, captions = self.samples(step, rows, order, posterior)
        x0 = x0.to(self.device)
        eps = noise[rows].to(self.device)
        ms = self.model.model.model_sampling
        sigma = ms.sigma(t[rows].float()).to(self.device)
        x = ms.noise_scaling(sigma, eps, x0)

        encoded = [self.encode(c) for c in captions]
        self.router.layers = torch.cat([e[0] for e in encoded]).to(self.device)
        use_attention = s.attention_weight > 0 and attention_mask is not None and bool(self.probe_layers)
        self.probe.reset([e[1][: len(s.concept_words)] for e in encoded] if use_attention else None)
        options = self._transformer_options(use_attention)
        try:
            denoised = self.model.model.apply_model(x, sigma, c_crossattn=self.router.layers[:, 0],
                                                    transformer_options=options)  # fmt: skip
        finally:
            self.router.layers = None
        pred_eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
        mask = loss_mask.to(self.device) if loss_mask is not None else None
        total = denoising_loss(pred_eps, eps, mask)
        parts = {"denoise": float(total.detach())}
        if use_attention and self.probe.sums:
            attention = self._attention_term(attention_mask.to(self.device), x0.shape[-2:])
            parts["attention"] = float(attention.detach())
            total = total + attention
        self.probe.reset(None)
        if self.old_downs is not None and s.lr_unet > 0:
            downs = [lora.down for _m, lora in self.params.unet_items()]
            orth = orthogonality_penalty(downs, self.old_downs)
            zero = keep_from_zero(downs)
            parts["orthogonality"] = float(orth.detach())
            total = total + s.orthogonality_weight * orth + s.keep_from_zero_weight * zero
        return total, parts

    def _attention_term(self, mask: torch.Tensor, latent_hw) -> torch.Tensor:
        """The weighted attention regulariser from the probe's per-resolution maps."""
        s = self.settings
        maps = {}
        for queries, (total, heads) in self.probe.sums.items():
            side = int(round(math.sqrt(queries * latent_hw[-1] / latent_hw[-2])))
            h, w = queries // side, side
            maps[(h, w)] = (total / heads).reshape(total.shape[0], total.shape[1], h, w)
        if s.attention_regulariser == "mix-of-show":
            return mixofshow_attention_loss(maps, mask, s.attention_weight, s.full_identity)
        terms = [attention_outside_loss(m, resize_mask(mask, hw)) for hw, m in maps.items()]
        return s.attention_weight * torch.stack(terms).mean()

    def _transformer_options(self, probe: bool) -> dict:
        base = self.model.model_options.get("transformer_options", {})
        options = dict(base)
        patches = {k: list(v) for k, v in base.get("patches", {}).items()}
        patches["attn2_patch"] = patches.get("attn2_patch", []) + [self.router]
        options["patches"] = patches
        if probe:
            replace = {k: dict(v) for k, v in base.get("patches_replace", {}).items()}
            attn2 = replace.setdefault("attn2", {})
            for key in self.probe_layers:
                attn2[key] = self.probe
            options["patches_replace"] = replace
        return options

    def load(self) -> None:
        """Put the MODEL and CLIP clones (with their wrappers) on the compute device."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.model, self.clip.patcher], force_full_load=True)
        # Read after loading: until another MODEL is loaded, ComfyUI leaves the last sampled model's patches
        # (e.g. a LoRA) merged into the shared weights; loading ours put back exactly the weights we train on.
        self.identity["model"] = model_identity(self.model, self.clip)

    @contextlib.contextmanager
    def base_frozen(self):
        """No gradient for the checkpoint's own weights while training (they may be ordinary parameters, e.g.
        when a loader ran outside inference mode); each flag is put back as it was afterwards."""
        changed = []
        for module in (self.model.model, self.clip.patcher.model):
            for p in module.parameters():
                if p.requires_grad and not p.is_inference():
                    p.requires_grad_(False)
                    changed.append(p)
        try:
            yield
        finally:
            for p in changed:
                p.requires_grad_(True)

    def before_step(self, step: int) -> None:
        """This step's learning rates: the schedule's factor times each group's rate (linear decay to 0 over the
        run, as ``get_scheduler('linear', num_warmup_steps=0)`` in Mix-of-Show's train_edlora.py l. 85-90)."""
        factor = lr_factor(self.settings.lr_schedule, step, self.settings.steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The embedding rule after the optimiser step of 0-based ``step``."""
        s = self.settings
        words = s.concept_words
        if s.embedding_rule == "cap each row" and s.norm_cap > 0:
            for w in words:
                cap_norm_(self.params.embedding(w), s.norm_cap)
        elif s.embedding_rule == "freeze at mean norm":
            if self.frozen_embeddings is not None:  # train_edlora.py l. 135-136: put back after every step
                for w in words:
                    self.params.embedding(w).copy_(self.frozen_embeddings[w])
            elif s.norm_cap > 0 and mean_norm([self.params.embedding(w) for w in words]) >= s.norm_cap:
                self.freeze_embeddings(step + 1)

    def freeze_embeddings(self, after_step: int) -> None:
        """Keep the embeddings as they are now for the rest of the run (train_edlora.py l. 141-143)."""
        self.frozen_embeddings = {w: self.params.embedding(w).detach().clone() for w in self.settings.concept_words}
        self.frozen_at = int(after_step)
        log.info("[multi-concept] Train ED-LoRA: the concept embeddings reached mean norm %.2f after step %d and are "
                 "frozen from now on (Mix-of-Show's rule); the LoRAs keep learning", self.settings.norm_cap, after_step)  # fmt: skip

    def extra_state(self) -> dict:
        """What a resume state needs besides the parameters: when the embeddings were frozen."""
        return {"embeddings_frozen_at": getattr(self, "frozen_at", None) if self.frozen_embeddings else None}

    def load_extra_state(self, extra: dict) -> None:
        at = extra.get("embeddings_frozen_at")
        if at is not None:
            self.freeze_embeddings(int(at))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.flat().items()}

    @torch.no_grad()
    def preview(self, prompt: str, seed: int, steps: int = 16, cfg: float = 7.0,
                strengths: tuple[float, ...] = (1.0,)) -> torch.Tensor:  # fmt: skip
        """Images ``[len(strengths), H, W, 3]`` of ``prompt`` (``<TOK>`` = the concept words) sampled with the concept
        as it is now, its LoRAs at each strength (0: the embeddings alone), as Mix-of-Show's validation renders
        ``alpha_list: [0, 0.7, 1.0]`` (there: 50 DPM-Solver steps; here ``steps`` of euler, to keep it cheap)."""
        import comfy.sample

        text = prompt.replace("<TOK>", " ".join(self.settings.concept_words))
        loras = list(self.params.text_lora.values()) + list(self.params.unet_lora.values())
        images = []
        try:
            for strength in strengths:
                for lora in loras:
                    lora.scale = float(strength)
                positive = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
                negative = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(""))
                latent = torch.zeros((1,) + self.latent_shape)
                noise = comfy.sample.prepare_noise(latent, seed)
                out = comfy.sample.sample(self.model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                          disable_pbar=True, seed=seed)  # fmt: skip
                images.append(self.vae.decode(out).clamp(0, 1))
        finally:
            for lora in loras:
                lora.scale = 1.0
        return torch.cat(images)

    def weights(self) -> EDLoRAWeights:
        s = self.settings
        return self.params.to_weights(s.class_word, "sd15", include_text=s.lr_text > 0, include_unet=s.lr_unet > 0)


def _encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of ``pixels`` (``[N, 3, H, W]`` in 0..1) as ``(mean, std)`` latents on the CPU, before the
    model's latent scaling. For a VAE without a Gaussian posterior the std is 0 (its encoding is exact)."""
    import comfy.model_management

    engine = vae.first_stage_model
    regulariser = type(getattr(engine, "regularization", None)).__name__
    gaussian = regulariser == "DiagonalGaussianRegularizer" and hasattr(engine, "quant_conv")
    if not gaussian or getattr(engine, "max_batch_size", None) is not None:
        mean = vae.encode(pixels.permute(0, 2, 3, 1)).float().cpu()
        return mean, torch.zeros_like(mean)
    comfy.model_management.load_models_gpu([vae.patcher])
    x = vae.process_input(pixels).to(vae.vae_dtype).to(vae.device)
    # the moments AutoencoderKL's regulariser takes its mode from (comfy/ldm/models/autoencoder.py)
    moments = engine.quant_conv(engine.encoder(x)).float().cpu()
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def _nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` masks to ``size`` by nearest neighbour (Mix-of-Show's masks: cv2 INTER_NEAREST to 64²)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return torch.nn.functional.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]


def _block_downscale(diffusion_model, kind: str, number: int) -> int:
    """How many times smaller than the latent the activations of ``(kind, number)`` are (SD-style UNets)."""
    channel_mult = list(getattr(diffusion_model, "channel_mult", (1, 2, 4, 4)))
    levels = len(channel_mult)
    blocks = getattr(diffusion_model, "num_res_blocks", [2] * levels)
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks] * levels
    if kind == "middle":
        return 2 ** (levels - 1)
    if kind == "input":
        # input block 0 is conv_in; each level has num_res_blocks blocks then (except the last) a downsample
        index = 1
        for level in range(levels):
            for _ in range(blocks[level]):
                if index == number:
                    return 2**level
                index += 1
            if level != levels - 1:
                index += 1
        return 0
    index = 0
    for level in reversed(range(levels)):
        for _ in range(blocks[level] + 1):
            if index == number:
                return 2**level
            index += 1
    return 0


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
