"""Gradient fusion cost (closed form vs L-BFGS) on the same inputs, with ratios measured in the same run.

    python benchmarks/bench_fusion.py [--quick] [--concepts 2,4] [--size 512] [--steps 5] [--text-iters 5]
                                      [--unet-iters 2] [--save-dtype fp16] [--repeats 1] [--probe-official]
                                      [--only "closed form x2,L-BFGS x2"] [--device auto|cpu|cuda] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (320/640/1280, 860M parameters, seeded random weights;
fp16 on CUDA, fp32 on the CPU), a full-size random CLIP-L (12 layers, width 768). The concepts are synthetic ED-LoRAs in the official
Mix-of-Show layout (tests/support/builders/edlora.py: rank 4 on q/k/v/out of every text-encoder layer and of
attn1/attn2 of all 16 transformer blocks, 16 layer tokens per word), each with its own words and seed, put on
a concept stack with the Concept Stack: ED-LoRA node. The 2-concept stack is the first two of the 4.

Configurations, per concept count and interleaved per repeat: ``fuse_stack`` (samplers/fusion/fuse.py) with
the closed-form solver and with L-BFGS, same stack, same settings, under ``torch.inference_mode()`` as ComfyUI's
executor runs the Fuse Concepts node (saving the file is not timed), after an untimed warm-up fusion (1 step,
64x64). A fusion records every concept's layer inputs (prompts through the text encoder, then a sampling run of
``--steps`` steps at ``--size`` with the fused keys/values) and solves each layer. Reported per run: the whole
fusion's seconds (recording included; the clock waits for the GPU), the solver's seconds alone
(``FusionRun.solve_seconds``), per stage, L-BFGS's objective evaluations per layer and their cost, working
memory (the peak during the run over its start: CUDA's allocated memory, or the resident memory with freed
memory returned to the system first), and the mean relative error
of the fused layers over every layer and concept (``‖(W − W_i) X_i‖ / ‖W_i X_i‖`` on concept ``i``'s own
inputs, of the weights as saved) next to the plain sum of the LoRAs'. Plain: one ComfyUI txt2img run of the
same steps and size (CFG 7.5, positive + negative, dpmpp_2m), after an untimed load. Times: the median over
repeats, with the spread of the per-repeat ratios (each repeat's fusion over plain's, or L-BFGS's over the
closed form's, in that repeat), which the time figures carry.

Checks, before a run's time counts (benchmarks/harness.py ``check_did_work``): plain's latent is finite and not
flat, and every fusion's weight differences (UNet and text encoder, W_fused − W0) are finite and not all zero,
and its residuals finite: a fusion that skipped its layers would otherwise look fast.

Iterations. The official L-BFGS settings (500 iterations for the text encoder and keys/values, 50 for the other
UNet layers; ``--text-iters 500 --unet-iters 50``) do not fit on 2 CPU cores: the solver works on the recorded
second moments, so one objective evaluation costs ``out × in²`` per concept (a 1280-wide layer with 4 concepts:
~25 GFLOP with the backward pass), and at 500 iterations a single text-encoder layer takes minutes. The default
is therefore 5 / 2 iterations (and 5 recording steps instead of 20), which runs in ~35-40 minutes. Truncating
L-BFGS only makes it faster and its residual higher, so the speedup measured is a lower bound of the official
one (read the residual ratio with that in mind). ``--probe-official`` re-solves one layer of each stage and
shape at the official iterations and estimates the whole official solve from it (slow). ``--quick``: a small
SD1.5-shaped UNet (64 channels everywhere), a 3-layer CLIP-L, 64x64, 4 steps, 10 / 3 iterations. The output
ends with one JSON figure per line (benchmarks/figures.py; ``--figures FILE`` appends them there too).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from tests.support.builders.edlora import official_edlora  # noqa: E402

SOLVERS = ("closed form", "L-BFGS")
CONCEPTS = (  # words, class word, seed
    (("<cat1>", "<cat2>"), "cat", 51),
    (("<dog1>", "<dog2>"), "dog", 52),
    (("<ann1>", "<ann2>"), "woman", 53),
    (("<car1>", "<car2>"), "car", 54),
)
STAGES = ("text encoder", "cross-attention k/v", "UNet")
PLAIN_PROMPT = "a photo of a cat and a dog in a garden, high detail"
NEGATIVE = "blurry, lowres"
QUICK_CHANNELS = 64
OFFICIAL_ITERS = (500, 50)  # L-BFGS iterations: text encoder and keys/values, other UNet layers (the original's)
DEFAULT_ITERS = (5, 2)  # what fits the benchmark in ~40 minutes on 2 CPU cores (see the module docstring)
QUICK_ITERS = (10, 3)


def key_of(solver: str, n: int) -> str:
    return f"{solver} x{n}"


def slug(solver: str) -> str:
    return solver.lower().replace(" ", "_").replace("-", "")


def main() -> int:
    t_start = time.perf_counter()
    quick = "small UNet (64 wide), 3-layer CLIP, 64x64, 4 steps, 10/3 iterations"
    size = (512, "recording (and plain) image size, square")
    steps = (5, "recording (and plain) sampling steps (official: 20)")
    parser = harness.bench_parser(__doc__, quick, size=size, steps=steps, repeats=1)
    parser.add_argument("--concepts", default="2,4", help="comma-separated concept counts (at most 4)")
    parser.add_argument(
        "--text-iters",
        type=int,
        default=None,
        help=f"L-BFGS iterations, text encoder and k/v layers (default {DEFAULT_ITERS[0]}, quick {QUICK_ITERS[0]}, "
        f"official {OFFICIAL_ITERS[0]})",
    )
    parser.add_argument(
        "--unet-iters",
        type=int,
        default=None,
        help=f"L-BFGS iterations, other UNet layers (default {DEFAULT_ITERS[1]}, quick {QUICK_ITERS[1]}, "
        f"official {OFFICIAL_ITERS[1]})",
    )
    parser.add_argument("--save-dtype", default="fp16", choices=("fp16", "fp32", "bf16"),
                        help="precision of the fused differences (the residuals are of the weights as saved)")  # fmt: skip
    parser.add_argument("--lora-scale", type=float, default=0.1, help="scale of the synthetic LoRA factors")
    parser.add_argument(
        "--probe-official",
        action="store_true",
        help="also re-solve one layer of each stage and shape with L-BFGS at the official iterations "
        "and estimate the official solve time from it (slow: minutes per layer at SD1.5 widths)",
    )
    parser.add_argument("--only", default="", help='comma-separated configurations, e.g. "closed form x2,L-BFGS x2"')
    args = harness.parse_args(parser, quick={"size": 64, "steps": 4})
    iters = QUICK_ITERS if args.quick else DEFAULT_ITERS
    args.text_iters = iters[0] if args.text_iters is None else args.text_iters
    args.unet_iters = iters[1] if args.unet_iters is None else args.unet_iters
    counts = sorted({int(c) for c in args.concepts.split(",") if c.strip()})
    if not counts or min(counts) < 2 or max(counts) > len(CONCEPTS):
        parser.error(f"--concepts: counts between 2 and {len(CONCEPTS)}")
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    configs = {key_of(s, n): (n, s) for n in counts for s in SOLVERS}
    configs = list(harness.select_only(configs, args.only, keep=(), parser=parser).values())

    if (session := harness.start_comfy(args, "mc_bench_fusion_")) is None:
        return 2

    built = harness.sd15_bench_models(args, session, small_channels=QUICK_CHANNELS if args.quick else None)
    model, clip, shape = built.model, built.clip, built.shape
    unet_modules, te_modules = built.edlora_modules()
    fuse_mod, solvers_mod = (session.pack_module(f"samplers.fusion.{m}") for m in ("fuse", "solvers"))
    stack_node = session.node_class("MultiConceptStackEDLoRA")
    clock = harness.Clock()

    import comfy.sample

    import nodes

    stacks = {}
    stack = None
    for i, (words, class_word, seed) in enumerate(CONCEPTS[: max(counts)]):
        name = f"bench_fusion_{i}.pth"
        data = official_edlora(words=words, seed=seed, lora_scale=args.lora_scale, unet_modules=unet_modules,
                               te_modules=te_modules)  # fmt: skip
        torch.save(data, session.models_dir / "loras" / name)
        stack = stack_node.execute(name, 1.0, 1.0, class_word, concepts=stack, class_word=class_word).args[0]
        stacks[i + 1] = stack

    # Instrumentation (no behaviour change): solver seconds per stage, and L-BFGS's objective evaluations.
    current = {"stage": ""}
    solve_by_stage: dict[str, float] = defaultdict(float)
    layers_by_stage: dict[str, int] = defaultdict(int)
    evals_by_stage: dict[str, int] = defaultdict(int)
    capped_by_stage: dict[str, int] = defaultdict(int)
    shapes_by_stage: dict[tuple, int] = defaultdict(int)  # (stage, out, in) -> layers
    captured: dict[
        tuple, object
    ] = {}  # (concepts, stage, out, in) -> the first such layer's problem (--probe-official)
    orig_solve_layers, orig_solve, orig_objective = fuse_mod._solve_layers, fuse_mod.solve, solvers_mod.objective

    def solve_layers(*a, **kw):
        current["stage"] = a[6] if len(a) > 6 else kw["stage"]
        return orig_solve_layers(*a, **kw)

    def solve(*a, **kw):
        t, evals = clock.now(), evals_by_stage[current["stage"]]
        out = orig_solve(*a, **kw)
        stage = current["stage"]
        solve_by_stage[stage] += clock.now() - t
        layers_by_stage[stage] += 1
        shape = tuple(a[0].base.shape)
        shapes_by_stage[(stage, *shape)] += 1
        if args.probe_official and stage in STAGES:
            captured.setdefault((len(a[0].moments), stage, *shape), a[0])
        if evals_by_stage[stage] - evals >= kw.get("iters", 0) > 0 and a[1] == "L-BFGS":
            capped_by_stage[stage] += 1  # as many evaluations as iterations: the cap, not convergence, stopped it
        return out

    def objective(*a, **kw):
        evals_by_stage[current["stage"]] += 1
        return orig_objective(*a, **kw)

    fuse_mod._solve_layers, fuse_mod.solve, solvers_mod.objective = solve_layers, solve, objective

    encode = nodes.CLIPTextEncode().encode
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)

    def plain():
        pos, neg = encode(clip, PLAIN_PROMPT)[0], encode(clip, NEGATIVE)[0]
        return comfy.sample.sample(model, noise, args.steps, 7.5, "dpmpp_2m", "normal", pos, neg, latent,
                                   disable_pbar=True, seed=0)  # fmt: skip

    def fusion(n, solver):
        settings = fuse_mod.FusionSettings(solver=solver, steps=args.steps, width=args.size, height=args.size,
                                           text_iters=args.text_iters, unet_iters=args.unet_iters,
                                           save_dtype=args.save_dtype)  # fmt: skip
        last = {"t": time.perf_counter(), "stage": ""}
        started = last["t"]

        def progress(done, total, text):
            stage = text.split(":", 1)[0] if ":" in text else current["stage"]
            now = time.perf_counter()
            if stage != last["stage"] or now - last["t"] > 60 or done == total:
                print(f"      {now - started:7.1f}s  {done}/{total}  {text}", flush=True)
                last["t"], last["stage"] = now, stage

        return fuse_mod.fuse_stack(model, clip, stacks[n], settings, progress=progress)

    def check_fusion(label, run):
        """The fusion did its work: weight differences for the UNet and the text encoder, finite and not all zero
        (a sample of each tensor), and finite residuals."""
        for part, deltas in (("UNet", run.fused.unet), ("text encoder", run.fused.clip)):
            if not deltas:
                raise harness.BenchmarkError(f"{label}: the fusion wrote no {part} weight differences")
            sample = torch.cat([t.detach().float().flatten()[:4096].cpu() for t in deltas.values()])
            harness.check_did_work(f"{label} ({part} weight differences)", sample)
        errors = [e for x in run.fused.residuals for e in (*x["fused"], *x["sum"])]
        if not errors or not all(math.isfinite(e) for e in errors):
            raise harness.BenchmarkError(f"{label}: the fusion's residuals are missing or not finite")

    runs: dict[str, list[dict]] = defaultdict(list)
    plain_runs: list[dict] = []
    times, solves = harness.Repeats(), harness.Repeats()  # whole runs (plain and fusions); the fusions' solver seconds
    with torch.inference_mode():
        t0 = clock.now()
        plain()  # loads the model and the text encoder, untimed
        print(f"untimed first plain run (loads the model) {clock.now() - t0:.0f}s", flush=True)
        t0 = clock.now()
        warm = fuse_mod.FusionSettings(solver="closed form", steps=1, width=64, height=64, save_dtype=args.save_dtype)
        fuse_mod.fuse_stack(model, clip, stacks[min(counts)], warm)  # first-use costs (encoders, solvers), untimed
        print(f"untimed warm-up fusion (closed form, 1 step at 64x64) {clock.now() - t0:.0f}s", flush=True)
        for r in range(args.repeats):
            out, seconds, mem = harness.timed_run(plain, clock)
            harness.check_did_work("plain", out)
            times.add("plain", r, seconds)
            plain_runs.append({"seconds": seconds, "memory_mib": mem.growth_mib})
            print(f"  repeat {r + 1}/{args.repeats} {'plain':16} {seconds:8.1f}s  +{mem.growth_mib:6.0f} MiB",
                  flush=True)  # fmt: skip
            for n, solver in configs:
                label = key_of(solver, n)
                print(f"  repeat {r + 1}/{args.repeats} {label} ...", flush=True)
                for table in (solve_by_stage, layers_by_stage, evals_by_stage, capped_by_stage, shapes_by_stage):
                    table.clear()
                run, seconds, mem = harness.timed_run(lambda n=n, solver=solver: fusion(n, solver), clock)
                check_fusion(label, run)  # before its time counts
                times.add(label, r, seconds)
                solves.add(label, r, run.solve_seconds)
                residuals = run.fused.residuals
                per_stage = {}
                for stage in STAGES:
                    rs = [x for x in residuals if x["stage"] == stage]
                    per_stage[stage] = {
                        "seconds": run.seconds.get(stage, 0.0),
                        "solve_seconds": solve_by_stage.get(stage, 0.0),
                        "layers": layers_by_stage.get(stage, 0),
                        "evals_per_layer": evals_by_stage.get(stage, 0) / max(layers_by_stage.get(stage, 0), 1),
                        "seconds_per_eval": solve_by_stage.get(stage, 0.0) / max(evals_by_stage.get(stage, 0), 1),
                        "capped_layers": capped_by_stage.get(stage, 0),
                        "fused_error": statistics.mean(e for x in rs for e in x["fused"]) if rs else 0.0,
                        "sum_error": statistics.mean(e for x in rs for e in x["sum"]) if rs else 0.0,
                    }
                entry = {
                    "seconds": seconds,
                    "stage_seconds": dict(run.seconds),
                    "solve_seconds": run.solve_seconds,
                    "memory_mib": mem.growth_mib,
                    "fused_error": statistics.mean(e for x in residuals for e in x["fused"]),
                    "sum_error": statistics.mean(e for x in residuals for e in x["sum"]),
                    "worst_fused_error": max(e for x in residuals for e in x["fused"]),
                    "per_stage": per_stage,
                    "layer_shapes": {f"{k[0]} {k[1]}x{k[2]}": v for k, v in shapes_by_stage.items()},
                }
                runs[label].append(entry)
                print(f"  repeat {r + 1}/{args.repeats} {label:16} {seconds:8.1f}s  solve {run.solve_seconds:7.1f}s  "
                      f"+{mem.growth_mib:6.0f} MiB  error fused {100 * entry['fused_error']:.3f}% "
                      f"sum {100 * entry['sum_error']:.2f}%", flush=True)  # fmt: skip
        probes: dict[tuple, dict] = {}
        for key, problem in sorted(captured.items()):
            n, stage, out_f, in_f = key
            iters = OFFICIAL_ITERS[1] if stage == "UNet" else OFFICIAL_ITERS[0]
            current["stage"] = "probe"
            evals_by_stage["probe"] = 0
            t0 = clock.now()
            w_lbfgs = solvers_mod.lbfgs(problem, iters=iters)
            seconds = clock.now() - t0
            t0 = clock.now()
            w_closed = solvers_mod.closed_form(problem)
            closed_seconds = clock.now() - t0
            err_l, err_c = solvers_mod.relative_errors(problem, w_lbfgs, w_closed)  # in float32, not as saved
            probes[key] = {"seconds": seconds, "evals": evals_by_stage["probe"], "iters": iters,
                           "closed_form_seconds": closed_seconds, "lbfgs_error": statistics.mean(err_l),
                           "closed_form_error": statistics.mean(err_c)}  # fmt: skip
            print(f"  probe: x{n} {stage} {out_f}x{in_f}: L-BFGS at {iters} iterations {seconds:.1f}s, "
                  f"{probes[key]['evals']} evaluations, error {100 * probes[key]['lbfgs_error']:.3f}%; closed form "
                  f"{closed_seconds:.2f}s, error {100 * probes[key]['closed_form_error']:.3f}%", flush=True)  # fmt: skip
    fuse_mod._solve_layers, fuse_mod.solve, solvers_mod.objective = orig_solve_layers, orig_solve, orig_objective
    official: dict[int, float] = {}  # concepts -> estimated L-BFGS solve seconds at the official iterations
    for n in counts:
        label = next((key_of(s, n) for s in SOLVERS if key_of(s, n) in runs), None)
        keys = [k for k in probes if k[0] == n]
        if label and keys:
            shapes = runs[label][0]["layer_shapes"]
            official[n] = sum(probes[k]["seconds"] * shapes.get(f"{k[1]} {k[2]}x{k[3]}", 0) for k in keys)

    def best(label, field):  # times: the median over repeats; memory: the largest; the median otherwise
        if field == "seconds":
            return times.median(label)
        if field == "solve_seconds":
            return solves.median(label)
        values = [x[field] for x in runs[label]]
        return max(values) if field.startswith("memory") else statistics.median(values)

    plain_s = times.median("plain")
    plain_mem = max(x["memory_mib"] for x in plain_runs)
    total = time.perf_counter() - t_start
    print(f"\nFusion benchmark: {shape}, {max(counts)} synthetic ED-LoRAs (rank 4, LoRA scale {args.lora_scale}), "
          f"recording {args.size}x{args.size} x {args.steps} steps (dpmpp_2m, cfg 1), L-BFGS iterations "
          f"{args.text_iters} (text encoder, k/v) / {args.unet_iters} (UNet), saved as {args.save_dtype}, "
          f"{args.repeats} repeat(s), {harness.describe_machine(session)}, {torch.get_num_threads()} threads")  # fmt: skip
    for line in times.table_rows(unit=1.0, suffix="s", digits=1):
        print(line)
    print(f"\n{'':16}{'fusion':>9}{'solve':>9}{'record':>9}{'vs plain':>10}{'memory':>10}{'fused err':>11}"
          f"{'sum err':>9}{'worst':>9}")  # fmt: skip
    print(f"{'plain':16}{plain_s:8.1f}s{'':>9}{'':>9}{1.0:9.2f}x{plain_mem:6.0f} MiB")
    for n, solver in configs:
        label = key_of(solver, n)
        s, sv = best(label, "seconds"), best(label, "solve_seconds")
        print(f"{label:16}{s:8.1f}s{sv:8.1f}s{s - sv:8.1f}s{s / plain_s:9.2f}x{best(label, 'memory_mib'):6.0f} MiB"
              f"{100 * best(label, 'fused_error'):10.3f}%{100 * best(label, 'sum_error'):8.2f}%"
              f"{100 * best(label, 'worst_fused_error'):8.2f}%")  # fmt: skip
    print("\nper stage (first repeat): stage = recording + solving; solve = the solver alone; evals = L-BFGS objective "
          "evaluations per layer (capped: layers that used as many as the iteration limit), ms per evaluation")  # fmt: skip
    print(f"  {'':16} {'':20} {'stage':>9} {'solve':>9} {'layers':>6} {'evals':>6} {'capped':>6} {'ms/eval':>8} "
          f"{'fused err':>10} {'sum err':>8}")  # fmt: skip
    for n, solver in configs:
        label = key_of(solver, n)
        for stage, v in runs[label][0]["per_stage"].items():
            lb = solver == "L-BFGS"
            evals = f"{v['evals_per_layer']:6.1f} {v['capped_layers']:6d} {1000 * v['seconds_per_eval']:8.1f}" if lb else (
                f"{'-':>6} {'-':>6} {'-':>8}")  # fmt: skip
            print(f"  {label:16} {stage:20} {v['seconds']:8.1f}s {v['solve_seconds']:8.1f}s {v['layers']:6d} {evals} "
                  f"{100 * v['fused_error']:9.4f}% {100 * v['sum_error']:7.2f}%")  # fmt: skip
    if args.text_iters < OFFICIAL_ITERS[0] or args.unet_iters < OFFICIAL_ITERS[1]:
        print(f"L-BFGS ran {args.text_iters}/{args.unet_iters} iterations, not the official "
              f"{OFFICIAL_ITERS[0]}/{OFFICIAL_ITERS[1]}: its solve time is a lower bound of the official one (so is the "
              "speedup), its residual an upper bound.")  # fmt: skip
    for n, seconds in official.items():
        cf = key_of("closed form", n)
        vs = f", {seconds / best(cf, 'solve_seconds'):.0f}x the closed form's solve" if cf in runs else ""
        print(f"estimated L-BFGS solve at the official {OFFICIAL_ITERS[0]}/{OFFICIAL_ITERS[1]} iterations, {n} concepts: "
              f"{seconds:.0f}s (one layer per stage and shape re-solved, times its number of layers){vs}")  # fmt: skip
    print(f"fusion: the whole fuse_stack (recording + solving), median over repeats (the first table: its spread "
          f"over repeats, and the ratio to plain with the lowest and highest ratio within one repeat); solve: the "
          f"solver alone; vs plain: fusion over one plain txt2img run of {args.steps} steps at "
          f"{args.size}x{args.size} (CFG 7.5, dpmpp_2m); memory: the peak during the run over its start (CUDA: "
          f"allocated; CPU: RSS after malloc_trim); errors: mean over layers and concepts of the relative output "
          f"error on each concept's own inputs. Run took {total:.0f}s.")  # fmt: skip

    name = "fusion_partial.json" if args.only else ("fusion_quick.json" if args.quick else "fusion.json")
    report = {"setup": {**vars(args), "model": shape}, "plain": plain_runs, "runs": runs,
              "official_lbfgs_probes": {" ".join(map(str, k)): v for k, v in probes.items()},
              "official_lbfgs_solve_estimate": official, "total_seconds": total}  # fmt: skip
    print(f"written to {harness.write_results(name, report)}")

    figures = harness.Figures(args.device)
    for n in counts:
        cf, lb = key_of("closed form", n), key_of("L-BFGS", n)
        if cf in runs and lb in runs:
            figures.add(f"fusion_solve_speedup_{n}_concepts", solves.ratio(lb, cf), target=10.0, better="higher",
                        spread=solves.ratio_spread(lb, cf))  # fmt: skip
            figures.add(f"fusion_total_speedup_{n}_concepts", times.ratio(lb, cf), better="higher",
                        spread=times.ratio_spread(lb, cf))  # fmt: skip
            err_cf, err_lb = best(cf, "fused_error"), best(lb, "fused_error")
            ratio = err_cf / err_lb if err_lb > 0 else (1.0 if err_cf == 0 else float("inf"))
            figures.add(f"fusion_residual_ratio_{n}_concepts", ratio, target=1.0)
        if n in official and cf in runs:
            figures.add(f"fusion_solve_speedup_official_iters_estimate_{n}_concepts",
                        official[n] / best(cf, "solve_seconds"), better="higher")  # fmt: skip
        for solver in SOLVERS:
            label = key_of(solver, n)
            if label in runs:
                figures.add(f"fusion_time_ratio_vs_plain_{slug(solver)}_{n}_concepts", times.ratio(label),
                            spread=times.ratio_spread(label))  # fmt: skip
                figures.add(f"fusion_solve_seconds_{slug(solver)}_{n}_concepts", solves.median(label), unit="s",
                            spread=solves.spread(label))  # fmt: skip
                figures.add(f"fusion_mean_error_{slug(solver)}_{n}_concepts", best(label, "fused_error"))
                figures.add(f"fusion_peak_memory_{slug(solver)}_{n}_concepts", best(label, "memory_mib"), unit="MiB")
        label = next((key_of(s, n) for s in SOLVERS if key_of(s, n) in runs), None)
        if label:
            figures.add(f"fusion_plain_sum_error_{n}_concepts", best(label, "sum_error"))
    figures.add("fusion_plain_run_memory", plain_mem, unit="MiB")
    figures.add_peak_memory("fusion_bench_peak_rss")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
