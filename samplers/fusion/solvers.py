"""Per-layer gradient fusion (Mix-of-Show): one weight that reproduces every concept's LoRA on its own inputs.

Pure torch. For one linear layer with base weight ``W0`` and concept ``i``'s weight ``W_i = W0 + ΔW_i``
(``ΔW_i = 0`` when the concept has no LoRA there), fusion finds

    W* = argmin_W  Σ_i ‖W X_i − W_i X_i‖²,

``X_i`` the layer's inputs recorded while concept ``i`` was active. The objective only needs the second
moments ``C_i = X_i X_iᵀ`` (``‖(W − W_i) X_i‖² = tr((W − W_i) C_i (W − W_i)ᵀ)``), so the recording keeps
``d_in × d_in`` per concept and layer, however many samples it saw.

* :func:`closed_form` — the normal equations ``W (Σ C_i) = Σ W_i C_i`` solved directly, in the offset
  ``D = W − W0`` and with a small ridge toward ``W0``: ``D = (Σ ΔW_i C_i)(Σ C_i + λ I)⁻¹``. The ridge only
  decides directions no concept's inputs reach (there ``W = W0``, as an iterative solver started at ``W0``
  leaves them), so its answer is the minimum-change minimiser.
* :func:`lbfgs` — the original procedure: L-BFGS on ``D`` from zero with the official settings (history 25,
  strong Wolfe line search), evaluated here on the same moments rather than on stored activations.

With a single concept the concept's own weight ``W0 + ΔW`` is a zero-residual minimiser; both solvers return
it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_RIDGE = 1e-6  # times the mean eigenvalue of Σ C_i
LBFGS_HISTORY = 25


@dataclass
class LayerProblem:
    """One layer's fusion problem.

    ``base``: ``W0`` ``[out, in]``. ``deltas[i]``: concept ``i``'s ``ΔW_i`` ``[out, in]`` or None (no LoRA on this
    layer). ``moments[i]``: ``C_i = X_iᵀ X_i`` ``[in, in]`` over the rows (samples) of ``X_i``; ``counts[i]`` rows.
    """

    base: torch.Tensor
    deltas: list
    moments: list
    counts: list

    def __post_init__(self):
        if not (len(self.deltas) == len(self.moments) == len(self.counts)) or not self.moments:
            raise ValueError("a layer problem needs one delta (or None), one moment and one count per concept")
        out_f, in_f = self.base.shape
        for d, c in zip(self.deltas, self.moments, strict=True):
            if c.shape != (in_f, in_f):
                raise ValueError(f"moment {tuple(c.shape)} does not match the layer's input width {in_f}")
            if d is not None and d.shape != (out_f, in_f):
                raise ValueError(f"delta {tuple(d.shape)} does not match the layer's weight {(out_f, in_f)}")

    def delta_or_zero(self, i: int) -> torch.Tensor:
        d = self.deltas[i]
        return torch.zeros_like(self.base) if d is None else d


def _single(problem: LayerProblem) -> torch.Tensor | None:
    if len(problem.moments) == 1:
        return problem.base + problem.delta_or_zero(0).to(problem.base.dtype)
    return None


def factor(moments: list, ridge: float = DEFAULT_RIDGE, device=None):
    """Cholesky factor of ``Σ C_i + λ I`` (float64), or None when no inputs were recorded. Layers reading the
    same input (q/k/v) share it, so it is computed once per input."""
    device = device if device is not None else moments[0].device
    in_f = moments[0].shape[0]
    a = torch.zeros(in_f, in_f, dtype=torch.float64, device=device)
    for c in moments:
        a += c.to(device=device, dtype=torch.float64)
    scale = float(torch.diagonal(a).sum()) / in_f
    if not math.isfinite(scale) or scale <= 0:  # no inputs at all: nothing asks for a change
        return None
    a = 0.5 * (a + a.T)
    # Moments summed in float32 can be indefinite by rounding (about 1e-7 of the largest eigenvalue): then the
    # ridge grows tenfold until the matrix factorises.
    eye = torch.eye(in_f, dtype=torch.float64, device=device)
    lam = ridge * scale
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(a + lam * eye)
        if int(info) == 0:
            return chol
        lam = max(lam, 1e-12 * scale) * 10
    raise ValueError("the layer's input moments are not finite; the recording went wrong")


def closed_form(problem: LayerProblem, ridge: float = DEFAULT_RIDGE, device=None, chol=None) -> torch.Tensor:
    """The fused weight from the normal equations (float64 on ``device``), returned in ``base``'s dtype/device.

    ``chol``: :func:`factor` of this layer's moments, when already computed for another layer reading the same input.
    """
    single = _single(problem)
    if single is not None:
        return single
    device = device if device is not None else problem.base.device
    if chol is None:
        chol = factor(problem.moments, ridge, device)
    if chol is None:
        return problem.base.clone()
    b = torch.zeros(problem.base.shape, dtype=torch.float64, device=device)
    for d, c in zip(problem.deltas, problem.moments, strict=True):
        if d is not None:
            b += d.to(device=device, dtype=torch.float64) @ c.to(device=device, dtype=torch.float64)
    # D A = B with A symmetric positive definite  <=>  A Dᵀ = Bᵀ
    offset = torch.cholesky_solve(b.T.contiguous(), chol).T
    return problem.base + offset.to(device=problem.base.device, dtype=problem.base.dtype)


def objective(problem: LayerProblem, offset: torch.Tensor) -> torch.Tensor:
    """``Σ_i ‖(W0 + D − W_i) X_i‖²`` divided by the rows and outputs (a mean squared error, as the original)."""
    total = offset.new_zeros(())
    for i, c in enumerate(problem.moments):
        e = offset - problem.delta_or_zero(i).to(offset)
        total = total + ((e @ c.to(offset)) * e).sum()
    rows = max(sum(problem.counts), 1)
    return total / (rows * problem.base.shape[0])


def lbfgs(problem: LayerProblem, iters: int, device=None) -> torch.Tensor:
    """The fused weight by L-BFGS on the offset from ``W0`` (float32, the original's settings); best iterate."""
    single = _single(problem)
    if single is not None:
        return single
    device = device if device is not None else problem.base.device
    # ComfyUI runs nodes under inference mode, whose tensors cannot take part in autograd: work on copies.
    with torch.inference_mode(False), torch.enable_grad():
        moved = LayerProblem(
            base=problem.base.detach().to(device=device, dtype=torch.float32).clone(),
            deltas=[None if d is None else d.detach().to(device=device, dtype=torch.float32).clone()
                    for d in problem.deltas],
            moments=[c.detach().to(device=device, dtype=torch.float32).clone() for c in problem.moments],
            counts=list(problem.counts),
        )  # fmt: skip
        offset = torch.zeros_like(moved.base, requires_grad=True)
        best = {"loss": math.inf, "offset": torch.zeros_like(moved.base)}
        optimizer = torch.optim.LBFGS(
            [offset],
            lr=1,
            max_iter=max(1, int(iters)),
            history_size=LBFGS_HISTORY,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-16,
            tolerance_change=1e-16,
        )

        def closure():
            optimizer.zero_grad()
            loss = objective(moved, offset)
            if float(loss.detach()) < best["loss"]:
                best["loss"] = float(loss.detach())
                best["offset"] = offset.detach().clone()
            loss.backward()
            return loss

        optimizer.step(closure)
    return problem.base + best["offset"].to(device=problem.base.device, dtype=problem.base.dtype)


def relative_errors(problem: LayerProblem, *weights: torch.Tensor) -> list[list[float]] | list[float]:
    """Per concept ``‖(W − W_i) X_i‖ / ‖W_i X_i‖``: how far the layer's output on the concept's own inputs is
    from what the concept's own LoRA gives (0 = reproduced exactly). One list per weight given (a flat list
    for a single weight)."""
    device = problem.base.device
    out: list[list[float]] = [[] for _ in weights]
    base = problem.base.detach().float()
    ws = [w.detach().to(device=device, dtype=torch.float32) for w in weights]
    for i, c in enumerate(problem.moments):
        c32 = c.detach().to(device=device, dtype=torch.float32)
        target = base + problem.delta_or_zero(i).detach().to(device=device, dtype=torch.float32)
        den = float(((target @ c32) * target).sum())
        for j, w in enumerate(ws):
            e = w - target
            num = float(((e @ c32) * e).sum())
            out[j].append(math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0)
    return out[0] if len(weights) == 1 else out


def plain_sum(problem: LayerProblem) -> torch.Tensor:
    """``W0 + Σ ΔW_i``: every LoRA merged at once, the baseline fusion is measured against."""
    out = problem.base.clone()
    for d in problem.deltas:
        if d is not None:
            out = out + d.to(out)
    return out


SOLVERS = ("closed form", "L-BFGS")


def solve(problem: LayerProblem, solver: str, iters: int = 50, ridge: float = DEFAULT_RIDGE, device=None, chol=None):
    if solver == "closed form":
        return closed_form(problem, ridge=ridge, device=device, chol=chol)
    if solver == "L-BFGS":
        return lbfgs(problem, iters=iters, device=device)
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
