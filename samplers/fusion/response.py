"""Response-weighted mixing of concept LoRAs (seed "elastic LoRA combination"): the maths, pure torch.

At inference each concept's LoRA is weighted by how strongly the prompt responds to the concept:

* ``R_i = max_t cos(e_avg_i, e_prompt_t)``: ``e_avg_i`` is the mean of concept ``i``'s special-token input
  embeddings, ``e_prompt_t`` the text-encoder output of the prompt at token ``t``. The seed writes a dot
  product; we use the cosine, so that the scale of the text-encoder outputs (which grows with depth and
  differs between checkpoints and between CLIP-L and CLIP-G) does not decide the weights: only the
  direction does. ``R_i`` lies in ``[-1, 1]``.
* ``"sum to one"`` (the seed's weighted average): ``w_i = max(R_i, 0) / sum_j max(R_j, 0)``; uniform
  (``1 / N``) when every ``R_j <= 0``.
* ``"softmax"``: ``w_i = exp(R_i / T) / sum_j exp(R_j / T)`` with temperature ``T > 0`` (small ``T``: the
  best-responding concept takes nearly all; large ``T``: towards uniform).

Both give weights that are >= 0 and sum to 1. The ComfyUI glue (``response_mix``) builds ``e_avg`` and
``e_prompt`` and applies each concept's LoRA at its strength times ``w_i``.
"""

from __future__ import annotations

import math

import torch

MODES = ("sum to one", "softmax")
DEFAULT_TEMPERATURE = 0.05


def response_scores(concept_means: torch.Tensor, prompt_tokens: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``R [N]`` with ``R_i = max_t <e_i, p_t> / (max(|e_i|, eps) * max(|p_t|, eps))``.

    ``concept_means`` ``[N, D]``: row ``i`` is ``e_avg_i``. ``prompt_tokens`` ``[T, D]``: row ``t`` is the
    text-encoder output at prompt token ``t`` (for layer-wise encodings: every layer's rows, so the max runs
    over layers as well). A zero vector has cosine 0 with everything. Computed in at least float32.
    """
    if concept_means.ndim != 2 or prompt_tokens.ndim != 2:
        raise ValueError(
            f"concept_means must be [N, D] and prompt_tokens [T, D]; got {list(concept_means.shape)} and "
            f"{list(prompt_tokens.shape)}"
        )
    if concept_means.shape[1] != prompt_tokens.shape[1]:
        raise ValueError(
            f"the concept embeddings are {concept_means.shape[1]} wide but the prompt encodings "
            f"{prompt_tokens.shape[1]}: they come from different text encoders"
        )
    if concept_means.shape[0] == 0 or prompt_tokens.shape[0] == 0:
        raise ValueError("response_scores needs at least one concept and one prompt token")
    dtype = torch.promote_types(torch.promote_types(concept_means.dtype, prompt_tokens.dtype), torch.float32)
    e = torch.nn.functional.normalize(concept_means.to(dtype), dim=1, eps=eps)
    p = torch.nn.functional.normalize(prompt_tokens.to(device=concept_means.device, dtype=dtype), dim=1, eps=eps)
    return (e @ p.T).amax(dim=1)


def response_weights(
    scores: torch.Tensor, mode: str = "sum to one", temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """``w [N]`` from ``R [N]`` (see the module doc for both formulas).

    ``"sum to one"``: ``w_i = max(R_i, 0) / sum_j max(R_j, 0)``, or ``1 / N`` for every concept when all
    ``R_j <= 0``. ``"softmax"``: ``w = softmax(R / temperature)``; ``temperature`` must be finite and > 0.
    """
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty vector; got shape {list(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("the response scores are not all finite")
    if mode == "sum to one":
        positive = scores.clamp(min=0)
        total = positive.sum()
        if float(total) <= 0:
            return torch.full_like(scores, 1.0 / scores.shape[0])
        return positive / total
    if mode == "softmax":
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number above 0; got {temperature!r}")
        return torch.softmax(scores / float(temperature), dim=0)
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


__all__ = ["DEFAULT_TEMPERATURE", "MODES", "response_scores", "response_weights"]
