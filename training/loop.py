"""The training loop: steps, progress, cancelling with a resumable state, NaN guard (shared by node and CLI).

``train`` runs steps ``start..steps-1`` of an :class:`~.edlora_trainer.EDLoRATrainer`. Per step it keeps a
copy of the parameters from before the step; when the loss or the updated parameters are not finite it puts
that copy back, writes a resume state of the last good step and stops with ``status == "nan"``. When
``cancelled()`` turns true it writes a resume state and stops with ``status == "cancelled"``. ``step_loss``
lets the distributed CLI put DistributedDataParallel between the trainer and the backward pass.

A step's rows (this process's share of the global batch, all of it by default) go through in
``settings.accumulation`` micro-batches: each one's mean loss, weighted by its share of the rows, is backpropagated
on its own, so the summed gradients equal the whole batch's (the attention regulariser excepted: it divides each
micro-batch's maps by that micro-batch's maximum, as the official code does per process). With a float16 model
the loss is scaled before each backward pass and the step skipped on an overflow (``trainer.scaler``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .state import StateError, load_state, restore_optimizer, save_state


@dataclass
class TrainResult:
    status: str  # "done", "cancelled" or "nan"
    step: int  # steps completed (the parameters are those after this many steps)
    losses: list[float] = field(default_factory=list)
    state_path: str | None = None
    message: str = ""


def resume_from(trainer, path: str) -> tuple[int, list[float]]:
    """Load a resume state into ``trainer``; returns the step it continues from and the earlier losses."""
    state = load_state(path, trainer.identity)
    if state["step"] >= trainer.settings.steps:
        raise StateError(
            f"the state was saved after step {state['step']}, and this run has {trainer.settings.steps} steps: raise "
            "'steps' above it to train further"
        )
    trainer.params.load_flat({k: v.to(trainer.device) for k, v in state["params"].items()})
    trainer.load_extra_state(state.get("extra", {}))
    current_lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    restore_optimizer(trainer.optimizer, state)
    for group, lr in zip(trainer.optimizer.param_groups, current_lrs, strict=True):
        group["lr"] = lr  # the learning rates of this run, not the saved ones
    return state["step"], list(state["losses"])


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def micro_batches(rows: list[int], count: int) -> list[list[int]]:
    """``rows`` in ``count`` consecutive equal parts (``count`` must divide their number)."""
    if count < 1 or len(rows) % count:
        raise ValueError(f"{count} micro-batches cannot split {len(rows)} rows evenly")
    size = len(rows) // count
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def train(trainer, *, state_path: str | None = None, resume: str | None = None,
          report: Callable[[int, float, dict], None] | None = None, cancelled: Callable[[], bool] | None = None,
          preview: Callable[[int], None] | None = None, preview_every: int = 0,
          step_loss: Callable[[int, list[int]], tuple[torch.Tensor, dict]] | None = None,
          rows: list[int] | None = None, no_sync: Callable | None = None,
          save_states: bool = True) -> TrainResult:  # fmt: skip
    """``rows``: this process's rows of each global batch (all by default); ``step_loss(step, rows)`` their mean
    loss (the trainer's by default); ``no_sync``: a context manager that holds back DistributedDataParallel's
    gradient averaging for all but the last micro-batch."""
    s = trainer.settings
    rows = list(range(s.batch_size)) if rows is None else list(rows)
    chunks = micro_batches(rows, s.accumulation)
    # ComfyUI runs nodes in inference mode; tensors made there (a resumed optimiser's moments) could not be
    # updated in place by the optimiser, so the whole run happens outside it
    with torch.inference_mode(False):
        start, losses = (0, [])
        trainer.load()
        if resume:
            start, losses = resume_from(trainer, resume)
    step_loss = step_loss or (lambda k, r: trainer.loss(k, r))
    scaler = getattr(trainer, "scaler", None)

    def run_step(step: int) -> tuple[float, dict]:
        """Forward and backward passes of every micro-batch; the loss (NaN when one was not finite)."""
        value, parts = 0.0, {}
        for i, chunk in enumerate(chunks):
            loss, chunk_parts = step_loss(step, chunk)
            loss = loss * (len(chunk) / len(rows))
            value += float(loss.detach())
            for k, v in chunk_parts.items():
                parts[k] = parts.get(k, 0.0) + v * len(chunk) / len(rows)
            if not math.isfinite(value):
                trainer.release()
                return math.nan, parts
            last = i == len(chunks) - 1
            with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
                (scaler.scale(loss) if scaler is not None else loss).backward()
            trainer.release()
        return value, parts

    def _save(step: int) -> str | None:
        if not (state_path and save_states):
            return None
        return save_state(state_path, trainer.params.flat(), trainer.optimizer, step, trainer.identity,
                          s.as_dict(), losses, trainer.extra_state())  # fmt: skip

    with torch.inference_mode(False), torch.enable_grad(), trainer.base_frozen():
        for step in range(start, s.steps):
            if cancelled is not None and cancelled():
                return TrainResult("cancelled", step, losses, _save(step), f"cancelled after {step} of {s.steps} steps")
            good = trainer.snapshot()
            trainer.optimizer.zero_grad(set_to_none=True)
            value, parts = run_step(step)
            if math.isfinite(value):
                trainer.before_step(step)
                if scaler is not None:
                    scaler.step(trainer.optimizer)
                    scaler.update()
                else:
                    trainer.optimizer.step()
                trainer.after_step(step)
            if not math.isfinite(value) or not _finite(trainer.params.flat().values()):
                trainer.params.load_flat(good)
                return TrainResult(
                    "nan", step, losses, _save(step),
                    f"the loss became NaN or infinite at step {step + 1}: training stopped and the state after step "
                    f"{step} was kept. Lower the learning rates (or the regulariser weights) and resume.",
                )  # fmt: skip
            losses.append(value)
            if report is not None:
                report(step + 1, value, parts)
            if preview is not None and preview_every > 0 and (step + 1) % preview_every == 0 and step + 1 < s.steps:
                preview(step + 1)
    # a finished run is resumable too: raise 'steps' and resume to train further
    return TrainResult("done", s.steps, losses, _save(s.steps), f"trained {s.steps - start} steps")
