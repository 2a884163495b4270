"""OMG (both stages) cost, as ratios against plain ComfyUI sampling of the same model and steps in the same run.

    python benchmarks/bench_omg.py [--quick] [--size 512] [--steps 6] [--start 0.34] [--repeats 2] [--rank 16]
                                   [--only "omg x2,omg x2 crop"] [--device auto|cpu|cuda] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (860M parameters, seeded random weights; fp16 on CUDA,
fp32 on the CPU), a full-size random CLIP-L. Each concept is a kohya-shaped LoRA (rank ``--rank``) on every
linear layer of the transformer blocks, with a box (the boxes tile a 2x2 grid with gaps; concepts 1 and 2 side
by side). Configurations, interleaved per repeat, each a whole sampling of ``--steps`` steps:

* plain: the model alone with the scene prompt (positive + negative, one call per step);
* omg x2 / x4: stage 1 (the scene, layout recorded) + stage 2 from the start step (the scene and every
  concept, each with CFG, in one batched call per step, blended by the box masks);
* omg x2 crop: the same with each concept predicted on its box plus a margin only;
* core hooks x2: what ComfyUI users build today for the same picture: the scene prompt combined with one
  cond per concept carrying its LoRA (CreateHookLoraModelOnly + ConditioningSetProperties with the box as
  mask), sampled by the stock KSampler (one pass per hook group per step), no stage 1.

Checks, before a run's time counts (benchmarks/harness.py ``check_did_work``): every final latent is finite and
not flat, and every configuration but plain changes plain's final latent inside concept 1's box. The UNet rows
are counted for every configuration (a DIFFUSION_MODEL wrapper on the model both OMG stages run) and printed
per step; core hooks must run at least one row per cond (scene, 2 concepts, negative: 4) or the benchmark
stops.

Ratios are whole-run times over plain's (the model is loaded before timing; the clock waits for the GPU), the
median over repeats with the spread of the per-repeat ratios (each repeat's run over plain's in that repeat);
the ratio figures carry that spread. The method's floor on a CPU, where batch rows cost linearly, is 1 + (1 + N)
x (blended share of the steps): 3.0 at 2 concepts blending from a third in; the official code's is about 5.4.
Also reported: the layout store's size (the replay memory), the per-concept growth, each run's peak memory over
its start (CUDA: allocated; CPU: resident), and what the crop changes: mean |crop - exact| over mean |exact -
stage 1| in the final latent inside the masks. ``--quick``: 256x256, 2 repeats. The output ends with one JSON
figure per line (benchmarks/figures.py; ``--figures FILE`` appends them there too).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from benchmarks.sdxl_layout import START, STEPS, record_sdxl  # noqa: E402

SCENE = "a photo of a man, a woman, a dog and a cat in a garden"
NEGATIVE = "blurry, lowres"
CLASSES = ("man", "woman", "dog", "cat")


def main() -> int:
    t_start = time.perf_counter()
    parser = harness.bench_parser(__doc__, "256x256, 2 repeats", size=512, steps=6, repeats=2, rank=16)
    parser.add_argument("--start", type=float, default=0.34, help="blend start, a fraction of the steps")
    parser.add_argument("--only", default="", help='comma-separated configurations besides plain, e.g. "omg x2,omg x2 crop"'
                        " (written to results/omg_partial.json)")  # fmt: skip
    args = harness.parse_args(parser, quick={"size": 256, "repeats": 2})

    if (session := harness.start_comfy(args, "mc_bench_omg_")) is None:
        return 2

    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLoraModelOnly

    import nodes

    layout, stages, guider_mod = (session.pack_module(f"samplers.omg.{m}") for m in ("layout", "stages", "guider"))
    built = harness.sd15_bench_models(args, session, n_loras=4, rank=args.rank, name="bench_omg")
    model, clip = built.model, built.clip
    stack = built.lora_stack(session, [{"class_word": c} for c in CLASSES])

    s, lat = args.size, args.size // 8
    steps = args.steps
    start = min(max(1, round(args.start * steps)), steps - 1)
    masks = torch.zeros(4, s, s)
    for i in range(4):  # 2 x 2 grid of boxes with a gap
        x0, y0 = (i % 2) * s // 2, (i // 2) * s // 2
        masks[i, y0 + s // 16 : y0 + s // 2 - s // 16, x0 + s // 16 : x0 + s // 2 - s // 16] = 1.0
    lat_masks = harness.to_latent(masks, lat)  # [4, lat, lat]

    encode = nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, SCENE)[0], encode(clip, NEGATIVE)[0]
    concept_prompts = [f"a photo of a {c} in a garden, detailed" for c in CLASSES]
    concept_conds = [
        (stages.tag_rows(encode(clip, p)[0], i), stages.tag_rows(neg, i)) for i, p in enumerate(concept_prompts)
    ]
    latent = {"samples": torch.zeros(1, 4, lat, lat)}
    noise = comfy.sample.prepare_noise(latent["samples"], 0)
    sampler = comfy.samplers.sampler_object("euler")
    store_bytes = {}

    def sample(mdl, positive):
        return comfy.sample.sample(mdl, noise, steps, 5.0, "euler", "normal", positive, neg, latent["samples"],
                                   disable_pbar=True, seed=0)  # fmt: skip

    def plain(mdl):
        return lambda: (sample(mdl, pos), None)

    def first_concepts(n):
        sub = type(stack)()
        for c in list(stack)[:n]:
            sub = sub.with_concept(c)
        return sub

    def omg(n, crop=False):
        def run(mdl):
            store = layout.LayoutStore(start, steps, (lat, lat), 0, 4 * 2**30)
            stages.run_stage1(mdl, pos, neg, latent, 0, steps, 5.0, "euler", "normal", store, disable_pbar=True)
            m2 = stages.stage2_model(mdl, first_concepts(n), store, "bench")
            g = guider_mod.OMGGuider(m2, store, masks[:n], "front_to_back", crop_margin=4 if crop else None)
            g.set_cfg(5.0)
            g.set_omg_conds(pos, neg, concept_conds[:n])
            out = g.sample(noise, latent["samples"], sampler, store.sigmas.float(), disable_pbar=True, seed=0)
            store_bytes[n] = store.bytes
            result = (out, store.final.detach().float().cpu())
            store.free()
            return result

        return lambda mdl: lambda: run(mdl)

    hooks = [CreateHookLoraModelOnly().create_hook_model_only(f, 1.0)[0] for f in built.files[:2]]

    def core_hooks(mdl):
        p = pos
        for i in range(2):
            c = encode(clip, concept_prompts[i])[0]
            c = ConditioningSetProperties().set_properties(c, 1.0, "default", mask=masks[i][None], hooks=hooks[i])[0]
            p = nodes.ConditioningCombine().combine(p, c)[0]
        return lambda: (sample(mdl, p), None)

    makers = {
        "plain": plain,
        "omg x2": omg(2),
        "omg x4": omg(4),
        "omg x2 crop": omg(2, crop=True),
        "core hooks x2": core_hooks,
    }
    # every configuration's model counts the UNet rows it runs
    configs, counters = harness.counted_configs(makers, model, args.only, parser)

    sample(model, pos)  # load the model once, untimed
    # interleaved repeats; every configuration but plain must change plain's final latent in concept 1's box
    measured = harness.run_interleaved(configs, counters, args.repeats, steps, region=lat_masks[0],
                                       output=lambda result: result[0])  # fmt: skip
    times, peaks, rows = measured.times, measured.memory, measured.rows
    outputs = {k: (v[0].detach().float().cpu(), v[1]) for k, v in measured.results.items()}
    if "core hooks x2" in rows and rows["core hooks x2"] < 4:  # scene, 2 hooked concepts, negative
        raise harness.BenchmarkError(
            f"core hooks x2: {rows['core hooks x2']:.1f} UNet rows per step, fewer than its 4 conds"
        )

    med = {k: times.median(k) for k in configs}
    ratio = {k: times.ratio(k) for k in configs}
    crop_change = float("nan")
    if "omg x2" in outputs and "omg x2 crop" in outputs:
        exact, first = outputs["omg x2"]
        cropped, _ = outputs["omg x2 crop"]
        inside = lat_masks[:2].amax(0) > 0.5
        crop_change = float((cropped - exact).abs().mean(dim=(0, 1))[inside].mean()) / float(
            (exact - first).abs().mean(dim=(0, 1))[inside].mean()
        )
    floor2 = 1 + 3 * (steps - start) / steps
    total = time.perf_counter() - t_start
    title = (f"OMG benchmark: {s}x{s}, {built.shape}, LoRA rank {args.rank}, {steps} steps, blending from step "
             f"{start + 1} ({steps - start} blended), {args.repeats} repeats, {harness.describe_machine(session)}")  # fmt: skip
    harness.print_tables(title, times, {"rows/step": (rows, "10.1f"), "run memory MiB": (peaks, "16.0f")})
    growth = (ratio["omg x4"] - ratio["omg x2"]) / 2 if {"omg x2", "omg x4"} <= set(ratio) else float("nan")
    print(
        "rows/step: latent rows the UNet ran per step (both stages); run memory: the peak during the run over its "
        "start, the largest of the repeats.\n"
        f"floor at 2 concepts on a CPU: {floor2:.2f}x. layout store: {store_bytes.get(2, 0) / 2**20:.1f} MiB "
        f"({(store_bytes.get(2, 0) / max(1, steps - start)) / 2**20:.1f} MiB per blended step). per extra concept: "
        f"+{growth:.2f}x. crop vs exact: the crop changes the final latent inside "
        f"the masks by {crop_change:.2f} of what the concepts change there. Run took {total:.0f}s."
    )
    report = {"setup": vars(args), "run_seconds": med, "ratio_vs_plain": ratio,
              "ratio_spread": {k: times.ratio_spread(k) for k in configs}, "unet_rows_per_step": rows,
              "run_memory_mib": peaks, "layout_store_mib": store_bytes.get(2, 0) / 2**20, "crop_change": crop_change,
              "total_seconds": total}  # fmt: skip
    harness.write_results("omg_partial.json" if args.only else "omg.json", report)
    figures = harness.Figures(args.device)
    for key, metric, target in (("omg x2", "omg_ratio_2_concepts", 3.2), ("omg x4", "omg_ratio_4_concepts", None),
                                ("omg x2 crop", "omg_ratio_2_concepts_crop", 2.2),
                                ("core hooks x2", "core_hooks_ratio_2_concepts", None)):  # fmt: skip
        if key in ratio:
            figures.add(metric, ratio[key], target=target, spread=times.ratio_spread(key))
    if growth == growth:
        figures.add("omg_growth_per_concept", growth)
    if crop_change == crop_change:
        figures.add("omg_crop_change", crop_change)
    figures.add("omg_layout_store", store_bytes.get(2, 0) / 2**20, unit="MiB")
    # the official SDXL run's replay at 1024x1024, fp16, at the default budget (meta tensors: no memory used)
    sdxl = record_sdxl(layout.LayoutStore, layout.DEFAULT_BUDGET_MB)
    figures.add("omg_sdxl_layout_store", sdxl.needed / 2**20, unit="MiB")
    figures.add("omg_sdxl_replayed_steps", len({k[0] for k in sdxl.cross}), target=STEPS - START, better="higher")
    figures.add_peak_memory("omg_bench_peak_rss")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
