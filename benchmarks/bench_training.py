"""ED-LoRA training step time against ComfyUI's own TrainLoraNode, same checkpoint, rank, resolution and batch.

    python benchmarks/bench_training.py [--quick] [--size 512] [--steps 3] [--rank 4] [--batch 1]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. The model is an SD1.5 UNet at full widths
(860M parameters, seeded random weights; benchmarks/bench_scoped_lora.py builds it), the text encoder a
full-size random CLIP-L; the pictures are random. Configurations, interleaved over two repeats:

* ours: Train ED-LoRA's trainer (layer-wise token embeddings + text-encoder LoRA + UNet attention LoRA; every
  step encodes each caption once per cross-attention layer, forward and backward), fp32;
* core: ComfyUI's TrainLoraNode at the same rank (LoRA on every linear and conv weight of the UNet), fp32,
  with its default gradient checkpointing, and without it.

Seconds per step: ours from the step timestamps (the first step excluded as warm-up); TrainLoraNode from the
difference between a run of 1 step and one of 1 + ``--steps`` (so its set-up is excluded too). Ratios are
ours over core's. Peak memory over the process's baseline is reported per configuration (resident set,
sampled). ``--quick``: 256x256, 2 timed steps. The output ends with one JSON figure per line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scoped_lora import PeakRSS, build_unet  # noqa: E402
from benchmarks.figures import Figures  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="training resolution (square)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of both trainers")
    parser.add_argument("--batch", type=int, default=1, help="pictures per step")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--quick", action="store_true", help="256x256, 2 timed steps")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps = 256, 2
    t_start = time.perf_counter()

    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return 2
    from tests.support.comfy_inprocess import make_session

    session = make_session(comfy_path, Path(tempfile.mkdtemp(prefix="mc_bench_train_")))

    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    import nodes
    from tests.support.tiny_clip import build_tiny_clip
    from tests.support.tiny_sd15 import build_tiny_sd15

    trainer_mod = session.pack_module("training.edlora_trainer")
    loop = session.pack_module("training.loop")

    model = build_unet(seed=0)
    clip = build_tiny_clip("sd15", seed=0, layers=None, mlp=None)
    ckpt = session.models_dir / "checkpoints" / "bench_vae_source.safetensors"
    build_tiny_sd15(ckpt, seed=0)
    vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[2]  # TAESD: encodes the pictures once
    n_images = max(2, args.batch)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, args.size, args.size, 3, generator=gen)
    captions = [f"a photo of <bench1> <bench2> in a garden, picture {i}" for i in range(n_images)]
    with torch.no_grad():  # as in a ComfyUI run: the conditioning carries no graph into the text encoder
        latents = {"samples": vae.encode(images)}
        positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat in a garden")[0]

    def ours():
        settings = trainer_mod.TrainSettings(concept_words=("<bench1>", "<bench2>"), class_word="cat",
                                             steps=1 + args.steps, rank=args.rank, batch_size=args.batch,
                                             resolution=args.size, seed=0)  # fmt: skip
        trainer = trainer_mod.EDLoRATrainer(model, clip, vae, images, captions, settings)
        stamps = []
        loop.train(trainer, save_states=False, report=lambda *a: stamps.append(time.perf_counter()))
        return statistics.mean(b - a for a, b in zip(stamps, stamps[1:], strict=False))

    def core(checkpointing):
        def run(steps):
            t = time.perf_counter()
            TrainLoraNode().train(model, latents, positive, args.batch, steps, 1, 1e-4, args.rank, "AdamW", "MSE", 0,
                                  "fp32", "fp32", "LoRA", checkpointing, "[None]")  # fmt: skip
            return time.perf_counter() - t

        return lambda: (run(1 + args.steps) - run(1)) / args.steps

    configs = {"ours": ours, "core": core(True), "core no checkpointing": core(False)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    memory: dict[str, float] = {}
    for rep in range(args.repeats):
        for name, fn in configs.items():
            with PeakRSS() as peak:
                value = fn()
            times[name].append(value)
            memory[name] = max(memory.get(name, 0.0), peak.peak_mib - peak.base / 2**20)
            print(
                f"  repeat {rep + 1}/{args.repeats} {name:24s} {value:6.2f} s/step  (+{memory[name]:.0f} MiB)",
                flush=True,
            )

    best = {k: min(v) for k, v in times.items()}
    print(f"\n{args.size}x{args.size}, batch {args.batch}, rank {args.rank}: seconds per step (fastest repeat)")
    for name in configs:
        print(f"  {name:24s} {best[name]:6.2f} s   peak +{memory[name]:.0f} MiB")
    print(f"  ours / core                {best['ours'] / best['core']:.2f}")
    print(f"  ours / core no ckpt        {best['ours'] / best['core no checkpointing']:.2f}")
    print(f"total {time.perf_counter() - t_start:.0f}s\n")
    figures = Figures()
    figures.add("training_step_ratio_vs_trainloranode", best["ours"] / best["core"], target=1.3)
    figures.add("training_step_ratio_vs_trainloranode_no_checkpointing", best["ours"] / best["core no checkpointing"])
    figures.add("training_step_seconds", best["ours"], unit="s")
    for name in configs:
        figures.add(f"training_peak_memory_{name.replace(' ', '_')}", memory[name], unit="MiB")
    figures.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
