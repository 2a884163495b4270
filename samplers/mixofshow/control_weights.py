"""Per-box spatial weights of a ControlNet / T2I-Adapter (official Mix-of-Show's ``region_keypose_adaptor_weight``
/ ``region_sketch_adaptor_weight``, TencentARC/Mix-of-Show mixofshow/pipelines/pipeline_regionally_t2iadapter.py
l. 488-538): every residual the control adds to the UNet is multiplied by a map that holds the box's weight on
the cells inside the box (later boxes over earlier ones) and the weight for everywhere else outside them.

The official code maps a box to each feature grid with ``ceil(start)`` .. ``floor(end)``: the cells wholly inside
it. :func:`weight_map` takes the cells whose whole area the box's (or SAM mask's) pixel mask covers, which for a
box is the same set.

The maths takes tensors; :func:`install_control_weights` is the ComfyUI glue (an APPLY_MODEL wrapper on the
regional node's clone, which scales the control residuals ComfyUI hands the model; nothing global changes).
"""

from __future__ import annotations

import torch

WRAPPER_KEY = "multiconcept_control_weights"


def weight_map(masks: torch.Tensor, weights: list[float], outside: float, hw: tuple[int, int]) -> torch.Tensor:
    """``[h, w]``: ``outside`` everywhere, each box's weight on the cells its mask ``[N, H, W]`` wholly covers."""
    out = torch.full(tuple(hw), float(outside))
    if masks.shape[0] == 0:
        return out
    cover = torch.nn.functional.adaptive_avg_pool2d(masks.float()[:, None], tuple(hw))[:, 0]
    for i, w in enumerate(weights):
        if w is not None:
            out[cover[i] >= 1 - 1e-6] = float(w)
    return out


def scale_control(control: dict, masks: torch.Tensor, weights: list[float], outside: float) -> dict:
    """A copy of ComfyUI's control dict (``{"input": [...], "middle": [...], "output": [...]}`` of residuals
    ``[B, C, h, w]`` or None) with every residual multiplied by its grid's :func:`weight_map`."""
    maps: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, residuals in control.items():
        if not isinstance(residuals, list):
            out[name] = residuals
            continue
        scaled = []
        for r in residuals:
            if isinstance(r, torch.Tensor) and r.ndim == 4:
                hw = tuple(r.shape[-2:])
                if hw not in maps:
                    maps[hw] = weight_map(masks, weights, outside, hw)
                r = r * maps[hw].to(device=r.device, dtype=r.dtype)
            scaled.append(r)
        out[name] = scaled
    return out


class ControlWeights:
    """The APPLY_MODEL wrapper: scales the call's control residuals, then runs the model as it was."""

    def __init__(self, masks: torch.Tensor, weights: list[float], outside: float):
        self.masks = masks.float().cpu()
        self.weights = list(weights)
        self.outside = float(outside)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        if control is not None:
            control = scale_control(control, self.masks, self.weights, self.outside)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)


def install_control_weights(model_patcher, masks: torch.Tensor, weights: list[float], outside: float) -> None:
    """Put :class:`ControlWeights` on ``model_patcher`` (a clone)."""
    import comfy.patcher_extension

    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, ControlWeights(masks, weights, outside)
    )
