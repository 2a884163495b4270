"""Mix-of-Show regional sampling cost and locality, as ratios against plain ComfyUI sampling in the same run.

    python benchmarks/bench_mixofshow.py [--quick] [--size 512] [--steps 4] [--repeats 3] [--rank 16] [--profile]
                                         [--only "mixofshow x2 +2 LoRAs"]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. The model is an SD1.5 UNet at full
widths (320/640/1280, 860M parameters) with seeded random weights (benchmarks/bench_scoped_lora.py builds
it); the text encoder is a full-size CLIP-L (12 layers, width 768, the real tokenizer) with seeded random
weights in ComfyUI's default text-encoder dtype, so the node encodes real prompts exactly as it would with a
checkpoint. The regions tile the image (2: left/right halves; 4: quadrants; 8: a 4x2 grid), each with its
own prompt, under one global prompt. Configurations, interleaved per repeat:

* plain: the model alone with the global prompt, positive + negative (one UNet call of 2 rows per step);
* mixofshow x2 / x4 / x8: the Mix-of-Show Regional node, prompt-only regions (one UNet call per step);
* mixofshow x2 +2 LoRAs: the same with 2 scoped concept LoRAs (kohya-shaped, rank ``--rank``, on every
  linear layer of the transformer blocks, as bench_scoped_lora's), one labelled for each region;
* core masks x2 / x4 / x8: the regional prompting users build from core nodes today: each region's prompt
  through CLIPTextEncode and ``ConditioningSetMask`` (strength 1, set_cond_area "default", the node's
  defaults: the full latent per cond, the output masked), all ``ConditioningCombine``d with the global
  prompt. ComfyUI runs every cond over the whole latent: 1 + R positive rows + 1 negative row per step;
* core masks+hooks x2: the core route for the concept case: each region's cond gets its LoRA through
  CreateHookLoraModelOnly + ConditioningSetProperties (mask, hooks), combined with the global prompt.

Per-step times come from the sampler's callback (the first step, which includes loading and patching, is
left out). The nodes' one-off setup (prompt encoding: global, negative and one per region) is timed apart.
Peak memory: the highest resident memory during each sampling run (sampled every 5 ms) over the memory at the
run's start, freed memory given back to the system first (``malloc_trim``), so that each run shows its own
working memory; reported with its extra over plain sampling's. Memory held before the run (the node's encoded
prompts, the concepts' factors, ...) is not in it; the process's peak is the last figure.
Locality (DESIGN.md §6, samplers/scoped_lora/locality.py): with the other regions fixed, region 1's prompt
is changed (in every other repeat, which counts for the timing too: the cost is the same); leak = mean
|change| outside region 1 past a margin of 1 latent cell / mean |change| inside, in the first step's
denoised prediction and in the final latent.
``--quick``: 256x256, 3 steps, 2 repeats. ``--profile``: also profile one 8-region run and one run with concepts
(cProfile; the pack's functions and ComfyUI's attention). ``--only A,B``: plain and the named configurations
only (a quick check of one change; the figures of the others are left out). The output ends with one JSON figure per line
(benchmarks/figures.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scoped_lora import PeakRSS, build_unet, transformer_linears  # noqa: E402
from benchmarks.figures import Figures  # noqa: E402

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


class RunMemory(PeakRSS):
    """Peak resident memory of one sampling run over the memory at its start: freed memory is given back to
    the system first (``malloc_trim``), so that each run's own working memory shows, whatever ran before."""

    def __enter__(self):
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the growth is then a lower bound
            pass
        return super().__enter__()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per configuration")
    parser.add_argument("--rank", type=int, default=16, help="rank of each concept LoRA")
    parser.add_argument("--quick", action="store_true", help="256x256, 3 steps, 2 repeats")
    parser.add_argument("--profile", action="store_true", help="also profile an 8-region and a concept run (cProfile)")
    parser.add_argument("--only", default="", help="comma-separated configurations to run beside plain")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.repeats = 256, 3, 2
    if args.repeats < 2 or args.steps < 2:
        parser.error("--repeats and --steps must be at least 2 (odd repeats are the locality runs; step 1 is untimed)")
    t_start = time.perf_counter()

    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return 2
    from tests.support.comfy_inprocess import make_session

    session = make_session(comfy_path, Path(tempfile.mkdtemp(prefix="mc_bench_mixofshow_")))

    import comfy.model_management
    import comfy.sample
    import torch
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLoraModelOnly
    from safetensors.torch import save_file

    import nodes
    from tests.support.lora_factory import make_lora
    from tests.support.tiny_clip import build_tiny_clip

    stack_mod = session.pack_module("samplers.concept_stack")
    regions_mod = session.pack_module("samplers.regions")
    locality = session.pack_module("samplers.scoped_lora.locality")
    node = session.node_class("MultiConceptMixOfShowRegional")

    t0 = time.perf_counter()
    model = build_unet(seed=0)
    print(f"built a random SD1.5 UNet ({sum(p.numel() for p in model.model.parameters()) / 1e6:.0f}M parameters) "
          f"in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    t0 = time.perf_counter()
    clip = build_tiny_clip("sd15", seed=0, layers=None, mlp=None)  # full CLIP-L, ComfyUI's default dtype
    clip_params = sum(p.numel() for p in clip.cond_stage_model.parameters()) / 1e6
    clip_dtype = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in clip.cond_stage_model.parameters()}))
    print(f"built a random CLIP-L ({clip_params:.0f}M parameters, {clip_dtype}) in {time.perf_counter() - t0:.1f}s")

    targets = transformer_linears(model)
    loras = [make_lora(model, targets, rank=args.rank, seed=100 + i, scale=0.4) for i in range(2)]
    for i, sd in enumerate(loras):
        save_file(sd, str(session.models_dir / "loras" / f"bench_mos_{i}.safetensors"))
    concepts = stack_mod.ConceptStack()
    for i in range(2):
        concepts = concepts.with_concept(
            stack_mod.Concept(
                uid="",
                kind="lora",
                source=f"bench_mos_{i}.safetensors",
                words=(),
                label=f"r{i + 1}",
                adapter=stack_mod.LoRAFile(f"bench_mos_{i}", loras[i]),
            )
        )

    s, lat = args.size, args.size // 8
    encoder = nodes.CLIPTextEncode()
    t0 = time.perf_counter()
    encoder.encode(clip, GLOBAL)  # warm: loads the text encoder
    print(f"first prompt encoding (loads the text encoder) {time.perf_counter() - t0:.2f}s")
    t0 = time.perf_counter()
    encoder.encode(clip, GLOBAL)
    encode_one = time.perf_counter() - t0

    def prompts_for(n, changed=False):
        return (CHANGED,) + PROMPTS[1:n] if changed else PROMPTS[:n]

    def mixofshow(n, changed=False, with_concepts=False):
        """(model, positive, negative, setup seconds) from the node."""
        regions = regions_mod.parse_regions(boxes_json(prompts_for(n, changed)), s, s)
        t0 = time.perf_counter()
        out = node.execute(model, clip, regions, GLOBAL, NEGATIVE, concepts=concepts if with_concepts else None)
        mdl, pos, neg, _ = out.result
        return mdl, pos, neg, time.perf_counter() - t0

    hooks = [CreateHookLoraModelOnly().create_hook_model_only(f"bench_mos_{i}.safetensors", 1.0)[0] for i in range(2)]

    def core(n, changed=False, with_hooks=False):
        """What users wire from core nodes: CLIPTextEncode per region, ConditioningSetMask, ConditioningCombine."""
        masks = regions_mod.parse_regions(boxes_json(prompts_for(n, changed)), s, s).masks()  # [R, H, W]
        t0 = time.perf_counter()
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
        return model, pos, neg, time.perf_counter() - t0

    builders = {"plain": lambda changed=False: (model, *[encoder.encode(clip, t)[0] for t in (GLOBAL, NEGATIVE)], 0.0)}
    for n in LAYOUTS:
        builders[f"mixofshow x{n}"] = lambda changed=False, n=n: mixofshow(n, changed)
    builders["mixofshow x2 +2 LoRAs"] = lambda changed=False: mixofshow(2, changed, with_concepts=True)
    for n in LAYOUTS:
        builders[f"core masks x{n}"] = lambda changed=False, n=n: core(n, changed)
    builders["core masks+hooks x2"] = lambda changed=False: core(2, changed, with_hooks=True)
    if args.only:
        wanted = {"plain", *(w.strip() for w in args.only.split(",") if w.strip())}
        unknown = wanted - set(builders)
        if unknown:
            parser.error(f"--only: unknown configuration(s) {sorted(unknown)}; known: {sorted(builders)}")
        builders = {k: v for k, v in builders.items() if k in wanted}

    # Two variants of every configuration: as given, and with region 1's prompt changed (the locality pair).
    # Even repeats sample the first, odd repeats the second; both cost the same (each prompt is one 77-token
    # chunk), so every run counts for the timing and the locality needs no extra runs.
    variants, setup = {}, {}
    for label, build in builders.items():
        pair = [build(changed=False), build(changed=True)]
        variants[label] = [p[:3] for p in pair]
        setup[label] = min(pair[0][3], pair[1][3])  # one-off costs: the faster of the two builds

    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(mdl, positive, negative, steps):
        """(per-step seconds after the first, first step's seconds, its denoised prediction, final latent)."""
        stamps, first = [], []

        def cb(step, x0, x, total):
            stamps.append(time.perf_counter())
            if step == 0:
                first.append(x0.detach().clone())

        t0 = time.perf_counter()
        out = comfy.sample.sample(mdl, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                  callback=cb, disable_pbar=True, seed=0)  # fmt: skip
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], stamps[0] - t0, first[0], out

    step_times = {k: [] for k in variants}
    first_times = {k: [] for k in variants}
    peaks = {k: [] for k in variants}
    outputs: dict[str, dict[int, tuple]] = {k: {} for k in variants}
    for r in range(args.repeats):
        which = r % 2
        for label, pair in variants.items():
            mdl, pos, neg = pair[which]
            with RunMemory() as peak:
                times, first_step, x0, final = run(mdl, pos, neg, args.steps)
            step_times[label].extend(times)
            first_times[label].append(first_step)
            peaks[label].append(peak.growth_mib)
            outputs[label][which] = (x0, final)
            print(f"  repeat {r + 1}/{args.repeats} {label:22} {statistics.median(times) * 1000:9.0f} ms/step"
                  + (" (region 1 changed)" if which else ""))  # fmt: skip

    med = {k: statistics.median(v) for k, v in step_times.items()}
    ratio = {k: med[k] / med["plain"] for k in med}
    ratio_min = {k: min(step_times[k]) / min(step_times["plain"]) for k in med}  # what contention cannot raise
    first_min = {k: min(v) for k, v in first_times.items()}
    peak_run = {k: max(v) for k, v in peaks.items()}
    extra = {k: peak_run[k] - peak_run["plain"] for k in peaks}

    # locality: region 1's prompt changed, every other region (and concept) the same
    leaks: dict[str, tuple[float, float]] = {}
    for label in variants:
        if label == "plain" or len(outputs[label]) < 2:
            continue
        cols, rows = grid(int(label.split(" x")[1].split()[0]))
        inside = torch.zeros(lat, lat)
        inside[: lat // rows, : lat // cols] = 1.0  # region 1: the top-left cell of the tiling
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
            times, first_step, _, _ = run(mdl, pos, neg, args.steps)
            prof.disable()
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")

            def cumulative(file_end, func, stats=stats):
                return sum(v[3] for k, v in stats.stats.items() if k[0].endswith(file_end) and k[2] == func)

            stats.print_stats(r"samplers/|attention\.py", 25)
            profile_text += (
                f"\n--- {label}: first step {first_step:.2f}s (with loading), {len(times)} more step(s) "
                f"{sum(times):.2f}s, under the profiler. In the pack: RegionalAttention.__call__ "
                f"{cumulative('mixofshow/sampling.py', '__call__'):.2f}s (with the layer's own global attention), "
                f"of which regional_attention {cumulative('regional_attention.py', 'regional_attention'):.2f}s and "
                f"the region keys/values {cumulative('mixofshow/sampling.py', 'region_kv'):.2f}s (made in the first "
                f"step, once per run); scoped LoRA runtime "
                f"{cumulative('scoped_lora/runtime.py', '_diffusion_model'):.2f}s\n" + buf.getvalue()
            )

    total = time.perf_counter() - t_start
    print(f"\nMix-of-Show regional benchmark: {s}x{s}, SD1.5 widths (random), CLIP-L (random, {clip_dtype}), "
          f"LoRA rank {args.rank}, {args.steps} steps ({args.steps - 1} timed) x {args.repeats} repeats, "
          f"{comfy.model_management.get_torch_device()}, ComfyUI {session.version}, torch {torch.__version__}")  # fmt: skip
    head = f"{'':24}{'per step':>10}{'vs plain':>10}{'(min)':>8}{'1st step':>10}{'run memory':>12}{'vs plain':>11}"
    head += f"{'setup':>9}"
    print(head + f"{'leak x0':>9}{'leak final':>11}")
    for k in variants:
        lk = leaks.get(k)
        print(f"{k:24}{med[k] * 1000:8.0f}ms{ratio[k]:9.3f}x{ratio_min[k]:7.3f}x{first_min[k]:9.2f}s"
              f"{peak_run[k]:9.0f}MiB{extra[k]:+8.0f}MiB{setup[k]:8.2f}s"
              + (f"{lk[0]:9.3f}{lk[1]:11.3f}" if lk else ""))  # fmt: skip
    print(
        "per step: median of the timed steps; (min): fastest step over plain's fastest, what contention cannot "
        "raise. 1st step: the untimed first step (loading, patching, per-run caches), the fastest repeat. run "
        "memory: the highest RSS during a sampling run over the RSS at its start (after malloc_trim), the largest "
        "of the repeats. setup: the node's (or the core graph's) one-off prompt encoding (the faster of two "
        f"builds), not in the per-step figures; one prompt encodes in {encode_one:.2f}s. leak: region 1's prompt "
        f"changed, mean |change| outside it (margin {MARGIN} latent cell) / inside. Run took {total:.0f}s."
    )
    if profile_text:
        print("\nprofile of one sampling run (cumulative):" + profile_text)

    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    report = {"setup": vars(args), "per_step_seconds": med, "ratio_vs_plain": ratio,
              "ratio_vs_plain_fastest_steps": ratio_min, "first_step_seconds": first_min, "setup_seconds": setup,
              "encode_one_prompt_seconds": encode_one,
              "run_memory_mib": peak_run, "run_memory_extra_vs_plain_mib": extra,
              "leak_first_step": {k: v[0] for k, v in leaks.items()},
              "leak_final_latent": {k: v[1] for k, v in leaks.items()}, "run_seconds": total}  # fmt: skip
    (out / ("mixofshow_partial.json" if args.only else "mixofshow.json")).write_text(json.dumps(report, indent=2))

    figures = Figures()

    def add(metric, table, *labels, **kw):  # a figure only when its configurations ran (see --only)
        if all(k in table for k in labels):
            value = table[labels[0]] if len(labels) == 1 else table[labels[0]] / table[labels[1]]
            figures.add(metric, value, **kw)

    add("mixofshow_step_ratio_2_regions", ratio, "mixofshow x2", target=1.15)
    add("mixofshow_step_ratio_4_regions", ratio, "mixofshow x4")
    add("mixofshow_step_ratio_8_regions", ratio, "mixofshow x8", target=1.35)
    add("mixofshow_step_ratio_2_scoped_concepts", ratio, "mixofshow x2 +2 LoRAs", target=1.3)
    for n in LAYOUTS:
        add(f"core_masks_step_ratio_{n}_regions", ratio, f"core masks x{n}")
    add("core_masks_hooks_step_ratio_2_concepts", ratio, "core masks+hooks x2")
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
    figures.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
