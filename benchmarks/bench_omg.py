"""OMG (both stages) cost, as ratios against plain ComfyUI sampling of the same model and steps in the same run.

    python benchmarks/bench_omg.py [--quick] [--size 512] [--steps 6] [--start 0.34] [--repeats 2] [--rank 16]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. The model is an SD1.5 UNet at full widths
(860M parameters, seeded random weights; benchmarks/bench_scoped_lora.py builds it), the text encoder a
full-size random CLIP-L. Each concept is a kohya-shaped LoRA (rank ``--rank``) on every linear layer of the
transformer blocks, with a box (the boxes tile a 2x2 grid with gaps; concepts 1 and 2 side by side).
Configurations, interleaved per repeat, each a whole sampling of ``--steps`` steps:

* plain: the model alone with the scene prompt (positive + negative, one call per step);
* omg x2 / x4: stage 1 (the scene, layout recorded) + stage 2 from the start step (the scene and every
  concept, each with CFG, in one batched call per step, blended by the box masks);
* omg x2 crop: the same with each concept predicted on its box plus a margin only;
* core hooks x2: what ComfyUI users build today for the same picture: the scene prompt combined with one
  cond per concept carrying its LoRA (CreateHookLoraModelOnly + ConditioningSetProperties with the box as
  mask), sampled by the stock KSampler (one pass per hook group per step), no stage 1.

Ratios are whole-run times over plain's (the model is loaded before timing). The method's floor on a CPU,
where batch rows cost linearly, is 1 + (1 + N) x (blended share of the steps): 3.0 at 2 concepts blending
from a third in; the official code's is about 5.4. Also reported: the layout store's size (the replay
memory), the per-concept growth, and what the crop changes: mean |crop - exact| over mean |exact - stage 1|
in the final latent inside the masks. ``--quick``: 256x256, 2 repeats. The output ends with one JSON figure
per line (benchmarks/figures.py).
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

from benchmarks.bench_scoped_lora import build_unet, transformer_linears  # noqa: E402
from benchmarks.figures import Figures  # noqa: E402

SCENE = "a photo of a man, a woman, a dog and a cat in a garden"
NEGATIVE = "blurry, lowres"
CLASSES = ("man", "woman", "dog", "cat")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    parser.add_argument("--steps", type=int, default=6, help="sampling steps of every run")
    parser.add_argument("--start", type=float, default=0.34, help="blend start, a fraction of the steps")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions per configuration")
    parser.add_argument("--rank", type=int, default=16, help="rank of each concept LoRA")
    parser.add_argument("--quick", action="store_true", help="256x256, 2 repeats")
    parser.add_argument("--only", default="", help='comma-separated configurations besides plain, e.g. "omg x2,omg x2 crop"'
                        " (written to results/omg_partial.json)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 256, 2
    t_start = time.perf_counter()

    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return 2
    from tests.support.comfy_inprocess import make_session

    session = make_session(comfy_path, Path(tempfile.mkdtemp(prefix="mc_bench_omg_")))

    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import torch
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLoraModelOnly
    from safetensors.torch import save_file

    import nodes
    from tests.support.lora_factory import make_lora
    from tests.support.tiny_clip import build_tiny_clip

    stack_mod = session.pack_module("samplers.concept_stack")
    layout = session.pack_module("samplers.omg.layout")
    stages = session.pack_module("samplers.omg.stages")
    guider_mod = session.pack_module("samplers.omg.guider")

    t0 = time.perf_counter()
    model = build_unet(seed=0)
    print(f"built a random SD1.5 UNet in {time.perf_counter() - t0:.0f}s")
    clip = build_tiny_clip("sd15", seed=0, layers=None, mlp=None)
    targets = transformer_linears(model)
    loras = [make_lora(model, targets, rank=args.rank, seed=100 + i, scale=0.4) for i in range(4)]
    for i, sd in enumerate(loras):
        save_file(sd, str(session.models_dir / "loras" / f"bench_omg_{i}.safetensors"))

    s, lat = args.size, args.size // 8
    steps = args.steps
    start = min(max(1, round(args.start * steps)), steps - 1)
    masks = torch.zeros(4, s, s)
    for i in range(4):  # 2 x 2 grid of boxes with a gap
        x0, y0 = (i % 2) * s // 2, (i // 2) * s // 2
        masks[i, y0 + s // 16 : y0 + s // 2 - s // 16, x0 + s // 16 : x0 + s // 2 - s // 16] = 1.0

    encode = nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, SCENE)[0], encode(clip, NEGATIVE)[0]
    stack = stack_mod.ConceptStack()
    concept_conds = []
    for i in range(4):
        stack = stack.with_concept(
            stack_mod.Concept(
                uid="",
                kind="lora",
                source=f"bench_omg_{i}.safetensors",
                words=(),
                class_word=CLASSES[i],
                adapter=stack_mod.LoRAFile(f"bench_omg_{i}", loras[i]),
            )  # fmt: skip
        )
        concept_conds.append(
            (
                stages.tag_rows(encode(clip, f"a photo of a {CLASSES[i]} in a garden, detailed")[0], i),
                stages.tag_rows(neg, i),
            )
        )
    latent = {"samples": torch.zeros(1, 4, lat, lat)}
    noise = comfy.sample.prepare_noise(latent["samples"], 0)
    sampler = comfy.samplers.sampler_object("euler")
    store_bytes = {}

    def plain():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", pos, neg, latent["samples"],
                                   disable_pbar=True, seed=0)  # fmt: skip

    def omg(n, crop=False):
        def run():
            store = layout.LayoutStore(start, steps, (lat, lat), 0, 4 * 2**30)
            stages.run_stage1(model, pos, neg, latent, 0, steps, 5.0, "euler", "normal", store, disable_pbar=True)
            sub = stack_mod.ConceptStack()
            for c in list(stack)[:n]:
                sub = sub.with_concept(c)
            m2 = stages.stage2_model(model, sub, store, "bench")
            g = guider_mod.OMGGuider(m2, store, masks[:n], "front_to_back", crop_margin=4 if crop else None)
            g.set_cfg(5.0)
            g.set_omg_conds(pos, neg, concept_conds[:n])
            out = g.sample(noise, latent["samples"], sampler, store.sigmas.float(), disable_pbar=True, seed=0)
            store_bytes[n] = store.bytes
            result = (out, store.final)
            store.free()
            return result

        return run

    hooks = [CreateHookLoraModelOnly().create_hook_model_only(f"bench_omg_{i}.safetensors", 1.0)[0] for i in range(2)]

    def core_hooks():
        p = pos
        for i in range(2):
            c = encode(clip, f"a photo of a {CLASSES[i]} in a garden, detailed")[0]
            c = ConditioningSetProperties().set_properties(c, 1.0, "default", mask=masks[i][None], hooks=hooks[i])[0]
            p = nodes.ConditioningCombine().combine(p, c)[0]
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", p, neg, latent["samples"],
                                   disable_pbar=True, seed=0)  # fmt: skip

    configs = {
        "plain": plain,
        "omg x2": omg(2),
        "omg x4": omg(4),
        "omg x2 crop": omg(2, crop=True),
        "core hooks x2": core_hooks,
    }
    if args.only:
        keep = {k.strip() for k in args.only.split(",")}
        unknown = keep - set(configs)
        if unknown:
            print(f"unknown configurations {sorted(unknown)}; choose from {sorted(configs)}")
            return 2
        configs = {k: v for k, v in configs.items() if k == "plain" or k in keep}
    plain()  # load the model once, untimed
    times = {k: [] for k in configs}
    outputs = {}
    for r in range(args.repeats):
        for label, fn in configs.items():
            t0 = time.perf_counter()
            outputs[label] = fn()
            times[label].append(time.perf_counter() - t0)
            print(f"  repeat {r + 1}/{args.repeats} {label:16} {times[label][-1]:8.1f}s")

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: med[k] / med["plain"] for k in med}
    ratio_min = {k: min(times[k]) / min(times["plain"]) for k in med}
    crop_change = float("nan")
    if "omg x2" in outputs and "omg x2 crop" in outputs:
        exact, first = outputs["omg x2"]
        cropped, _ = outputs["omg x2 crop"]
        inside = torch.nn.functional.adaptive_avg_pool2d(masks[:2].amax(0)[None, None], (lat, lat))[0, 0] > 0.5
        crop_change = float((cropped - exact).abs().mean(dim=(0, 1))[inside].mean()) / float(
            (exact - first).abs().mean(dim=(0, 1))[inside].mean()
        )
    floor2 = 1 + 3 * (steps - start) / steps
    total = time.perf_counter() - t_start
    print(f"\nOMG benchmark: {s}x{s}, SD1.5 widths (random), CLIP-L (random), LoRA rank {args.rank}, {steps} steps, "
          f"blending from step {start + 1} ({steps - start} blended), {args.repeats} repeats, "
          f"{comfy.model_management.get_torch_device()}, ComfyUI {session.version}, torch {torch.__version__}")  # fmt: skip
    print(f"{'':18}{'run':>10}{'vs plain':>10}{'(min)':>8}")
    for k in configs:
        print(f"{k:18}{med[k]:9.1f}s{ratio[k]:9.2f}x{ratio_min[k]:7.2f}x")
    growth = (ratio["omg x4"] - ratio["omg x2"]) / 2 if {"omg x2", "omg x4"} <= set(ratio) else float("nan")
    print(
        f"floor at 2 concepts on a CPU: {floor2:.2f}x. layout store: {store_bytes.get(2, 0) / 2**20:.1f} MiB "
        f"({(store_bytes.get(2, 0) / max(1, steps - start)) / 2**20:.1f} MiB per blended step). per extra concept: "
        f"+{growth:.2f}x. crop vs exact: the crop changes the final latent inside "
        f"the masks by {crop_change:.2f} of what the concepts change there. Run took {total:.0f}s."
    )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    report = {"setup": vars(args), "run_seconds": med, "ratio_vs_plain": ratio, "ratio_vs_plain_fastest": ratio_min,
              "layout_store_mib": store_bytes.get(2, 0) / 2**20, "crop_change": crop_change, "total_seconds": total}  # fmt: skip
    (out / ("omg_partial.json" if args.only else "omg.json")).write_text(json.dumps(report, indent=2))
    figures = Figures()
    for key, metric, target in (("omg x2", "omg_ratio_2_concepts", 3.2), ("omg x4", "omg_ratio_4_concepts", None),
                                ("omg x2 crop", "omg_ratio_2_concepts_crop", 2.2),
                                ("core hooks x2", "core_hooks_ratio_2_concepts", None)):  # fmt: skip
        if key in ratio:
            figures.add(metric, ratio[key], target=target)
    if growth == growth:
        figures.add("omg_growth_per_concept", growth)
    if crop_change == crop_change:
        figures.add("omg_crop_change", crop_change)
    figures.add("omg_layout_store", store_bytes.get(2, 0) / 2**20, unit="MiB")
    figures.add_peak_memory("omg_bench_peak_rss")
    figures.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
