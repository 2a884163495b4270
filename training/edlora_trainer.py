"""Training an ED-LoRA on ComfyUI's own model code (the ComfyUI glue of the trainer).

SD1.5 with Mix-of-Show's recipe, SDXL with Concept Conductor's (the official values in :mod:`.recipe`; SDXL
adds CLIP-G embeddings and LoRA beside CLIP-L's and feeds the UNet's ADM input from CLIP-G's pooled output).
What one step does:

1. pick ``batch_size`` pictures and, for each, a timestep ``t ~ U{0..999}``, noise ``ε`` (plus a per-channel
   offset, ``noise_offset``) and the augmentations (:mod:`.augment`: crop and place on a black canvas, caption
   shuffle and template) — all drawn from generators seeded by ``(seed, step)``, so a step is the same step
   whether or not the run was interrupted;
2. encode the augmented pictures with the VAE and draw a fresh sample of its posterior (``mean + std · n``);
3. encode each caption once per cross-attention layer with that layer's concept tokens (16 encodings on
   SD1.5, 70 on SDXL) through the text encoder(s) carrying the trainable text-encoder LoRA — the same encoder
   the loader uses at inference, so what is trained is what is sampled;
4. run the UNet (trainable LoRA on every attention projection, layer ``i`` reading encoding ``i``) on the
   noised latent and take the noise-prediction error (inside the subject mask, or the picture's own area),
   plus the attention regulariser when there is a mask to keep the words' attention in (:mod:`.losses`);
5. AdamW step on the parameter groups at this step's learning rate (linear decay to 0), then the embedding rule
   (frozen for the rest of the run once their mean norm reaches the threshold).

Memory: the batch may run as micro-batches (``accumulation``, :mod:`.loop`); ``gradient_checkpointing`` recomputes
every ResBlock, transformer block and text-encoder layer in the backward pass; a float16 model is trained with
dynamic loss scaling, and on CUDA the text encoders run under autocast in the UNet's half dtype.

The LoRAs run as branches beside their layers (``y = layer(x) + lora(x)``, in float32, as Mix-of-Show's
LoRALinearLayer), installed as object patches of each layer's ``forward`` on clones of the user's MODEL and CLIP
(``ModelPatcher.add_object_patch``), which ComfyUI undoes when another model is loaded; the inputs are never
modified. ComfyUI creates model weights in inference mode, and such tensors cannot be kept for the backward
pass, so every weight the backward pass needs gets an identity weight wrapper: ComfyUI then hands each layer a
fresh copy of its weight (what its own LoRA trainer does for every layer).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.utils.checkpoint

from ..formats.edlora import EDLoRAWeights, validate_concept_words
from ..samplers.edlora.clip import LAYERWISE_KEY, ConceptTextEncoder, with_vocabulary
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
    AUTO_RATE,
    EMBEDDING_RULES,
    LR_SCHEDULES,
    NOISE_OFFSET,
    RECIPES,
    WEIGHT_DECAY,
    auto_steps,
    chosen,
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
    """One run's settings. The defaults are the official recipe of the model's family (:mod:`.recipe` cites each):
    a rate of ``AUTO_RATE`` (-1) and a steps/rank/batch/resolution of 0 mean "the official value", filled in by
    :meth:`resolved` once the family is known. The ``_g`` fields are SDXL's CLIP-G parts; left at "official" they
    follow their CLIP-L field when that one is set explicitly."""

    concept_words: tuple[str, ...]
    class_word: str
    steps: int = 0  # 0: pictures × the official samples per picture / batch_size
    lr_embedding: float = AUTO_RATE
    lr_text: float = AUTO_RATE
    lr_unet: float = AUTO_RATE
    rank: int = 0  # the UNet LoRA's rank (and the text LoRAs' when set)
    batch_size: int = 0
    seed: int = 0
    resolution: int = 0
    masked_loss: bool = True
    attention_weight: float = ATTENTION_WEIGHT
    attention_regulariser: str = "mix-of-show"
    full_identity: bool = False
    orthogonal: str = "off"
    orthogonality_weight: float = 1e-3
    keep_from_zero_weight: float = 1e-4
    embedding_rule: str = "freeze at mean norm"
    norm_cap: float = AUTO_RATE  # the threshold of the embedding rule (freeze or cap) for CLIP-L
    lr_schedule: str = "linear to 0"
    weight_decay: float = WEIGHT_DECAY
    noise_offset: float = NOISE_OFFSET
    image_augmentation: str = IMAGE_MODES[0]
    caption_augmentation: str = CAPTION_MODES[0]
    sample_posterior: bool = True
    adam_epsilon: float = 1e-8
    gradient_checkpointing: bool = False
    accumulation: int = 1  # micro-batches per step (their gradients summed before the optimiser step)
    mixed_precision: bool = True  # on CUDA, the text encoders in the UNet's half dtype (see EDLoRATrainer)
    lr_embedding_g: float = AUTO_RATE
    lr_text_g: float = AUTO_RATE
    rank_text: int = 0
    rank_text_g: int = 0
    norm_cap_g: float = AUTO_RATE

    def check(self) -> None:
        try:
            validate_concept_words(self.concept_words)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if not self.concept_words:
            raise TrainingError("give the concept one or more words, e.g. <cat1> <cat2>")
        if not self.class_word.strip():
            raise TrainingError("the class word is empty: name what the concept is (man, dog, chair)")
        for name in ("lr_embedding", "lr_text", "lr_unet", "lr_embedding_g", "lr_text_g"):
            value = getattr(self, name)
            if not math.isfinite(value) or (value < 0 and value != AUTO_RATE):
                raise TrainingError(f"learning rate {name} = {value} must be a finite number ≥ 0 (or -1: official)")
        if self.lr_embedding == 0:
            raise TrainingError(
                "the embedding learning rate is 0: the concept words would learn nothing. Use -1 (the official "
                "rate) or about 1e-3 (set the LoRA rates to 0 instead to train the words alone)"
            )
        if min(self.steps, self.batch_size, self.rank, self.rank_text, self.rank_text_g, self.resolution) < 0:
            raise TrainingError("steps, batch size, rank and resolution must be at least 0 (0 = the official value)")
        if self.accumulation < 1:
            raise TrainingError(f"accumulation = {self.accumulation}: give 1 (no accumulation) or more micro-batches")
        choices = {"orthogonal": ORTHOGONAL_MODES, "attention_regulariser": ATTENTION_REGULARISERS,
                   "embedding_rule": EMBEDDING_RULES, "lr_schedule": LR_SCHEDULES, "image_augmentation": IMAGE_MODES,
                   "caption_augmentation": CAPTION_MODES}  # fmt: skip
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise TrainingError(f"{name} must be one of {options}, not {getattr(self, name)!r}")
        if not math.isfinite(self.adam_epsilon) or self.adam_epsilon <= 0:
            raise TrainingError(f"adam_epsilon = {self.adam_epsilon} must be a positive number")
        for name in ("attention_weight", "orthogonality_weight", "keep_from_zero_weight", "norm_cap", "norm_cap_g",
                     "weight_decay", "noise_offset"):  # fmt: skip
            value = getattr(self, name)
            auto = name.startswith("norm_cap") and value == AUTO_RATE
            if not math.isfinite(value) or (value < 0 and not auto):
                raise TrainingError(f"{name} = {value} must be a finite number ≥ 0")

    def resolved(self, family: str, num_images: int) -> TrainSettings:
        """These settings with every "official" value replaced by ``family``'s (``"sd15"`` / ``"sdxl"``)."""
        r = RECIPES[family]
        g = "g" in r.rank_text
        batch = chosen(self.batch_size, r.batch_size)
        return replace(
            self,
            batch_size=batch,
            steps=chosen(self.steps, auto_steps(num_images, batch, r.samples_per_picture)),
            resolution=chosen(self.resolution, r.resolution),
            lr_embedding=chosen(self.lr_embedding, r.lr_embedding["l"], AUTO_RATE),
            lr_text=chosen(self.lr_text, r.lr_text["l"], AUTO_RATE),
            lr_unet=chosen(self.lr_unet, r.lr_unet, AUTO_RATE),
            rank=chosen(self.rank, r.rank_unet),
            rank_text=chosen(self.rank_text, chosen(self.rank, r.rank_text["l"])),
            norm_cap=chosen(self.norm_cap, r.norm_threshold["l"], AUTO_RATE),
            lr_embedding_g=chosen(self.lr_embedding_g, _follow(self.lr_embedding, r.lr_embedding.get("g")), AUTO_RATE)
            if g
            else 0.0,
            lr_text_g=chosen(self.lr_text_g, _follow(self.lr_text, r.lr_text.get("g")), AUTO_RATE) if g else 0.0,
            rank_text_g=chosen(self.rank_text_g, chosen(self.rank, r.rank_text["g"])) if g else 0,
            # (a threshold does not follow CLIP-L's: CLIP-G's embeddings are larger; 0 turns both off)
            norm_cap_g=chosen(self.norm_cap_g, 0.0 if self.norm_cap == 0 else r.norm_threshold.get("g"), AUTO_RATE)
            if g
            else 0.0,
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d["concept_words"] = list(self.concept_words)
        return d


def _follow(explicit: float, official):
    """A CLIP-G value left at "official": its CLIP-L field's value when that was set, else the official one."""
    return official if explicit == AUTO_RATE else explicit


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
    return _token_table(clip, clip_key)[torch.tensor(ids)].float().mean(0).detach().clone()


def _token_table(clip, clip_key: str) -> torch.Tensor:
    prefix = text_encoder_prefixes(clip)[clip_key]
    return clip.patcher.model.state_dict()[prefix + "text_model.embeddings.token_embedding.weight"]


# ------------------------------------------------------------------------------------- the trainer


class _OutOfPlaceCLIPLayer(torch.nn.Module):
    """ComfyUI's ``CLIPLayer`` with ``x = x + ...`` where it writes ``x += ...``: autograd keeps each layer
    norm's input for the backward pass, and the in-place add would overwrite it. Same children under the same
    names (so weight wrappers still find them), same values; installed as an object patch on the CLIP clone."""

    def __init__(self, layer, checkpointing: bool = False):
        super().__init__()
        self.layer_norm1 = layer.layer_norm1
        self.self_attn = layer.self_attn
        self.layer_norm2 = layer.layer_norm2
        self.mlp = layer.mlp
        self.checkpointing = checkpointing

    def forward(self, x, mask=None, optimized_attention=None):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, mask, optimized_attention, use_reentrant=False)
        return self._forward(x, mask, optimized_attention)

    def _forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))


def _out_of_place_clip_layers(patcher, checkpointing: bool = False) -> int:
    count = 0
    for name, module in patcher.model.named_modules():
        # (a layer may already be ours: a clone from an earlier run stays patched until ComfyUI unloads it)
        if type(module).__name__ in ("CLIPLayer", "_OutOfPlaceCLIPLayer") and all(
            hasattr(module, a) for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp")
        ):
            patcher.add_object_patch(name, _OutOfPlaceCLIPLayer(module, checkpointing))
            count += 1
    return count


class _Checkpointed:
    """A UNet block's ``forward`` run under activation checkpointing: its activations are not kept for the backward
    pass but recomputed there (ComfyUI's TrainLoraNode does the same to the UNet's top-level blocks). The dicts it is
    handed (``transformer_options``) are copied first: the UNet changes them in place between blocks, and the
    recomputation must see them as the forward did."""

    def __init__(self, module):
        self.forward = type(module).forward.__get__(module)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(self._run, args, kwargs, use_reentrant=False)

    def _run(self, args, kwargs):
        return self.forward(*args, **kwargs)


CHECKPOINTED_BLOCKS = ("ResBlock", "BasicTransformerBlock")


def _checkpoint_unet_blocks(patcher) -> int:
    """Object patches running every ResBlock and transformer block of the UNet under checkpointing."""
    count = 0
    for name, module in patcher.model.diffusion_model.named_modules():
        if type(module).__name__ in CHECKPOINTED_BLOCKS:
            patcher.add_object_patch(f"diffusion_model.{name}.forward", _Checkpointed(module))
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
        family = model_family(model)
        if family not in RECIPES:
            found = FAMILIES[family].name if family else type(model.model.model_config).__name__
            raise TrainingError(
                f"training is available for SD1.5- and SDXL-family checkpoints; this MODEL is {found}. Load an SD1.5 "
                "or SDXL checkpoint."
            )
        keys = tuple(sorted(clip.tokenize("a").keys()))
        if keys != FAMILIES[family].clip_keys:
            other = next((f.name for f in FAMILIES.values() if f.clip_keys == keys), None)
            what = f"an {other} CLIP" if other else f"a CLIP with text encoders {list(keys)}"
            raise TrainingError(
                f"the MODEL is {FAMILIES[family].name} but the CLIP is {what}: connect the CLIP of the same "
                f"{FAMILIES[family].name} checkpoint (it needs {' and '.join('CLIP-' + k.upper() for k in FAMILIES[family].clip_keys)})"
            )
        for w in existing:
            if w.base_model != family:
                raise TrainingError(
                    f"orthogonal_to holds an {FAMILIES[w.base_model].name} ED-LoRA ({' '.join(w.words)}), and this "
                    f"MODEL is {FAMILIES[family].name}: keep apart from ED-LoRAs of the same family only (remove it "
                    "from the stack, or train on its family's checkpoint)"
                )
        self.settings = settings
        if len(captions) != images.shape[0]:
            raise TrainingError(f"{len(captions)} captions for {images.shape[0]} images")
        import comfy.model_management

        self.family_key = family
        self.family = FAMILIES[family]
        settings = settings.resolved(family, int(images.shape[0]))
        self.settings = settings
        self.clip_keys = self.family.clip_keys
        if settings.batch_size % settings.accumulation:
            raise TrainingError(
                f"accumulation {settings.accumulation} does not divide batch_size {settings.batch_size}: each "
                "micro-batch must hold the same number of pictures (e.g. batch 4 with accumulation 1, 2 or 4)"
            )
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
                f"more than once. Lower batch_size to {self.num_images} (steps 0 still gives each picture its "
                f"{RECIPES[family].samples_per_picture} samples) or add pictures."
            )
        self.vae = vae
        self.process_latent_in = model.model.process_latent_in
        with torch.inference_mode(False), torch.no_grad():
            r = settings.resolution
            self.latent_shape = tuple(vae.encode(torch.zeros(1, r, r, 3)).shape[1:])
            # without the crop-and-place augmentation the pictures never change: their posteriors are kept
            self.posteriors = None if self.placing else _encode_posterior(vae, self.pixels)
        self.device = comfy.model_management.get_torch_device()
        self.identity = {
            "family": self.family.name,
            "model": None,  # filled in by load(): the weights as loaded, with the MODEL's own patches
            "concept_words": list(settings.concept_words),
            "class_word": settings.class_word,
            "rank": settings.rank,
            "resolution": settings.resolution,
            "images": _tensor_digest(self.pixels),
            "orthogonal": settings.orthogonal,
        }
        self.frozen_embeddings: dict[tuple, torch.Tensor] | None = None  # set when the embedding rule freezes them
        # float16 activations: gradients of ~1e-5 would fall below float16's normal range, so the loss is scaled
        # (dynamically, as torch.amp); bfloat16 and float32 have float32's range and need none
        compute = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
        # (first scale 2^12, not torch's 2^16: this loss is O(1) and 2^16 overflows the first steps, which are skipped)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**12) if compute == torch.float16 else None
        # Mixed precision on CUDA: ComfyUI runs the text encoders in float32 whatever the UNet's dtype; here they run
        # under autocast in the UNet's half dtype (Concept Conductor trains everything in bf16), their LoRA branches
        # still in float32 (LoRADelta.branch), the parameters and AdamW's state float32. An SDXL step encodes each
        # caption 70 times through CLIP-L and CLIP-G: the largest part of its time on a GPU.
        half = compute in (torch.float16, torch.bfloat16) and self.device.type == "cuda"
        self.text_autocast_dtype = compute if (half and settings.mixed_precision) else None

        gen = torch.Generator().manual_seed(int(settings.seed))
        with torch.inference_mode(False):
            self.unet_targets = unet_lora_targets(model)
            self.text_targets = {k: text_lora_targets(clip, k) for k in self.clip_keys}
            init = self._initial_embeddings(clip, gen)
            frozen = self._frozen_downs(existing, gen) if settings.orthogonal == "frozen basis" else None
            ranks = {"unet": settings.rank, "l": settings.rank_text, "g": settings.rank_text_g}
            self.params = EDLoRAParameters(
                settings.concept_words, init,
                {k: {m: shape for m, (_, shape) in t.items()} for k, t in self.text_targets.items()},
                {m: shape for m, (_, shape) in self.unet_targets.items()},
                ranks, gen, frozen,
            )  # fmt: skip
            self.params.to(self.device)
            self.old_downs = self._old_downs(existing) if settings.orthogonal == "penalty" else None
            self.optimizer = torch.optim.AdamW(
                self.params.param_groups(self.rates(), settings.weight_decay), eps=settings.adam_epsilon
            )
            self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        for k in self.clip_keys:
            if self.rates()[f"text_{k}"] == 0:
                self.params.text_lora[f"clip_{k}"].requires_grad_(False)  # no gradients, nothing to average
        if settings.lr_unet == 0:
            self.params.unet_lora.requires_grad_(False)
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

    def rates(self) -> dict[str, float]:
        """The learning rate of each parameter group (see :meth:`EDLoRAParameters.param_groups`)."""
        s = self.settings
        out = {"embedding_l": s.lr_embedding, "text_l": s.lr_text, "unet": s.lr_unet}
        if "g" in self.clip_keys:
            out.update({"embedding_g": s.lr_embedding_g, "text_g": s.lr_text_g})
        return out

    def _initial_embeddings(self, clip, gen) -> dict[str, dict[str, torch.Tensor]]:
        """Each word's starting rows for each text encoder. CLIP-L: Mix-of-Show's (the class word's embedding for
        the last word, N(0, 0.013²) for the others). CLIP-G (SDXL): the class word's CLIP-G embedding, and random
        vectors scaled by the ratio of CLIP-G's to CLIP-L's token-embedding spread (so they sit where 0.013 sits
        among CLIP-L's tokens)."""
        from .recipe import RANDOM_WORD_STD

        words, layers = self.settings.concept_words, self.family.layers
        out: dict[str, dict[str, torch.Tensor]] = {w: {} for w in words}
        spread = {k: float(_token_table(clip, k).float().std()) for k in self.clip_keys}
        for k in self.clip_keys:
            std = RANDOM_WORD_STD * (spread[k] / spread["l"] if spread["l"] > 0 else 1.0)
            class_emb = class_word_embedding(clip, self.settings.class_word, k)
            for w, rows in initial_embeddings(words, class_emb, layers, gen, std).items():
                out[w][k] = rows
        return out

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
        if self.settings.gradient_checkpointing and not _checkpoint_unet_blocks(self.model):
            raise TrainingError(
                "gradient_checkpointing is on, but this MODEL's UNet has no ResBlock or BasicTransformerBlock to "
                "recompute (not the SD1.5/SDXL UNet layout): turn gradient_checkpointing off"
            )
        add_layerwise_routing(self.model)  # for preview sampling; a no-op in the training forward
        self.order = cross_attention_order(self.model.model.diffusion_model)
        self.router = _LayerContextRouter(self.order)
        self.probe = _AttentionProbe()
        self.probe_layers = self._probe_layers()

        clip = clip.clone()
        rates = self.rates()
        for k in self.clip_keys:
            if rates[f"text_{k}"] > 0:
                _add_branches(clip.patcher, self.params.text_items(k), self.text_targets[k])
        _wrap_inference_weights(clip.patcher, "", set())
        if not _out_of_place_clip_layers(clip.patcher, self.settings.gradient_checkpointing):
            raise TrainingError(
                "this CLIP's text encoder is not the CLIP layout the trainer knows (no CLIPLayer found)"
            )
        entry = ConceptEntry(
            uid="training",
            words=self.settings.concept_words,
            embeddings={
                w: {k: self.params.embedding(w, k) for k in self.clip_keys} for w in self.settings.concept_words
            },
            source="training",
        )
        self.clip = with_vocabulary(clip, ConceptVocabulary().with_entry(entry))
        # what the training steps encode with: the per-layer variants only (not the layer-averaged prompt the
        # sampling conditioning also carries, which the loss never reads: 1 of 17 encodings on SD1.5); the same
        # patcher, so ComfyUI never swaps models between the two
        self.train_clip = copy.copy(self.clip)
        self.train_clip.cond_stage_model = ConceptTextEncoder(
            self.clip.cond_stage_model.base, self.clip.cond_stage_model.vocabulary, include_reference=False
        )

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

    def encode(self, caption: str) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """``[1, L, 77, width]`` per-layer encodings of ``caption`` (with grad), the concept tokens' positions and
        the pooled output (SDXL: CLIP-G's, of layer 0's prompt, as the loader samples and Concept Conductor's trainer
        takes it; None on SD1.5)."""
        tokens = self.clip.tokenize(caption)
        positions = [j for j, item in enumerate(tokens["l"][0]) if is_marker(item[0]) and MARKER_KEY in item[0]]
        out = self.train_clip.encode_from_tokens(tokens, return_dict=True)
        layers = out.get(LAYERWISE_KEY)
        if layers is None:
            raise TrainingError(f"the caption {caption!r} does not name the concept words")
        return layers.layers, positions, out.get("pooled_output") if "g" in self.clip_keys else None

    def loss(self, step: int, rows: list[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``step`` on the given rows of its global batch (all rows by default), as the mean over those
        rows. The context routing and the attention probe stay set until :meth:`release` (after the backward pass:
        gradient checkpointing runs the forward again there)."""
        s = self.settings
        order, t, noise, posterior = self._draws(step)
        rows = list(range(len(order))) if rows is None else rows
        x0, loss_mask, attention_mask, captions = self.samples(step, rows, order, posterior)
        x0 = x0.to(self.device)
        eps = noise[rows].to(self.device)
        ms = self.model.model.model_sampling
        sigma = ms.sigma(t[rows].float()).to(self.device)
        x = ms.noise_scaling(sigma, eps, x0)

        with self._text_precision():
            encoded = [self.encode(c) for c in captions]
        self.router.layers = torch.cat([e[0] for e in encoded]).to(self.device)
        use_attention = s.attention_weight > 0 and attention_mask is not None and bool(self.probe_layers)
        self.probe.reset([e[1][: len(s.concept_words)] for e in encoded] if use_attention else None)
        options = self._transformer_options(use_attention)
        extra = {}
        if encoded[0][2] is not None:  # SDXL: pooled text + the sizes, through the model's own ADM encoding
            extra["y"] = self._adm(torch.cat([e[2] for e in encoded]).to(self.device))
        denoised = self.model.model.apply_model(x, sigma, c_crossattn=self.router.layers[:, 0],
                                                transformer_options=options, **extra)  # fmt: skip
        pred_eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
        mask = loss_mask.to(self.device) if loss_mask is not None else None
        total = denoising_loss(pred_eps, eps, mask)
        parts = {"denoise": float(total.detach())}
        if use_attention and self.probe.sums:
            attention = self._attention_term(attention_mask.to(self.device), x0.shape[-2:])
            parts["attention"] = float(attention.detach())
            total = total + attention
        if self.old_downs is not None and s.lr_unet > 0:
            downs = [lora.down for _m, lora in self.params.unet_items()]
            orth = orthogonality_penalty(downs, self.old_downs)
            zero = keep_from_zero(downs)
            parts["orthogonality"] = float(orth.detach())
            total = total + s.orthogonality_weight * orth + s.keep_from_zero_weight * zero
        return total, parts

    def _text_precision(self):
        if self.text_autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.text_autocast_dtype)

    def release(self) -> None:
        """Forget the last loss's routing and probe state (after its backward pass)."""
        self.router.layers = None
        self.probe.reset(None)

    def _adm(self, pooled: torch.Tensor) -> torch.Tensor:
        """SDXL's ADM input for ``pooled`` ``[b, 1280]``: the pooled text and the size conditioning of a whole,
        uncropped picture at the training resolution (ComfyUI's SDXL.encode_adm, as when sampling)."""
        r = self.settings.resolution
        y = self.model.model.encode_adm(pooled_output=pooled, width=r, height=r, crop_w=0, crop_h=0,
                                        target_width=r, target_height=r)  # fmt: skip
        return y.to(self.device)

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
        """The embedding rule after the optimiser step of 0-based ``step``. SDXL: each text encoder's embeddings
        have their own threshold (CLIP-L 0.55, CLIP-G 1.5), and either one reaching it freezes both."""
        s = self.settings
        words = s.concept_words
        thresholds = {"l": s.norm_cap, "g": s.norm_cap_g}
        if s.embedding_rule == "cap each row":
            for k in self.clip_keys:
                if thresholds[k] > 0:
                    for w in words:
                        cap_norm_(self.params.embedding(w, k), thresholds[k])
        elif s.embedding_rule == "freeze at mean norm":
            if self.frozen_embeddings is not None:  # train_edlora.py l. 135-136: put back after every step
                for (w, k), t in self.frozen_embeddings.items():
                    self.params.embedding(w, k).copy_(t)
            elif any(
                thresholds[k] > 0 and mean_norm([self.params.embedding(w, k) for w in words]) >= thresholds[k]
                for k in self.clip_keys
            ):
                self.freeze_embeddings(step + 1)

    def freeze_embeddings(self, after_step: int) -> None:
        """Keep the embeddings (every text encoder's) as they are now for the rest of the run (train_edlora.py
        l. 141-143)."""
        self.frozen_embeddings = {
            (w, k): self.params.embedding(w, k).detach().clone() for w in self.settings.concept_words
            for k in self.clip_keys
        }  # fmt: skip
        self.frozen_at = int(after_step)
        log.info("[multi-concept] Train ED-LoRA: the concept embeddings reached the mean norm threshold after step %d "
                 "and are frozen from now on (Mix-of-Show's rule); the LoRAs keep learning", after_step)  # fmt: skip

    def extra_state(self) -> dict:
        """What a resume state needs besides the parameters: when the embeddings were frozen, the loss scale."""
        out = {"embeddings_frozen_at": getattr(self, "frozen_at", None) if self.frozen_embeddings else None}
        if self.scaler is not None:
            out["loss_scale"] = self.scaler.state_dict()
        return out

    def load_extra_state(self, extra: dict) -> None:
        at = extra.get("embeddings_frozen_at")
        if at is not None:
            self.freeze_embeddings(int(at))
        if self.scaler is not None and extra.get("loss_scale"):
            self.scaler.load_state_dict(extra["loss_scale"])

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
        loras = self.params.text_loras() + list(self.params.unet_lora.values())
        images = []
        try:
            for strength in strengths:
                for lora in loras:
                    lora.scale = float(strength)
                size = {"width": self.settings.resolution, "height": self.settings.resolution}
                positive = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text), add_dict=size)
                negative = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(""), add_dict=size)
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
        text = any(v > 0 for k, v in self.rates().items() if k.startswith("text_"))
        return self.params.to_weights(s.class_word, self.family_key, include_text=text, include_unet=s.lr_unet > 0)


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
