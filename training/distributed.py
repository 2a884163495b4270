"""ED-LoRA training from the command line, on one process or several (torchrun + DistributedDataParallel).

Run through ``training/train_edlora.py`` (it makes ComfyUI's model code and this pack importable). Every
process builds the same trainer from the same seed; each step's global batch is drawn from the step's own
generator, so all processes agree on it, and process ``r`` of ``N`` computes the loss on its ``B/N`` rows.
DistributedDataParallel averages the gradients, so the update equals one process's on the whole batch. Rank
0 writes the resume state and the ED-LoRA file (the same format the node writes; never over an existing file).

The config is a JSON file::

    {
      "checkpoint": "/models/checkpoints/v1-5-pruned-emaonly.safetensors",
      "images": "/data/mycat",                    # a folder (sorted by name) or a list of files
      "masks": "/data/mycat_masks",              # optional: same file names, white = subject
      "captions": "/data/mycat/captions.txt",    # optional: one line per image (sorted order), or a list
      "concept_words": "<mycat1> <mycat2>", "class_word": "cat",
      "output": "/models/loras/mycat.safetensors",
      "steps": 0,                                # 0: pictures × 500 / batch_size (Mix-of-Show's count)
      "batch_size": 4, "lr_embedding": 1e-3, "lr_text": 1e-5, "lr_unet": 1e-4, "rank": 4,
      (rates -1 and batch_size/rank/resolution 0 = the official values of the checkpoint's family; SDXL:
      Concept Conductor's, with "lr_embedding_g", "lr_text_g", "rank_text", "rank_text_g", "norm_cap_g")
      "gradient_checkpointing": false, "accumulation": 1,
      "mixed_precision": true,                   # on CUDA: the text encoders in the UNet's half dtype
      "seed": 0, "resolution": 512, "masked_loss": true, "attention_weight": 0.01, "norm_cap": 0.55,
      "embedding_rule": "freeze at mean norm", "lr_schedule": "linear to 0", "weight_decay": 0.01,
      "noise_offset": 0.01, "image_augmentation": "crop and place (official)",
      "caption_augmentation": "shuffle + human templates", "sample_posterior": true,
      "adam_epsilon": 1e-8,                      # AdamW's epsilon
      (any key left out takes the Train ED-LoRA node's default: Mix-of-Show's recipe, training/recipe.py)
      "state": "/runs/mycat.state.safetensors",  # optional: written when the run stops; read with --resume
      "log_every": 10
    }
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from ..formats.edlora import write_edlora_safetensors
from .captions import prepare_captions
from .edlora_trainer import EDLoRATrainer, TrainingError, TrainSettings
from .loop import train

log = logging.getLogger("multiconcept")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SETTING_KEYS = ("steps", "lr_embedding", "lr_text", "lr_unet", "rank", "batch_size", "seed", "resolution",
                "masked_loss", "attention_weight", "attention_regulariser", "full_identity", "norm_cap",
                "embedding_rule", "lr_schedule", "weight_decay", "noise_offset", "image_augmentation",
                "caption_augmentation", "sample_posterior", "adam_epsilon", "gradient_checkpointing", "accumulation",
                "mixed_precision",
                "lr_embedding_g", "lr_text_g", "rank_text", "rank_text_g", "norm_cap_g")  # fmt: skip


class _LossModule(torch.nn.Module):
    """What DistributedDataParallel wraps: the trainable parameters, and the trainer's loss as ``forward``."""

    def __init__(self, trainer):
        super().__init__()
        self.params = trainer.params
        self._trainer = [trainer]  # not a submodule: DDP must see only the trainable parameters
        self.parts: dict = {}

    def forward(self, step: int, rows: list[int]) -> torch.Tensor:
        loss, self.parts = self._trainer[0].loss(step, rows)
        return loss


def _files(spec, what: str) -> list[str]:
    if isinstance(spec, list):
        return [str(p) for p in spec]
    if isinstance(spec, str) and os.path.isdir(spec):
        return sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_SUFFIXES))
    raise TrainingError(f"{what} must be a folder of pictures or a list of files, not {spec!r}")


def _load_pictures(files: list[str], mode: str) -> torch.Tensor:
    """Pictures as one tensor ``[B, H, W, C]``; they must share a size (resize them beforehand otherwise)."""
    import numpy as np
    from PIL import Image, ImageOps

    out = []
    for f in files:
        with Image.open(f) as im:
            im = ImageOps.exif_transpose(im).convert(mode)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    sizes = {tuple(t.shape[:2]) for t in out}
    if len(sizes) != 1:
        raise TrainingError(f"the pictures have different sizes {sorted(sizes)}: give them one size (any aspect)")
    stacked = torch.stack(out)
    return stacked if mode == "RGB" else stacked


def _captions(cfg: dict, n: int) -> str:
    spec = cfg.get("captions", "")
    if isinstance(spec, list):
        return "\n".join(spec)
    if isinstance(spec, str) and spec and os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return f.read()
    return spec or ""


def load_models(checkpoint: str):
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


def run(cfg: dict, resume: bool = False) -> str | None:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world > 1
    cuda = torch.cuda.is_available()
    if distributed:
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        files = _files(cfg["images"], "images")
        images = _load_pictures(files, "RGB")
        masks = None
        if cfg.get("masks"):
            mask_dir = cfg["masks"]
            masks = _load_pictures([os.path.join(mask_dir, os.path.basename(f)) for f in files], "L")
        words = tuple(str(cfg["concept_words"]).split())
        captions = prepare_captions(_captions(cfg, len(files)), len(files), " ".join(words))
        for w in captions.warnings:
            log.warning("[multi-concept] %s", w)
        settings = TrainSettings(concept_words=words, class_word=str(cfg["class_word"]),
                                 **{k: cfg[k] for k in SETTING_KEYS if k in cfg})  # fmt: skip
        output = cfg["output"]
        if rank == 0 and os.path.exists(output):
            raise TrainingError(f"{output} exists; choose another output (files are never overwritten)")
        model, clip, vae = load_models(cfg["checkpoint"])
        trainer = EDLoRATrainer(model, clip, vae, images, list(captions.texts), settings, masks)
        settings = trainer.settings  # "official" values resolved for the checkpoint's family
        if settings.batch_size % (world * settings.accumulation):
            raise TrainingError(f"batch_size {settings.batch_size} must be a multiple of the {world} processes × "
                                f"accumulation {settings.accumulation}")  # fmt: skip
        per_rank = settings.batch_size // world
        rows = list(range(rank * per_rank, (rank + 1) * per_rank))
        step_loss = no_sync = None
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            module = _LossModule(trainer)
            ddp = DistributedDataParallel(module, device_ids=[local_rank] if cuda else None, broadcast_buffers=False)

            def step_loss(k, chunk):
                return ddp(k, chunk), module.parts

            no_sync = ddp.no_sync

        log_every = int(cfg.get("log_every", 10))

        def report(step, loss, parts):
            if rank == 0 and (step % log_every == 0 or step == settings.steps):
                extra = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                print(f"step {step}/{settings.steps} loss {loss:.4f} ({extra})", flush=True)

        state = cfg.get("state")
        result = train(trainer, state_path=state if rank == 0 else None, resume=state if resume else None,
                       report=report, step_loss=step_loss, rows=rows, no_sync=no_sync,
                       save_states=rank == 0)  # fmt: skip
        if result.status != "done":
            raise TrainingError(result.message)
        if rank == 0:
            write_edlora_safetensors(trainer.weights(), output)
            print(f"wrote {output}", flush=True)
            return output
        return None
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train an ED-LoRA (run under torchrun for several processes).")
    parser.add_argument(
        "--config", required=True, help="JSON file with the run's settings (see training/distributed.py)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the config's 'state' file")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        cfg = json.load(f)
    try:
        run(cfg, resume=args.resume)
    except (TrainingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
