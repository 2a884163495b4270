"""ED-LoRA training step time against ComfyUI's own TrainLoraNode, same model, rank, resolution and batch.

    python benchmarks/bench_training.py [--quick] [--family sd15|sdxl|both] [--size 512] [--steps 3] [--rank 0]
                                        [--batch 1] [--repeats 2] [--sdxl-channels N] [--sdxl-clip-layers N]
                                        [--device auto|cpu|cuda] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (860M parameters, seeded random weights; fp16 on CUDA,
fp32 on the CPU), a full-size random CLIP-L; SDXL (``--family sdxl``; ``sdxl_bench_models``): SDXL's layout with
all 70 cross-attention layers at its real widths and ComfyUI's SDXL CLIP at full depth on CUDA, on the CPU (where
a full SDXL step with its 71 encodings through CLIP-G takes minutes) 64 channels wide with 3-layer text models;
the pictures are random, encoded once by the test checkpoint's TAESD. Configurations, interleaved over the
repeats:

* ours: Train ED-LoRA's trainer (layer-wise token embeddings + text-encoder LoRA + UNet attention LoRA; every
  step encodes each caption once per cross-attention layer, forward and backward), fp32 parameters, without
  and with its gradient checkpointing (every ResBlock, transformer block and text-encoder layer recomputed);
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
Targets (issue 27): step <= 1.3x TrainLoraNode's (both with checkpointing, and without), peak with checkpointing
<= 1.25x TrainLoraNode's with checkpointing. ``--quick``: 256x256, 2 timed steps, both families. The output ends with one JSON figure per line (benchmarks/figures.py;
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

FAMILIES = ("sd15", "sdxl")


def main() -> int:
    t_start = time.perf_counter()
    size, steps = (512, "training resolution (square)"), (3, "timed steps per run")
    rank = (0, "LoRA rank of both trainers (0: 4 on SD1.5, 32 on SDXL, as the official recipes)")
    parser = harness.bench_parser(__doc__, "256x256, 2 timed steps, both families (SDXL small: see --sdxl-channels)",
                                  size=size, steps=steps, rank=rank, repeats=2)  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="pictures per step")
    parser.add_argument("--family", choices=(*FAMILIES, "both"), default=None,
                        help="which base-model family (default sd15; with --quick both)")  # fmt: skip
    parser.add_argument("--sdxl-channels", type=int, default=0,
                        help="SDXL UNet width (model_channels; 0: SDXL's 320 on CUDA, 64 on the CPU)")  # fmt: skip
    parser.add_argument("--sdxl-clip-layers", type=int, default=0,
                        help="layers of each SDXL text model (0: the real 12 and 32 on CUDA, 3 on the CPU; -1: the "
                        "real ones anywhere)")  # fmt: skip
    parser.add_argument("--configs", default="",
                        help="comma-separated configurations to run (default all: ours, ours checkpointing, core, "
                        "core no checkpointing); the figures need ours and core")  # fmt: skip
    args = harness.parse_args(parser, quick={"size": 256, "steps": 2})
    args.family = args.family or ("both" if args.quick else "sd15")

    if (session := harness.start_comfy(args, "mc_bench_train_")) is None:
        return 2
    figures = harness.Figures(args.device)
    for family in FAMILIES if args.family == "both" else (args.family,):
        run_family(family, args, session, figures)
    print(f"total {time.perf_counter() - t_start:.0f}s")
    figures.print(args.figures)
    return 0


def run_family(family: str, args, session, figures) -> None:
    cpu = args.device != "cuda"
    rank = args.rank or {"sd15": 4, "sdxl": 32}[family]
    if family == "sd15":
        built = harness.sd15_bench_models(args, session)
    else:
        built = harness.sdxl_bench_models(args, session, small_channels=args.sdxl_channels or (64 if cpu else None),
                                          clip_layers=_clip_layers(args.sdxl_clip_layers, cpu))  # fmt: skip
    model, clip = built.model, built.clip
    trainer_mod, loop = map(session.pack_module, ("training.edlora_trainer", "training.loop"))

    import comfy_extras.nodes_train as nodes_train

    import nodes

    ckpt = session.models_dir / "checkpoints" / "bench_vae_source.safetensors"
    if not ckpt.exists():
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

    def ours(checkpointing):
        def run():
            settings = trainer_mod.TrainSettings(concept_words=("<bench1>", "<bench2>"), class_word="cat",
                                                 steps=1 + args.steps, rank=rank, batch_size=args.batch,
                                                 resolution=args.size, seed=0,
                                                 gradient_checkpointing=checkpointing)  # fmt: skip
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

        return run

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
                    model, latents, positive, args.batch, 1 + args.steps, 1, 1e-4, rank, "AdamW", "MSE", 0,
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

    configs = {"ours": ours(False), "ours checkpointing": ours(True), "core": core(True, "core"),
               "core no checkpointing": core(False, "core no checkpointing")}  # fmt: skip
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(configs))
        if unknown:
            raise harness.BenchmarkError(f"--configs: unknown {unknown}; choose from {list(configs)}")
        configs = {name: fn for name, fn in configs.items() if name in wanted}
    times = harness.Repeats()
    memory: dict[str, float] = {}
    for rep in range(args.repeats):
        for name, fn in configs.items():
            value, _, peak = harness.timed_run(fn, clock)
            times.add(name, rep, value)
            memory[name] = max(memory.get(name, 0.0), peak.growth_mib)
            print(
                f"  {family} repeat {rep + 1}/{args.repeats} {name:24s} {value:6.2f} s/step  (+{peak.growth_mib:.0f} MiB)",
                flush=True,
            )

    print_report(family, args, rank, built, session, times, memory, figures)


def print_report(family, args, rank, built, session, times, memory, figures) -> None:
    """The table, and the figure lines of whatever pairs of configurations ran (all of them by default)."""
    title = (f"Training benchmark, {FAMILY_NAMES[family]}: {args.size}x{args.size}, batch {args.batch}, rank {rank}, "
             f"{built.shape}, {harness.describe_machine(session)}: seconds per step")  # fmt: skip
    ran = set(memory)
    harness.print_tables(title, times, {"peak MiB": (memory, "10.0f")}, base="core" if "core" in ran else next(iter(memory)),
                         what="seconds per step")  # fmt: skip
    print("peak: the largest of the repeats' peak over the run's start.\n")
    prefix = "training" if family == "sd15" else "training_sdxl"  # (SD1.5's names as before)
    ratios = [  # (figure, ours, core, target)
        ("step_ratio_vs_trainloranode", "ours", "core", 1.3),
        ("step_ratio_vs_trainloranode_no_checkpointing", "ours", "core no checkpointing", None),
        ("checkpointing_step_ratio_vs_trainloranode", "ours checkpointing", "core", 1.3),
    ]
    for figure, ours, core, target in ratios:
        if {ours, core} <= ran:
            figures.add(f"{prefix}_{figure}", times.ratio(ours, core), target=target,
                        spread=times.ratio_spread(ours, core))  # fmt: skip
    if {"ours checkpointing", "core"} <= ran:
        figures.add(f"{prefix}_checkpointing_peak_memory_ratio_vs_trainloranode",
                    memory["ours checkpointing"] / max(memory["core"], 1.0), target=1.25)  # fmt: skip
    for name in ("ours", "ours checkpointing"):
        if name in ran:
            figures.add(f"{prefix}_{name.replace(' ', '_')}_step_seconds", times.median(name), unit="s",
                        spread=times.spread(name))  # fmt: skip
    for name in memory:
        figures.add(f"{prefix}_peak_memory_{name.replace(' ', '_')}", memory[name], unit="MiB")


def _clip_layers(value: int, cpu: bool):
    """--sdxl-clip-layers: 0 = real depth on CUDA, 3 on the CPU; -1 = real depth; else that many."""
    if value < 0 or (value == 0 and not cpu):
        return None
    return value or 3


FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


if __name__ == "__main__":
    sys.exit(main())
