"""Gradients of a loss with respect to the latent, through a model ComfyUI loaded (glue shared by the methods
that nudge the latent between steps: LoRA-Composer, Concept Conductor).

ComfyUI runs nodes under ``torch.inference_mode()``, so the model's weights, the LoRA factors and everything
cached during sampling are *inference tensors*, which autograd refuses to save for the backward pass.
Copying them (what ComfyUI's own LoRA trainer does, one weight copy per layer per forward) would cost the
model's size again in memory. Instead, while :func:`latent_gradient_mode` is active, every inference tensor
or parameter handed to a torch function is replaced by a zero-copy alias (same storage, made through DLPack)
that is an ordinary tensor without ``requires_grad``. So the backward pass reaches only the latent: no
weight gets a gradient, none is copied, and nothing about the model changes.

A ControlNet or T2I-Adapter in the conds adds its residual into the UNet's activations in place (ComfyUI's
``apply_control``: ``h += ctrl``), after autograd saved them for the backward pass, which then refuses to run.
With ``copy_saved`` every tensor autograd saves is saved as a copy, so the in-place add cannot touch it (the
gradient is that of the forward as it ran); it costs the saved activations once more in memory, so the methods
turn it on only when a cond carries a control (:func:`carries_control`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.dlpack import from_dlpack, to_dlpack


def _alias(t):
    if isinstance(t, torch.Tensor) and (t.is_inference() or isinstance(t, torch.nn.Parameter)):
        if t.is_inference() or t.requires_grad:
            return from_dlpack(to_dlpack(t.detach()))
    return t


def _map(values):
    if isinstance(values, (list, tuple)):
        mapped = [_map(v) for v in values]
        return type(values)(mapped) if isinstance(values, list) else tuple(mapped)
    if isinstance(values, dict):
        return {k: _map(v) for k, v in values.items()}
    return _alias(values)


class _Aliases(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if torch.is_grad_enabled():
            args = _map(args)
            kwargs = _map(kwargs or {})
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def latent_gradient_mode(copy_saved: bool = False):
    """Autograd on (outside ComfyUI's inference mode), model tensors aliased as described above; with
    ``copy_saved``, saved tensors kept as copies (see the module docstring)."""
    saved = (
        torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
        if copy_saved
        else contextlib.nullcontext()
    )
    with torch.inference_mode(False), torch.enable_grad(), _Aliases(), saved:
        yield


def carries_control(conds) -> bool:
    """Whether any cond (lists of ComfyUI's processed cond dicts) carries a ControlNet / T2I-Adapter."""
    return any(isinstance(c, dict) and c.get("control") is not None for group in conds if group for c in group)


def trainable_copy(x: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``x`` that requires grad (call inside :func:`latent_gradient_mode`)."""
    return x.detach().clone().requires_grad_(True)
