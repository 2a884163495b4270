"""ED-LoRA training step time against ComfyUI's own TrainLoraNode, same model, rank, resolution and batch.

    python benchmarks/bench_training.py [--quick] [--size 512] [--steps 3] [--rank 4] [--batch 1] [--repeats 2]
                                        [--device auto|cpu|cuda] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (860M parameters, seeded random weights; fp16 on CUDA,
fp32 on the CPU), a full-size random CLIP-L; the pictures are random, encoded once by the test checkpoint's
TAESD. Configurations, interleaved over the repeats:

* ours: Train ED-LoRA's trainer (layer-wise token embeddings + text-encoder LoRA + UNet attention LoRA; every
  step encodes each caption once per cross-attention layer, forward and backward), fp32 parameters;
* core: ComfyUI's TrainLoraNode at the same rank (LoRA on every linear and conv weight of the UNet), fp32,
  with its default gradient checkpointing, and without it.

Seconds per step, from runs of 1 + ``--steps`` steps: ours from the trainer's per-step report, TrainLoraNode's
from its sampler's per-step loss callback (a clock put on it for the run; it comes after each step's backward
pass), the mean interval between consecutive steps, so the set-up and the first step are left out; every clock
waits for the GPU. Each figure is the median over repeats; the ratios (ours over core's) carry the spread of
the per-repeat ratios. Checks (benchmarks/harness.py ``check_did_work``), before a run's time counts: our
trainer's parameters changed from their start and its losses are finite; TrainLoraNode's LoRA (its zero-started
``lora_down`` factors) is no longer zero and finite, and its losses are finite. Memory: each configuration's
peak over its start (CUDA: allocated memory; CPU: resident memory, sampled), the largest of the repeats.
``--quick``: 256x256, 2 timed steps. The output ends with one JSON figure per line (benchmarks/figures.py;
``--figures FILE`` appends them there too).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from tests.support.builders.sd15 import build_tiny_sd15  # noqa: E402


def main() -> int:
    t_start = time.perf_counter()
    size, steps = (512, "training resolution (square)"), (3, "timed steps per run")
    rank = (4, "LoRA rank of both trainers")
    parser = harness.bench_parser(__doc__, "256x256, 2 timed steps", size=size, steps=steps, rank=rank, repeats=2)
    parser.add_argument("--batch", type=int, default=1, help="pictures per step")
    args = harness.parse_args(parser, quick={"size": 256, "steps": 2})

    if (session := harness.start_comfy(args, "mc_bench_train_")) is None:
        return 2

    built = harness.sd15_bench_models(args, session)
    model, clip = built.model, built.clip
    trainer_mod, loop = map(session.pack_module, ("training.edlora_trainer", "training.loop"))

    import comfy_extras.nodes_train as nodes_train

    import nodes

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
    clock = harness.Clock()

    def ours():
        settings = trainer_mod.TrainSettings(concept_words=("<bench1>", "<bench2>"), class_word="cat",
                                             steps=1 + args.steps, rank=args.rank, batch_size=args.batch,
                                             resolution=args.size, seed=0)  # fmt: skip
        trainer = trainer_mod.EDLoRATrainer(model, clip, vae, images, captions, settings)
        before = trainer.snapshot()
        stamps = []
        result = loop.train(trainer, save_states=False, report=lambda *a: stamps.append(clock.now()))
        # the check before the time counts: the run trained (every step, finite losses, parameters moved)
        if result.status != "done" or not all(math.isfinite(v) for v in result.losses):
            raise harness.BenchmarkError(f"ours: training stopped ({result.status}: {result.message})")
        after = trainer.snapshot()
        flat = [torch.cat([d[k].flatten().float().cpu() for k in sorted(before)]) for d in (before, after)]
        harness.check_did_work("ours (trained parameters)", flat[1], flat[0])
        return statistics.mean(b - a for a, b in zip(stamps, stamps[1:], strict=False))

    class StampedSampler(nodes_train.TrainSampler):
        """TrainLoraNode's sampler with a clock on its per-step loss callback (after each step's backward pass)."""

        stamps: list = []

        def __init__(self, *a, loss_callback=None, **kw):
            def stamped(loss):
                StampedSampler.stamps.append(clock.now())
                if loss_callback is not None:
                    loss_callback(loss)

            super().__init__(*a, loss_callback=stamped, **kw)

    def core(checkpointing, label):
        def run():
            StampedSampler.stamps = []
            original, nodes_train.TrainSampler = nodes_train.TrainSampler, StampedSampler
            try:
                _, lora, losses, _ = nodes_train.TrainLoraNode().train(
                    model, latents, positive, args.batch, 1 + args.steps, 1, 1e-4, args.rank, "AdamW", "MSE", 0,
                    "fp32", "fp32", "LoRA", checkpointing, "[None]")  # fmt: skip
            finally:
                nodes_train.TrainSampler = original
            # the check before the time counts: every step ran, the zero-started lora_down factors moved, the losses
            # are finite
            stamps = StampedSampler.stamps
            if len(stamps) != 1 + args.steps:
                raise harness.BenchmarkError(
                    f"{label}: {len(stamps)} timed steps of TrainLoraNode, not {1 + args.steps}"
                )
            downs = [v.detach().flatten().float().cpu() for k, v in lora.items() if k.endswith("lora_down.weight")]
            if not downs or not all(math.isfinite(float(v)) for v in losses["loss"]):
                raise harness.BenchmarkError(f"{label}: TrainLoraNode made no LoRA or a loss is not finite")
            harness.check_did_work(f"{label} (trained lora_down)", torch.cat(downs))
            return statistics.mean(b - a for a, b in zip(stamps, stamps[1:], strict=False))

        return run

    configs = {"ours": ours, "core": core(True, "core"), "core no checkpointing": core(False, "core no checkpointing")}
    times = harness.Repeats()
    memory: dict[str, float] = {}
    for rep in range(args.repeats):
        for name, fn in configs.items():
            value, _, peak = harness.timed_run(fn, clock)
            times.add(name, rep, value)
            memory[name] = max(memory.get(name, 0.0), peak.growth_mib)
            print(
                f"  repeat {rep + 1}/{args.repeats} {name:24s} {value:6.2f} s/step  (+{peak.growth_mib:.0f} MiB)",
                flush=True,
            )

    title = (f"Training benchmark: {args.size}x{args.size}, batch {args.batch}, rank {args.rank}, {built.shape}, "
             f"{harness.describe_machine(session)}: seconds per step")  # fmt: skip
    harness.print_tables(title, times, {"peak MiB": (memory, "10.0f")}, base="core", what="seconds per step")
    lo, hi = times.ratio_spread("ours", "core no checkpointing")
    print(f"ours / core no checkpointing: {times.ratio('ours', 'core no checkpointing'):.2f}x ({lo:.2f}-{hi:.2f}x). "
          f"peak: the largest of the repeats' peak over the run's start. total {time.perf_counter() - t_start:.0f}s\n")  # fmt: skip
    figures = harness.Figures(args.device)
    figures.add("training_step_ratio_vs_trainloranode", times.ratio("ours", "core"), target=1.3,
                spread=times.ratio_spread("ours", "core"))  # fmt: skip
    figures.add("training_step_ratio_vs_trainloranode_no_checkpointing", times.ratio("ours", "core no checkpointing"),
                spread=(lo, hi))  # fmt: skip
    figures.add("training_step_seconds", times.median("ours"), unit="s", spread=times.spread("ours"))
    for name in configs:
        figures.add(f"training_peak_memory_{name.replace(' ', '_')}", memory[name], unit="MiB")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
