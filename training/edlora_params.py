"""The trainable parts of an ED-LoRA, as torch modules (pure torch; no ComfyUI).

* :class:`LoRADelta` — one low-rank update ``W + up @ down`` for one linear weight, run as its own branch
  beside the layer (``y = layer(x) + (x @ downᵀ) @ upᵀ``, Mix-of-Show's LoRALinearLayer), in float32 whatever
  the layer's dtype: added into a float16 weight, a small early update would round away.
* :class:`EDLoRAParameters` — the concept's layer-wise token embeddings plus its text-encoder and UNet LoRA,
  with Mix-of-Show's initialisation, the optimiser's parameter groups, a flat name -> tensor view (for
  resume states and the distributed gradient average) and the conversion to the file format.

Initialisation (Mix-of-Show, see :mod:`.recipe`): LoRA ``down`` as ``kaiming_uniform_(a=√5)``, i.e.
``U(±1/√in)`` (std ``1/√(3·in)``), ``up = 0`` (so training starts from the base model exactly); the last concept
word starts as the class word's embedding, the others as one ``N(0, 0.013²)`` vector (about a real token's
norm), each copied to every layer, so the class word anchors the concept while the other words learn what sets
it apart.
"""

from __future__ import annotations

import torch

from ..formats.edlora import EDLoRAWeights, LoRAPair
from .recipe import RANDOM_WORD_STD, WEIGHT_DECAY, lora_down_bound


class LoRADelta(torch.nn.Module):
    """``weight -> weight + up @ down`` for a ``[out, in]`` weight (alpha 1 while training)."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator,
                 frozen_down: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if frozen_down is not None:
            self.register_buffer("down", frozen_down.float().clone())
        else:
            bound = lora_down_bound(in_features)
            self.down = torch.nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))
        self.scale = 1.0  # the branch's strength (previews at 0 / 0.7 / 1.0, as Mix-of-Show's alpha_list)

    def delta(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight ``weight + up @ down`` (what the saved file applies)."""
        return weight + self.delta().to(device=weight.device, dtype=weight.dtype)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``(x @ downᵀ) @ upᵀ`` in float32: the LoRA's own output for the layer's input ``x`` (also inside an
        autocast region, where the layer itself runs in half precision)."""
        down = self.down
        with torch.autocast(down.device.type, enabled=False):
            out = (x.to(device=down.device, dtype=torch.float32) @ down.T) @ self.up.T
        return out if self.scale == 1.0 else out * self.scale


class EDLoRAParameters(torch.nn.Module):
    """Everything one ED-LoRA training run learns.

    ``embedding(word, key)`` ``[L, width]`` (row ``i`` = the token cross-attention layer ``i`` reads) for each text
    encoder ``key`` (ComfyUI's clip key: ``"l"``; SDXL also ``"g"``); ``text_items(key)`` / ``unet_items()`` the
    LoRAs keyed by diffusers module names, as in the file.
    """

    def __init__(self, words: tuple[str, ...], init_embeddings: dict[str, dict[str, torch.Tensor]],
                 text_shapes: dict[str, dict[str, tuple[int, int]]], unet_shapes: dict[str, tuple[int, int]],
                 ranks: dict[str, int], generator: torch.Generator,
                 frozen_downs: dict[str, torch.Tensor] | None = None):  # fmt: skip
        """``init_embeddings[word][key]``, ``text_shapes[key][module]``; ``ranks``: ``"unet"`` and each text key."""
        super().__init__()
        self.words = tuple(words)
        self.clip_keys = tuple(sorted(text_shapes))
        self.rank = int(ranks["unet"])
        self.embeddings = torch.nn.ModuleDict(
            {
                _group(k): torch.nn.ParameterDict(
                    {_key(w): torch.nn.Parameter(init_embeddings[w][k].float().clone()) for w in self.words}
                )
                for k in self.clip_keys
            }
        )
        frozen_downs = frozen_downs or {}
        self.text_lora = torch.nn.ModuleDict(
            {
                _group(k): torch.nn.ModuleDict(
                    {_key(m): LoRADelta(o, i, int(ranks[k]), generator) for m, (o, i) in sorted(text_shapes[k].items())}
                )
                for k in self.clip_keys
            }
        )
        self.unet_lora = torch.nn.ModuleDict(
            {
                _key(m): LoRADelta(o, i, self.rank, generator, frozen_downs.get(m))
                for m, (o, i) in sorted(unet_shapes.items())
            }
        )
        self._text_modules = {k: {_key(m): m for m in text_shapes[k]} for k in self.clip_keys}
        self._unet_modules = {_key(m): m for m in unet_shapes}

    # --- views --------------------------------------------------------------------------------

    def embedding(self, word: str, key: str = "l") -> torch.nn.Parameter:
        return self.embeddings[_group(key)][_key(word)]

    def text_items(self, key: str = "l"):
        return [(self._text_modules[key][k], v) for k, v in self.text_lora[_group(key)].items()]

    def text_loras(self) -> list:
        return [lora for k in self.clip_keys for _m, lora in self.text_items(k)]

    def unet_items(self):
        return [(self._unet_modules[k], v) for k, v in self.unet_lora.items()]

    def param_groups(self, rates: dict[str, float], weight_decay: float = WEIGHT_DECAY):
        """AdamW groups: each text encoder's embeddings, each text encoder's LoRA, the UNet LoRA, all with
        ``weight_decay`` (Mix-of-Show: AdamW's 0.01 on every group). ``rates``: ``embedding_<key>``, ``text_<key>``,
        ``unet``. A part with learning rate 0 is left out (it stays at its initial value: no update)."""
        groups = []
        for k in self.clip_keys:
            if rates[f"embedding_{k}"] > 0:
                params = [self.embedding(w, k) for w in self.words]
                groups.append({"params": params, "lr": rates[f"embedding_{k}"], "weight_decay": weight_decay})
        for k in self.clip_keys:
            text = [p for p in self.text_lora[_group(k)].parameters() if p.requires_grad]
            if rates[f"text_{k}"] > 0 and text:
                groups.append({"params": text, "lr": rates[f"text_{k}"], "weight_decay": weight_decay})
        unet = [p for p in self.unet_lora.parameters() if p.requires_grad]
        if rates["unet"] > 0 and unet:
            groups.append({"params": unet, "lr": rates["unet"], "weight_decay": weight_decay})
        return groups

    def flat(self) -> dict[str, torch.Tensor]:
        """Every tensor (trainable or frozen) by a stable name: ``embedding.<word>``, ``text.<module>.up`` ... for
        CLIP-L (the names SD1.5 resume states have always had), ``embedding_g.<word>``, ``text_g.…`` for CLIP-G."""
        out = {}
        for k in self.clip_keys:
            out.update({f"{_prefix('embedding', k)}.{w}": self.embedding(w, k) for w in self.words})
        for prefix, items in [(_prefix("text", k), self.text_items(k)) for k in self.clip_keys] + [
            ("unet", self.unet_items())
        ]:
            for module, lora in items:
                out[f"{prefix}.{module}.up"] = lora.up
                out[f"{prefix}.{module}.down"] = lora.down
        return out

    @torch.no_grad()
    def load_flat(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (as from :meth:`flat`) into this module's tensors, in place; names must match."""
        mine = self.flat()
        if set(mine) != set(tensors):
            missing = sorted(set(mine) ^ set(tensors))[:4]
            raise ValueError(f"the saved tensors do not match this concept's parameters (e.g. {missing})")
        for name, t in mine.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{name}: saved shape {list(src.shape)} differs from {list(t.shape)}")
            t.copy_(src.to(t))

    def to_weights(self, class_word: str, base_model: str, include_text: bool = True,
                   include_unet: bool = True) -> EDLoRAWeights:  # fmt: skip
        """The learned concept in the file format (detached float32 copies on the CPU); CLIP-L's text LoRA is the
        file's ``text_encoder`` group, CLIP-G's ``text_encoder_2`` (Concept Conductor's layout)."""

        def cpu(t):
            return t.detach().float().cpu().contiguous().clone()

        embeddings = {w: {k: cpu(self.embedding(w, k)) for k in self.clip_keys} for w in self.words}
        text = {}
        if include_text:
            for k in self.clip_keys:
                pairs = {m: LoRAPair(up=cpu(lora.up), down=cpu(lora.down)) for m, lora in self.text_items(k)}
                if pairs:
                    text[TEXT_GROUPS[k]] = pairs
        unet = (
            {m: LoRAPair(up=cpu(lora.up), down=cpu(lora.down)) for m, lora in self.unet_items()} if include_unet else {}
        )
        return EDLoRAWeights(
            words=self.words,
            embeddings=embeddings,
            text_encoder_lora=text,
            unet_lora=unet,
            base_model=base_model,
            class_word=class_word,
            source_format="safetensors",
            metadata={},
        )


# The file's text-encoder LoRA group of each text encoder (formats/edlora.py).
TEXT_GROUPS = {"l": "text_encoder", "g": "text_encoder_2"}


def _group(key: str) -> str:
    return f"clip_{key}"


def _prefix(name: str, key: str) -> str:
    return name if key == "l" else f"{name}_{key}"


def _key(name: str) -> str:
    """ModuleDict/ParameterDict keys may not contain dots; names here are module paths and concept words."""
    return name.replace(".", "__")


def initial_embeddings(words: tuple[str, ...], class_embedding: torch.Tensor, layers: int,
                       generator: torch.Generator, random_std: float = RANDOM_WORD_STD) -> dict[str, torch.Tensor]:  # fmt: skip
    """The last word = the class word's embedding, the others one ``N(0, random_std²)`` vector each; every word's
    vector copied to all ``layers`` rows (``trainer_edlora.py`` l. 170-185: one ``init_feature`` per word)."""
    width = int(class_embedding.shape[-1])
    out = {}
    for i, w in enumerate(words):
        if i == len(words) - 1:
            vector = class_embedding.float().reshape(1, width)
        else:
            vector = torch.randn(1, width, generator=generator) * random_std
        out[w] = vector.repeat(layers, 1)
    return out
