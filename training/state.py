"""Resumable training states: parameters, optimiser moments and the step, in one safetensors file.

No pickle: tensors go in as tensors, everything else (settings, the optimiser's hyper-parameters, which
model and concept the state belongs to) as JSON in the safetensors metadata. The training noise and
timesteps of step ``k`` are drawn from a generator seeded by ``(seed, k)``, so the step number is all the
random state there is: a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import os

import torch

from ..formats.weights import write_safetensors

STATE_FORMAT = "multiconcept.edlora_training_state"
STATE_SUFFIX = ".state.safetensors"


class StateError(ValueError):
    """A resume state that cannot continue this run; the message says why."""


def save_state(path: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int,
               identity: dict, settings: dict, losses: list[float], extra: dict | None = None) -> str:  # fmt: skip
    """Write the state atomically (a temporary file, then a rename; never through a link). ``identity`` must
    match on resume; ``extra`` is the trainer's own JSON-able state (e.g. when the embeddings were frozen)."""
    tensors = {f"param.{k}": v.detach().float().cpu().contiguous() for k, v in params.items()}
    opt = optimizer.state_dict()
    for idx, slots in opt["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    metadata = {
        "format": STATE_FORMAT,
        "step": str(int(step)),
        "identity": json.dumps(identity, sort_keys=True),
        "settings": json.dumps(settings, sort_keys=True),
        "param_groups": json.dumps(groups),
        "losses": json.dumps([float(x) for x in losses]),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_safetensors(path, tensors, metadata, overwrite=True)  # the state is replaced at every save


def load_state(path: str, identity: dict) -> dict:
    """Read a state; refuse it (naming the difference) when it belongs to another concept or model."""
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise StateError(f"{name} is not a readable training state ({type(e).__name__}: {e})") from None
    if metadata.get("format") != STATE_FORMAT:
        raise StateError(f"{name} is not a training state of this pack (it has no '{STATE_FORMAT}' marker)")
    saved = json.loads(metadata["identity"])
    if "family" in identity:
        saved.setdefault("family", "SD1.5")  # states written before SDXL training existed
    diffs = [k for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: state {saved.get(k)!r}, now {identity.get(k)!r}" for k in diffs[:4])
        raise StateError(
            f"{name} belongs to another training run ({detail}). Resume with the same model (family), concept words, "
            "class word, rank and pictures, or start afresh (resume: none)."
        )
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, slot = k.split(".", 2)
            optim.setdefault(int(idx), {})[slot] = v
    return {
        "step": int(metadata["step"]),
        "params": params,
        "optim_state": optim,
        "param_groups": json.loads(metadata["param_groups"]),
        "settings": json.loads(metadata.get("settings", "{}")),
        "losses": json.loads(metadata.get("losses", "[]")),
        "extra": json.loads(metadata.get("extra", "{}")),
    }


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    groups = state["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, current["param_groups"], strict=True)
    ):
        raise StateError("the saved optimiser has other parameter groups (were the learning rates switched on or off?)")
    optimizer.load_state_dict({"state": state["optim_state"], "param_groups": groups})
