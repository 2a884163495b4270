"""Scoped LoRA (Regional LoRA) cost and locality, as ratios against plain ComfyUI sampling in the same run.

    python benchmarks/bench_scoped_lora.py [--quick] [--device auto|cpu|cuda] [--size 512] [--steps 4]
                                           [--repeats 3] [--rank 16] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. The model is an SD1.5 UNet at full
widths (320/640/1280, 860M parameters; fp16 on a GPU) with seeded random weights; prompts are random context
tensors (no text encoder is needed to time the UNet). Each LoRA is kohya-shaped (rank ``--rank``) on every
linear layer of the transformer blocks, as typical character LoRAs are. Configurations, interleaved per repeat:

* plain: the model alone, positive + negative (one UNet call of 2 rows per step);
* scoped x2 / x4: Regional LoRA's runtime with 2 / 4 concepts, each in its own box (one call per step);
* merged x2: the same LoRAs merged into the weights by ComfyUI (the free lunch that bleeds);
* core hooks x2 / x4: the route ComfyUI offers today for the same picture — the prompt with concept i's
  LoRA (CreateHookLoraModelOnly) and box i as mask (ConditioningSetProperties) for each concept, plus the prompt
  without hooks masked to the background, all combined — which runs one pass per hook group per step.

Every run's UNet rows are counted (a DIFFUSION_MODEL wrapper) and every configuration's output is checked
before its time counts: finite, not flat, and different from plain sampling's (inside concept 1's box for the
regional ones); a core-hooks run with fewer rows than its conds stops the benchmark. Per-step times come from
the sampler's callback (the first step, which includes loading and patching, is left out); the table gives
the median, the fastest and slowest repeat, and the ratio to plain with its lowest and highest value within
one repeat. Peak memory: the highest resident memory (CPU) or allocated memory (CUDA) during each run,
reported as the extra over plain sampling's; CPU allocators keep freed memory, so read it as an upper bound.
Locality (DESIGN.md §6) is the leak of concept 2's change at the first step, scoped vs merged. ``--quick``:
256x256, 3 steps, 2 repeats. The output ends with one JSON figure per line (benchmarks/figures.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.figures import Figures  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    BenchmarkError,
    Clock,
    Repeats,
    RunMemory,
    add_common_arguments,
    check_did_work,
    count_model_rows,
    describe_machine,
    model_dtype,
    start_comfy,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per configuration")
    parser.add_argument("--rank", type=int, default=16, help="rank of each LoRA")
    parser.add_argument(
        "--family",
        choices=("sd15", "sdxl"),
        default="sd15",
        help="sd15: SD1.5's UNet; sdxl: SDXL's (2.6B parameters: a GPU's job; with --quick, SDXL's layout at a "
        "tenth of its widths)",
    )
    add_common_arguments(parser, "256x256, 3 steps, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.repeats = 256, 3, 2
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")

    session = start_comfy(args, "mc_bench_scoped_")
    if session is None:
        return 2

    import comfy.sample
    import comfy.sd
    import torch
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLoraModelOnly
    from safetensors.torch import save_file

    from tests.support.builders.lora import make_lora, transformer_linears
    from tests.support.builders.sd15 import build_full_sd15_model
    from tests.support.builders.sdxl import build_full_sdxl_model, build_tiny_sdxl, sdxl_conds

    stack = session.pack_module("samplers.concept_stack")
    adapters = session.pack_module("samplers.scoped_lora.adapters")
    runtime = session.pack_module("samplers.scoped_lora.runtime")
    locality = session.pack_module("samplers.scoped_lora.locality")

    t0 = time.perf_counter()
    if args.family == "sdxl" and args.quick:
        model, shape = build_tiny_sdxl(seed=0, all_cross_attention=True), "SDXL's layout at a tenth of its widths"
    elif args.family == "sdxl":
        model, shape = build_full_sdxl_model(seed=0, dtype=model_dtype(args.device), device=args.device), "SDXL"
    else:
        model, shape = build_full_sd15_model(seed=0, dtype=model_dtype(args.device), device=args.device), "SD1.5"
    print(f"built a random {shape} UNet ({sum(p.numel() for p in model.model.parameters()) / 1e6:.0f}M parameters) "
          f"in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    targets = transformer_linears(model)
    loras = [
        {k: v.cpu() for k, v in make_lora(model, targets, rank=args.rank, seed=100 + i, scale=0.4).items()}
        for i in range(4)
    ]
    for i, sd in enumerate(loras):
        save_file(sd, str(session.models_dir / "loras" / f"bench_{i}.safetensors"))

    s, lat = args.size, args.size // 8
    boxes = []
    for i in range(4):  # 2 x 2 grid of boxes with a gap; concepts 1 and 2 side by side
        x0, y0 = (i % 2) * s // 2, (i // 2) * s // 2
        m = torch.zeros(s, s)
        m[y0 + s // 16 : y0 + s // 2 - s // 16, x0 + s // 16 : x0 + s // 2 - s // 16] = 1.0
        boxes.append(m)
    lat_boxes = [torch.nn.functional.adaptive_avg_pool2d(b[None, None], (lat, lat))[0] for b in boxes]  # [1, h, w]

    if args.family == "sdxl":
        pos, neg = sdxl_conds(seed=1, width=s, height=s)
    else:
        gen = torch.Generator().manual_seed(1)
        pos = [[torch.randn(1, 77, 768, generator=gen), {}]]
        neg = [[torch.randn(1, 77, 768, generator=gen), {}]]

    def concept(i):
        return stack.Concept(uid="", kind="lora", source=f"bench_{i}.safetensors", words=(),
                             adapter=stack.LoRAFile(f"bench_{i}", loras[i]))  # fmt: skip

    def scoped(n):
        clone = model.clone()
        items = [runtime.ScopedConcept(adapters.resolve_concept(clone, concept(i)), runtime.Scope(mask=boxes[i]))
                 for i in range(n)]  # fmt: skip
        runtime.install_scoped_lora(clone, items, "bench")
        return clone

    def merged(n):
        m = model
        for i in range(n):
            m = comfy.sd.load_lora_for_models(m, None, loras[i], 1.0, 0)[0]
        return m

    def hooked_positive(n):
        """The core graph for the same picture: the prompt with concept i's LoRA hook in box i, and the prompt
        without hooks outside every box (ConditioningCombine is list concatenation)."""
        conds = []
        for i in range(n):
            hooks = CreateHookLoraModelOnly().create_hook_model_only(f"bench_{i}.safetensors", 1.0)[0]
            conds += ConditioningSetProperties().set_properties(pos, 1.0, "default", mask=boxes[i][None], hooks=hooks)[
                0
            ]
        background = (1.0 - torch.stack(boxes[:n]).amax(0))[None]
        conds += ConditioningSetProperties().set_properties(pos, 1.0, "default", mask=background)[0]
        return conds

    # every configuration's model counts the UNet rows it runs (so a route that skips work shows)
    configs = {}
    for label, (mdl, positive, region) in {
        "plain": (model, pos, None),
        "scoped x2": (scoped(2), pos, lat_boxes[0]),
        "scoped x4": (scoped(4), pos, lat_boxes[0]),
        "merged x2": (merged(2), pos, None),
        "core hooks x2": (model, hooked_positive(2), lat_boxes[0]),
        "core hooks x4": (model, hooked_positive(4), lat_boxes[0]),
    }.items():
        counted, counter = count_model_rows(mdl)
        configs[label] = (counted, positive, region, counter)

    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)
    clock = Clock()

    def run(mdl, positive, steps, keep_x0=False):
        stamps, first = [], []

        def cb(step, x0, x, total):
            stamps.append(clock.now())
            if keep_x0 and step == 0:
                first.append(x0.detach().float().cpu().clone())

        out = comfy.sample.sample(mdl, noise, steps, 5.0, "euler", "normal", positive, neg, latent,
                                  callback=cb, disable_pbar=True, seed=0)  # fmt: skip
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], first, out

    times = Repeats()
    peaks: dict[str, list[float]] = {k: [] for k in configs}
    rows: dict[str, float] = {}
    outputs = {}
    for r in range(args.repeats):
        for label, (mdl, positive, region, counter) in configs.items():
            counter.reset()
            with RunMemory() as peak:
                step_times, _, out = run(mdl, positive, args.steps)
            times.add(label, r, step_times)
            peaks[label].append(peak.peak_mib)
            rows[label] = counter.rows / args.steps
            outputs[label] = out
            # the check before the time counts: every configuration but plain changes the picture (inside the
            # first concept's box where it is scoped)
            check_did_work(label, out, None if label == "plain" else outputs["plain"], region)
            print(f"  repeat {r + 1}/{args.repeats} {label:14} {1000 * sorted(step_times)[len(step_times) // 2]:9.0f} "
                  f"ms/step, {rows[label]:.0f} UNet rows/step in {counter.calls / args.steps:.0f} call(s)")  # fmt: skip
    for label in ("core hooks x2", "core hooks x4"):
        n = int(label[-1])
        if rows[label] < n + 2:  # one row per hook group, the background and the negative
            raise BenchmarkError(f"{label}: {rows[label]:.0f} UNet rows per step, fewer than its {n + 2} conds")

    med = {k: times.median(k) for k in configs}
    ratio = {k: times.ratio(k) for k in configs}

    # locality: concept 2's change at the first step, with concept 1 present in both runs
    def first_x0(mdl):
        return run(mdl, pos, 1, keep_x0=True)[1][0]

    base_without = first_x0(scoped(1))
    with_both = first_x0(scoped(2))
    merged_without = first_x0(merged(1))
    merged_both = first_x0(merged(2))
    lat_mask = lat_boxes[1][0]
    leak_scoped = locality.leak(with_both - base_without, lat_mask, 1)
    leak_merged = locality.leak(merged_both - merged_without, lat_mask, 1)

    print(f"\nScoped LoRA benchmark: {args.size}x{args.size}, {shape} (random), rank {args.rank}, "
          f"{args.steps} steps ({args.steps - 1} timed) x {args.repeats} repeats, {describe_machine(session)}")  # fmt: skip
    extra = {k: max(v) - max(peaks["plain"]) for k, v in peaks.items()}
    for line in times.table_rows():
        print(line)
    print(f"{'':26}{'UNet rows/step':>16}{'peak vs plain':>15}")
    for k in configs:
        print(f"{k:26}{rows[k]:16.0f}{extra[k]:+13.0f}MiB")
    print("median: of every timed step; repeats: the fastest and slowest repeat's median; vs plain: medians' ratio, "
          "then the lowest and highest ratio within one repeat. UNet rows: latent rows the diffusion model ran per "
          "step (plain: 2, positive + negative).")  # fmt: skip
    print(f"locality (leak of concept 2 at the first step): scoped {leak_scoped:.3f}, merged {leak_merged:.3f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    report = {"setup": vars(args), "per_step_seconds": med, "ratio_vs_plain": ratio,
              "ratio_spread": {k: times.ratio_spread(k) for k in configs}, "unet_rows_per_step": rows,
              "peak_mib": {k: max(v) for k, v in peaks.items()}, "peak_extra_vs_plain_mib": extra,
              "leak": {"scoped": leak_scoped, "merged": leak_merged}}  # fmt: skip
    (out / f"scoped_lora{'_sdxl' if args.family == 'sdxl' else ''}.json").write_text(json.dumps(report, indent=2))

    figures = Figures(args.device)
    family = "" if args.family == "sd15" else "sdxl_"  # SD1.5's figure names stay as they were

    def add_ratio(metric, label, **kw):
        figures.add(family + metric, ratio[label], spread=times.ratio_spread(label), **kw)

    add_ratio("scoped_lora_step_ratio_2_concepts", "scoped x2", target=1.15)
    add_ratio("scoped_lora_step_ratio_4_concepts", "scoped x4", target=1.3)
    add_ratio("merged_lora_step_ratio_2_concepts", "merged x2")
    add_ratio("core_hooks_step_ratio_2_concepts", "core hooks x2")
    add_ratio("core_hooks_step_ratio_4_concepts", "core hooks x4")
    for n, target in ((2, 1.0), (4, 1.5)):
        hooks, scoped = f"core hooks x{n}", f"scoped x{n}"
        figures.add(f"{family}core_hooks_over_scoped_{n}_concepts", med[hooks] / med[scoped], target=target,
                    better="higher")  # fmt: skip
    figures.add(f"{family}scoped_lora_leak_first_step", leak_scoped)
    figures.add(f"{family}merged_lora_leak_first_step", leak_merged)
    for k in ("scoped x2", "scoped x4", "core hooks x4"):
        figures.add(f"{family}peak_over_plain_{k.replace(' ', '_')}", extra[k], unit="MiB")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
