"""Command-line ED-LoRA trainer: the node's training, for big runs outside ComfyUI, on one or several processes.

    COMFYUI_PATH=/path/to/ComfyUI python training/train_edlora.py --config run.json
    COMFYUI_PATH=/path/to/ComfyUI torchrun --nproc_per_node=4 training/train_edlora.py --config run.json

It uses ComfyUI's model code (found through COMFYUI_PATH, or the ComfyUI this pack sits in) but starts no
server. The settings are those of the Train ED-LoRA node; ``training/distributed.py`` documents the config
file. Several processes average their gradients (DistributedDataParallel: gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import importlib.util
import os
import sys

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _comfyui_path() -> str:
    candidates = [os.environ.get("COMFYUI_PATH", ""), os.path.dirname(os.path.dirname(PACK_ROOT)),
                  os.path.expanduser("~/comfy/ComfyUI")]  # fmt: skip
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "comfy", "model_management.py")):
            return c
    sys.exit("error: ComfyUI not found. Set COMFYUI_PATH to a ComfyUI checkout (the folder with main.py).")


def _bootstrap():
    # the script's own folder must not shadow top-level modules (this folder has e.g. state.py, dataset.py)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    comfy_path = _comfyui_path()
    sys.path.insert(0, comfy_path)
    import comfy.cli_args  # ComfyUI's defaults (it parses argv only when its main.py asks)
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    spec = importlib.util.spec_from_file_location(
        "multiconcept", os.path.join(PACK_ROOT, "__init__.py"), submodule_search_locations=[PACK_ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["multiconcept"] = module
    spec.loader.exec_module(module)
    from multiconcept.training.distributed import main

    return main


if __name__ == "__main__":
    sys.exit(_bootstrap()(sys.argv[1:]))
