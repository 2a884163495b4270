"""Second moments of layer inputs, accumulated on the fly by forward pre-hooks (pure torch).

A layer's inputs ``X`` (rows = samples: tokens, pixels) are never stored; each forward adds ``XᵀX`` to a
``d × d`` accumulator, so memory does not grow with the number of prompts, steps or pixels. Layers that read
the same tensor (an attention's q/k/v projections) share one accumulator: see :func:`input_group`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager

import torch

# q/k/v of one attention read the same input: CLIP's self_attn.{q,k,v}_proj, the UNet's attn1.to_{q,k,v}; the
# cross-attention's to_k/to_v both read the text context.
_SHARED_INPUT = (
    (re.compile(r"^(?P<head>.*\.self_attn)\.(?:q|k|v)_proj$"), "{head}:input"),
    (re.compile(r"^(?P<head>.*\.attn1)\.to_(?:q|k|v)$"), "{head}:input"),
    (re.compile(r"^(?P<head>.*\.attn2)\.to_(?:k|v)$"), "{head}:context"),
)


def input_group(module_path: str) -> str:
    """The name of the input a layer reads; layers with the same group see the same tensor."""
    for pattern, fmt in _SHARED_INPUT:
        m = pattern.match(module_path)
        if m is not None:
            return fmt.format(head=m.group("head"))
    return module_path


def rows_of(x: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
    """A layer input as rows of features: ``[..., d]`` for a linear layer, ``[B, C, H, W]`` -> ``[B·H·W, C]``
    for a 1x1 convolution."""
    if isinstance(module, torch.nn.Conv2d) or (module is None and x.ndim == 4):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


class MomentAccumulator:
    """``Σ XᵀX`` and the row count of one input group (float32 on the device the inputs arrive on)."""

    def __init__(self):
        self.moment: torch.Tensor | None = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        r = rows.detach().float()
        m = r.T @ r
        self.moment = m if self.moment is None else self.moment + m.to(self.moment.device)
        self.count += int(r.shape[0])

    def to(self, device) -> MomentAccumulator:
        if self.moment is not None:
            self.moment = self.moment.to(device)
        return self


@contextmanager
def recording(modules: dict[str, torch.nn.Module], accumulators: dict[str, MomentAccumulator],
              select: Callable[[str, torch.Tensor], torch.Tensor] | None = None):  # fmt: skip
    """Accumulate each module's input into ``accumulators[group]`` while the block runs; hooks always removed.

    ``modules``: group -> one module reading that group's input. ``select(group, x)`` may pick the rows that
    count (e.g. a prompt's real tokens) before ``x`` is turned into rows; returning None skips the call.
    """
    handles = []

    def hook_for(group: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if select is not None:
                x = select(group, x)
                if x is None:
                    return
            accumulators.setdefault(group, MomentAccumulator()).add(rows_of(x, module))

        return hook

    try:
        for group, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook_for(group)))
        yield accumulators
    finally:
        for h in handles:
            h.remove()
