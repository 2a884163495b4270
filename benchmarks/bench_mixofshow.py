"""Mix-of-Show regional sampling cost and locality, as ratios against plain ComfyUI sampling in the same run.

    python benchmarks/bench_mixofshow.py [--quick] [--size 512] [--steps 4] [--repeats 3] [--rank 16] [--profile]
                                         [--only "mixofshow x2 +2 LoRAs"] [--device auto|cpu|cuda] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (320/640/1280, 860M parameters; fp16 on CUDA, fp32 on the
CPU) with seeded random weights, and a full-size CLIP-L (12 layers, width 768, the real tokenizer) with seeded
random weights in ComfyUI's default text-encoder dtype, so the node encodes real prompts exactly as it would
with a checkpoint. The regions tile the image (2: left/right halves; 4: quadrants; 8: a 4x2 grid), each with
its own prompt, under one global prompt. Configurations, interleaved per repeat:

* plain: the model alone with the global prompt, positive + negative (one UNet call of 2 rows per step);
* mixofshow x2 / x4 / x8: the Mix-of-Show Regional node, prompt-only regions (one UNet call per step);
* mixofshow x2 +2 LoRAs: the same with 2 scoped concept LoRAs (kohya-shaped, rank ``--rank``, on every
  linear layer of the transformer blocks), one labelled for each region;
* core masks x2 / x4 / x8: the regional prompting users build from core nodes today: each region's prompt
  through CLIPTextEncode and ``ConditioningSetMask`` (strength 1, set_cond_area "default", the node's
  defaults: the full latent per cond, the output masked), all ``ConditioningCombine``d with the global
  prompt. ComfyUI runs every cond over the whole latent: 1 + R positive rows + 1 negative row per step;
* core masks+hooks x2: the core route for the concept case: each region's cond gets its LoRA through
  CreateHookLoraModelOnly + ConditioningSetProperties (mask, hooks), combined with the global prompt.

Checks, before a run's time counts (benchmarks/harness.py ``check_did_work``): every output is finite and not
flat, and every configuration but plain changes plain's final latent inside region 1 (the top-left cell of
its tiling); a configuration that silently skipped its regions would otherwise look fast. The UNet rows per
step are counted for every configuration (a DIFFUSION_MODEL wrapper) and printed; the core routes must run at
least one row per cond (1 + R + 1), or the benchmark stops.

Per-step times come from the sampler's callback, timed after the GPU's queued work (the model is loaded by an
untimed one-step run first, and each run's first step, which includes patching, is left out); the table gives each configuration's median step, the spread over
repeats (the fastest and slowest repeat's median) and the ratio to plain with its spread (per repeat, each
repeat's median over plain's in that repeat); the ratio figures carry that spread. The nodes' one-off setup
(prompt encoding: global, negative and one per region) is timed apart. Memory: the peak of each sampling run
over its start (CUDA: allocated memory; CPU: resident memory after ``malloc_trim``, sampled every 5 ms), the
largest of the repeats, and its extra over plain's; memory held before the run (encoded prompts, the concepts'
factors) is not in it; the process's peak is the last figure. Locality (DESIGN.md §6,
samplers/scoped_lora/locality.py): with the other regions fixed, region 1's prompt is changed (in every other
repeat, which counts for the timing too: the cost is the same); leak = mean |change| outside region 1 past a
margin of 1 latent cell / mean |change| inside, in the first step's denoised prediction and in the final
latent. ``--quick``: 256x256, 3 steps, 2 repeats. ``--profile``: also profile one 8-region run and one run
with concepts (cProfile; the pack's functions and ComfyUI's attention). ``--only A,B``: plain and the named
configurations only (a quick check of one change; the figures of the others are left out). The output ends with
one JSON figure per line (benchmarks/figures.py; ``--figures FILE`` appends them there too).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

GLOBAL = "a photo of a busy city street at noon, many objects, high detail"
NEGATIVE = "blurry, lowres, watermark"
PROMPTS = (
    "a red apple on a wooden table",
    "a black cat sleeping",
    "a green vintage car",
    "a tall glass of orange juice",
    "a small white dog with a ball",
    "a blue bicycle leaning on a wall",
    "a bunch of yellow flowers",
    "an old man reading a newspaper",
)
CHANGED = "a yellow school bus in the snow"  # region 1's prompt in the locality runs
LAYOUTS = (2, 4, 8)
MARGIN = 1  # latent cells excluded around the changed region


def grid(n: int) -> tuple[int, int]:
    """(columns, rows) of the tiling for ``n`` regions."""
    return {2: (2, 1), 4: (2, 2), 8: (4, 2)}[n]


def boxes_json(prompts) -> str:
    cols, rows = grid(len(prompts))
    boxes = []
    for i, prompt in enumerate(prompts):
        c, r = i % cols, i // cols
        boxes.append(
            {"x": c / cols, "y": r / rows, "w": 1 / cols, "h": 1 / rows, "prompt": prompt, "label": f"r{i + 1}"}
        )
    return json.dumps({"version": 1, "units": "fraction", "boxes": boxes})


def regions_of(label: str) -> int:
    """The number of regions of a configuration ("mixofshow x2 +2 LoRAs" -> 2)."""
    return int(label.split(" x")[1].split()[0])


def main() -> int:
    t_start = time.perf_counter()
    steps = (4, "sampling steps per run (the first is not timed)")
    parser = harness.bench_parser(__doc__, "256x256, 3 steps, 2 repeats", size=512, steps=steps, repeats=3, rank=16)
    parser.add_argument("--profile", action="store_true", help="also profile an 8-region and a concept run (cProfile)")
    parser.add_argument("--only", default="", help="comma-separated configurations to run beside plain")
    args = harness.parse_args(parser, quick={"size": 256, "steps": 3, "repeats": 2})
    if args.repeats < 2 or args.steps < 2:
        parser.error("--repeats and --steps must be at least 2 (odd repeats are the locality runs; step 1 is untimed)")

    if (session := harness.start_comfy(args, "mc_bench_mixofshow_")) is None:
        return 2

    built = harness.sd15_bench_models(args, session, n_loras=2, rank=args.rank, name="bench_mos")
    model, clip = built.model, built.clip
    concepts = built.lora_stack(session, [{"label": f"r{i + 1}"} for i in range(2)])
    node = session.node_class("MultiConceptMixOfShowRegional")
    regions_mod, locality = map(session.pack_module, ("samplers.regions", "samplers.scoped_lora.locality"))

    import comfy.sample
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLoraModelOnly

    import nodes

    s, lat = args.size, args.size // 8
    clock = harness.Clock()
    encoder = nodes.CLIPTextEncode()
    t0 = clock.now()
    encoder.encode(clip, GLOBAL)  # warm: loads the text encoder
    print(f"first prompt encoding (loads the text encoder) {clock.now() - t0:.2f}s")
    t0 = clock.now()
    encoder.encode(clip, GLOBAL)
    encode_one = clock.now() - t0

    def prompts_for(n, changed=False):
        return (CHANGED,) + PROMPTS[1:n] if changed else PROMPTS[:n]

    def mixofshow(n, changed=False, with_concepts=False):
        """(model, positive, negative, setup seconds) from the node."""
        regions = regions_mod.parse_regions(boxes_json(prompts_for(n, changed)), s, s)
        t0 = clock.now()
        out = node.execute(model, clip, regions, GLOBAL, NEGATIVE, concepts=concepts if with_concepts else None)
        mdl, pos, neg, _ = out.result
        return mdl, pos, neg, clock.now() - t0

    hooks = [CreateHookLoraModelOnly().create_hook_model_only(f, 1.0)[0] for f in built.files]

    def core(n, changed=False, with_hooks=False):
        """What users wire from core nodes: CLIPTextEncode per region, ConditioningSetMask, ConditioningCombine."""
        masks = regions_mod.parse_regions(boxes_json(prompts_for(n, changed)), s, s).masks()  # [R, H, W]
        t0 = clock.now()
        pos = encoder.encode(clip, GLOBAL)[0]
        for i, prompt in enumerate(prompts_for(n, changed)):
            c = encoder.encode(clip, prompt)[0]
            if with_hooks and i < len(hooks):
                props = ConditioningSetProperties()
                c = props.set_properties(c, 1.0, "default", mask=masks[i][None], hooks=hooks[i])[0]
            else:
                c = nodes.ConditioningSetMask().append(c, masks[i][None], "default", 1.0)[0]
            pos = nodes.ConditioningCombine().combine(pos, c)[0]
        neg = encoder.encode(clip, NEGATIVE)[0]
        return model, pos, neg, clock.now() - t0

    builders = {"plain": lambda changed=False: (model, *[encoder.encode(clip, t)[0] for t in (GLOBAL, NEGATIVE)], 0.0)}
    for n in LAYOUTS:
        builders[f"mixofshow x{n}"] = lambda changed=False, n=n: mixofshow(n, changed)
    builders["mixofshow x2 +2 LoRAs"] = lambda changed=False: mixofshow(2, changed, with_concepts=True)
    for n in LAYOUTS:
        builders[f"core masks x{n}"] = lambda changed=False, n=n: core(n, changed)
    builders["core masks+hooks x2"] = lambda changed=False: core(2, changed, with_hooks=True)
    builders = harness.select_only(builders, args.only, parser=parser)

    # Two variants of every configuration: as given, and with region 1's prompt changed (the locality pair).
    # Even repeats sample the first, odd repeats the second; both cost the same (each prompt is one 77-token
    # chunk), so every run counts for the timing and the locality needs no extra runs. Every variant's model
    # counts the UNet rows it runs.
    variants, setup, counters = {}, {}, {}
    for label, build in builders.items():
        pair = [build(changed=False), build(changed=True)]
        counted = [harness.count_model_rows(p[0]) for p in pair]
        variants[label] = [(c[0], *p[1:3]) for c, p in zip(counted, pair, strict=True)]
        counters[label] = [c[1] for c in counted]
        setup[label] = min(pair[0][3], pair[1][3])  # one-off costs: the faster of the two builds

    def region_1(label: str):
        """``[lat, lat]``: region 1, the top-left cell of the configuration's tiling."""
        cols, rows = grid(regions_of(label))
        inside = torch.zeros(lat, lat)
        inside[: lat // rows, : lat // cols] = 1.0
        return inside

    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(mdl, positive, negative, steps):
        return harness.sample_steps(mdl, noise, latent, positive, negative, steps, 5.0, clock=clock, keep_first=True)

    run(model, *builders["plain"]()[1:3], 1)  # load the model once, untimed
    times = harness.Repeats()
    first_times = {k: [] for k in variants}
    peaks = {k: [] for k in variants}
    rows: dict[str, float] = {}
    outputs: dict[str, dict[int, tuple]] = {k: {} for k in variants}
    for r in range(args.repeats):
        which = r % 2
        for label, pair in variants.items():
            mdl, pos, neg = pair[which]
            counter = counters[label][which]
            counter.reset()
            with harness.RunMemory() as peak:
                step_times, first_step, x0, final = run(mdl, pos, neg, args.steps)
            final = final.detach().float().cpu()
            # the check before the time counts: every configuration but plain changes region 1
            region = None if label == "plain" else region_1(label)
            harness.check_did_work(label, final, None if label == "plain" else outputs["plain"][0][1], region)
            times.add(label, r, step_times)
            first_times[label].append(first_step)
            peaks[label].append(peak.growth_mib)
            rows[label] = counter.rows / args.steps
            outputs[label][which] = (x0, final)
            print(f"  repeat {r + 1}/{args.repeats} {label:22} {statistics.median(step_times) * 1000:9.0f} ms/step, "
                  f"{rows[label]:.0f} UNet rows/step in {counter.calls / args.steps:.0f} call(s)"
                  + (" (region 1 changed)" if which else ""), flush=True)  # fmt: skip
    for label in variants:
        if label.startswith("core masks"):
            n = regions_of(label)
            if rows[label] < n + 2:  # the global prompt, one row per region, the negative
                raise harness.BenchmarkError(
                    f"{label}: {rows[label]:.0f} UNet rows per step, fewer than its {n + 2} conds"
                )

    med = {k: times.median(k) for k in variants}
    ratio = {k: times.ratio(k) for k in variants}
    first_min = {k: min(v) for k, v in first_times.items()}
    peak_run = {k: max(v) for k, v in peaks.items()}
    extra = {k: peak_run[k] - peak_run["plain"] for k in peaks}

    # locality: region 1's prompt changed, every other region (and concept) the same
    leaks: dict[str, tuple[float, float]] = {}
    for label in variants:
        if label == "plain" or len(outputs[label]) < 2:
            continue
        inside = region_1(label)
        (x0_a, final_a), (x0_b, final_b) = outputs[label][0], outputs[label][1]
        leaks[label] = (locality.leak(x0_b - x0_a, inside, MARGIN), locality.leak(final_b - final_a, inside, MARGIN))

    profile_text = ""
    if args.profile:
        import cProfile
        import io
        import pstats

        for label in [k for k in ("mixofshow x8", "mixofshow x2 +2 LoRAs") if k in variants]:
            mdl, pos, neg = variants[label][0]
            prof = cProfile.Profile()
            prof.enable()
            step_times, first_step, _, _ = run(mdl, pos, neg, args.steps)
            prof.disable()
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")

            def cumulative(file_end, func, stats=stats):
                return sum(v[3] for k, v in stats.stats.items() if k[0].endswith(file_end) and k[2] == func)

            stats.print_stats(r"samplers/|attention\.py", 25)
            profile_text += (
                f"\n--- {label}: first step {first_step:.2f}s (with loading), {len(step_times)} more step(s) "
                f"{sum(step_times):.2f}s, under the profiler. In the pack: RegionalAttention.__call__ "
                f"{cumulative('mixofshow/sampling.py', '__call__'):.2f}s (with the layer's own global attention), "
                f"of which regional_attention {cumulative('regional_attention.py', 'regional_attention'):.2f}s and "
                f"the region keys/values {cumulative('mixofshow/sampling.py', 'region_kv'):.2f}s (made in the first "
                f"step, once per run); scoped LoRA runtime "
                f"{cumulative('scoped_lora/runtime.py', '_diffusion_model'):.2f}s\n" + buf.getvalue()
            )

    total = time.perf_counter() - t_start
    title = (f"Mix-of-Show regional benchmark: {s}x{s}, {built.shape}, LoRA rank {args.rank}, {args.steps} steps "
             f"({args.steps - 1} timed) x {args.repeats} repeats, {harness.describe_machine(session)}")  # fmt: skip
    leak_x0, leak_final = ({k: v[i] for k, v in leaks.items()} for i in (0, 1))
    harness.print_tables(title, times, {"rows/step": (rows, "10.0f"), "1st step s": (first_min, "11.2f"),
                                        "run MiB": (peak_run, "9.0f"), "vs plain": (extra, "+9.0f"),
                                        "setup s": (setup, "9.2f"), "leak x0": (leak_x0, "9.3f"),
                                        "leak final": (leak_final, "11.3f")}, whole_runs=False)  # fmt: skip
    print(
        "rows/step: latent rows the UNet ran per step (plain: 2). 1st step: the untimed first step (loading, patching, per-run caches), the fastest repeat. run memory: "
        "the peak during a sampling run over its start, the largest of the repeats. setup: the node's (or the core "
        "graph's) one-off prompt encoding (the faster of two builds), not in the per-step figures; one prompt "
        f"encodes in {encode_one:.2f}s. leak: region 1's prompt changed, mean |change| outside it (margin {MARGIN} "
        f"latent cell) / inside. Run took {total:.0f}s."
    )
    if profile_text:
        print("\nprofile of one sampling run (cumulative):" + profile_text)

    report = {"setup": vars(args), "per_step_seconds": med, "ratio_vs_plain": ratio,
              "ratio_spread": {k: times.ratio_spread(k) for k in variants},
              "per_step_spread": {k: times.spread(k) for k in variants}, "unet_rows_per_step": rows,
              "first_step_seconds": first_min, "setup_seconds": setup, "encode_one_prompt_seconds": encode_one,
              "run_memory_mib": peak_run, "run_memory_extra_vs_plain_mib": extra,
              "leak_first_step": {k: v[0] for k, v in leaks.items()},
              "leak_final_latent": {k: v[1] for k, v in leaks.items()}, "run_seconds": total}  # fmt: skip
    harness.write_results("mixofshow_partial.json" if args.only else "mixofshow.json", report)

    figures = harness.Figures(args.device)

    def add(metric, table, *labels, **kw):  # a figure only when its configurations ran (see --only)
        if all(k in table for k in labels):
            value = table[labels[0]] if len(labels) == 1 else table[labels[0]] / table[labels[1]]
            figures.add(metric, value, **kw)

    def add_ratio(metric, label, **kw):
        if label in ratio:
            figures.add(metric, ratio[label], spread=times.ratio_spread(label), **kw)

    add_ratio("mixofshow_step_ratio_2_regions", "mixofshow x2", target=1.15)
    add_ratio("mixofshow_step_ratio_4_regions", "mixofshow x4")
    add_ratio("mixofshow_step_ratio_8_regions", "mixofshow x8", target=1.35)
    add_ratio("mixofshow_step_ratio_2_scoped_concepts", "mixofshow x2 +2 LoRAs", target=1.3)
    for n in LAYOUTS:
        add_ratio(f"core_masks_step_ratio_{n}_regions", f"core masks x{n}")
    add_ratio("core_masks_hooks_step_ratio_2_concepts", "core masks+hooks x2")
    for n in LAYOUTS:
        add(f"core_masks_over_mixofshow_{n}_regions", med, f"core masks x{n}", f"mixofshow x{n}", better="higher")
    for label, name in (
        *((f"mixofshow x{n}", f"mixofshow_{n}_regions") for n in LAYOUTS),
        ("mixofshow x2 +2 LoRAs", "mixofshow_2_scoped_concepts"),
        *((f"core masks x{n}", f"core_masks_{n}_regions") for n in LAYOUTS),
        ("core masks+hooks x2", "core_masks_hooks_2_concepts"),
    ):
        if label in leaks:
            figures.add(f"{name}_leak_first_step", leaks[label][0])
            figures.add(f"{name}_leak_final_latent", leaks[label][1])
    for n in (2, 8):
        add(f"mixofshow_setup_seconds_{n}_regions", setup, f"mixofshow x{n}", unit="s")
        add(f"core_masks_setup_seconds_{n}_regions", setup, f"core masks x{n}", unit="s")
    figures.add("run_memory_plain", peak_run["plain"], unit="MiB")
    for k in ("mixofshow x2", "mixofshow x8", "mixofshow x2 +2 LoRAs", "core masks x8", "core masks+hooks x2"):
        name = k.replace(" x", "_x").replace(" +2 LoRAs", "_2_scoped_concepts").replace("+", "_").replace(" ", "_")
        add(f"run_memory_over_plain_{name}", extra, k, unit="MiB")
    figures.add_peak_memory("mixofshow_bench_peak_rss")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
