"""Exact tensor comparisons for tests: bit for bit, so that a NaN compares equal to the same NaN.

``torch.equal`` is False for a tensor holding a NaN even against itself, which would make "this weight did
not change" flaky for any weight that holds uninitialised memory; comparing the raw bits is exact and
never flaky.
"""

from __future__ import annotations

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as an integer tensor of the same element size (CPU, contiguous)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()):
        return t
    return t.view(_INT_OF_SIZE[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bit pattern."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def state_dict_copy(module_or_sd) -> dict[str, torch.Tensor]:
    """A CPU copy of a module's (or a dict's) tensors, to compare with later."""
    sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
    return {k: v.detach().clone().cpu() for k, v in sd.items()}


def changed_keys(before: dict, after: dict) -> list[str]:
    """Keys whose tensors differ in any bit (or that exist on one side only)."""
    keys = sorted(set(before) | set(after))
    return [k for k in keys if k not in before or k not in after or not same_bits(before[k], after[k])]
