"""LoRA-Composer cost (time and peak memory) as ratios against plain ComfyUI sampling in the same run.

    python benchmarks/bench_lora_composer.py [--quick] [--size 512 | --size 1024x768] [--steps 6] [--repeats 2]
                                             [--only "lora-composer x2"] [--device auto|cpu|cuda] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (860M parameters, seeded random weights; fp16 on CUDA,
fp32 on the CPU), a full-size random CLIP-L. Two concepts, each a kohya-shaped LoRA (rank 16) on every linear
layer of the transformer blocks with a class word, in two boxes side by side (left and right halves with a
margin). Configurations, interleaved per repeat, each a whole sampling run of ``--steps`` steps (euler, CFG
7.5), under ``torch.inference_mode()`` as ComfyUI's executor runs nodes:

* plain: the model alone with the global prompt (one UNet call of 2 rows per step);
* mixofshow x2: the Mix-of-Show Regional node with the two concepts (what LoRA-Composer builds on);
* lora-composer x2: the LoRA-Composer Guider with the official defaults: latent steps up to half of the
  schedule (steps 1..4 of 6 here: 67 % of the steps, more than the official 26 of 50), isolation, and
  re-initialisation (one more positive pass);
* lora-composer x2 every latent step: the same without the stopping rule (the worst case: a latent step at
  every step up to half of the schedule);
* lora-composer x2 isolation only: no latent steps, no re-initialisation;
* lora-composer x2 every layer: the defaults with each concept's whole LoRA inside its box (``lora_layers``
  "every layer") instead of the official cross-attention k/v/out.

Checks, before a run's time counts (benchmarks/harness.py ``check_did_work``): every final latent is finite and
not flat, and every configuration but plain changes plain's inside the first concept's box. The UNet rows each
configuration runs are counted (a DIFFUSION_MODEL wrapper) and printed per step.

Time: whole-run seconds over plain's (the model is loaded before timing; the clock waits for the GPU), the
median over repeats with the spread of the per-repeat ratios (each repeat's run over plain's in that repeat);
the time-ratio figures carry that spread. Memory: the peak during each run over its start (CUDA: allocated
memory; CPU: resident memory, freed memory returned to the system first), and the ratio of (model + that
growth) over plain's — the official code needs 39-56 GB of GPU memory at 1024x768. ``--quick``: 256x256, 2
repeats. The output ends with one JSON figure per line (benchmarks/figures.py; ``--figures FILE`` appends them
there too).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

GLOBAL = "a photo of a man and a dog in a garden, high detail"
NEGATIVE = "blurry, lowres"
BOXES = (
    {"x": 0.05, "y": 0.1, "w": 0.4, "h": 0.8, "label": "man", "prompt": "a photo of a man, standing"},
    {"x": 0.55, "y": 0.2, "w": 0.4, "h": 0.7, "label": "dog", "prompt": "a photo of a dog, sitting"},
)


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def main() -> int:
    t_start = time.perf_counter()
    parser = harness.bench_parser(__doc__, "256x256, 2 repeats", steps=6, repeats=2)
    parser.add_argument("--size", default="512", help="image size: 512 or WIDTHxHEIGHT (e.g. 1024x768)")
    parser.add_argument("--only", default="", help="comma-separated configurations besides plain")
    args = harness.parse_args(parser, quick={"size": "256", "repeats": 2})
    width, height = parse_size(args.size)

    if (session := harness.start_comfy(args, "mc_bench_lc_")) is None:
        return 2

    built = harness.sd15_bench_models(args, session, n_loras=2, rank=16, name="bench_lc")
    model, clip = built.model, built.clip
    stack = built.lora_stack(session, [{"label": box["label"], "class_word": box["label"]} for box in BOXES])
    regions_mod = session.pack_module("samplers.regions")
    regions = regions_mod.parse_regions(json.dumps({"boxes": list(BOXES)}), width, height)
    composer_node, mos_node = map(session.node_class, ("MultiConceptLoRAComposer", "MultiConceptMixOfShowRegional"))

    import comfy.sample
    import comfy.samplers

    import nodes

    box_1 = regions.masks(height // 8, width // 8)[0]  # the first concept's box on the latent grid
    encode = nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, GLOBAL)[0], encode(clip, NEGATIVE)[0]
    latent = torch.zeros(1, 4, height // 8, width // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    steps = args.steps
    sampler = comfy.samplers.sampler_object("euler")
    refined = {}

    def sigmas():
        return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)

    def plain(mdl):
        return lambda: comfy.sample.sample(mdl, noise, steps, 7.5, "euler", "normal", pos, neg, latent,
                                           disable_pbar=True, seed=0)  # fmt: skip

    def mixofshow(mdl):
        def run():
            m, p, n, _ = mos_node.execute(mdl, clip, regions, GLOBAL, NEGATIVE, concepts=stack).result
            g = comfy.samplers.CFGGuider(m)
            g.set_conds(p, n)
            g.set_cfg(7.5)
            return g.sample(noise, latent, sampler, sigmas(), disable_pbar=True, seed=0)

        return run

    def composer(**kw):
        def make(mdl):
            def run():
                node_out = composer_node.execute(mdl, clip, regions, GLOBAL, NEGATIVE, 7.5, concepts=stack, **kw)
                guider = node_out.result[0]
                out = guider.sample(noise, latent, sampler, sigmas(), disable_pbar=True, seed=0)
                refined[tuple(sorted(kw))] = guider.steps_refined
                return out

            return run

        return make

    makers = {
        "plain": plain,
        "mixofshow x2": mixofshow,
        "lora-composer x2": composer(),
        "lora-composer x2 every latent step": composer(stop_when_loss_rises=False),
        "lora-composer x2 isolation only": composer(step_size=0.0, reinitialise=False),
        "lora-composer x2 every layer": composer(lora_layers="every layer"),
    }
    # every configuration's model counts the UNet rows it runs
    configs, counters = harness.counted_configs(makers, model, args.only, parser)

    with torch.inference_mode():
        plain(model)()  # load the model once, untimed
        # interleaved repeats; every configuration but plain must change plain's latent in the first concept's box
        measured = harness.run_interleaved(configs, counters, args.repeats, steps, region=box_1)
    times, growth, rows = measured.times, measured.memory, measured.rows

    model_mib = built.model_mib
    mem_ratio = measured.memory_ratio(model_mib)
    med = {k: times.median(k) for k in configs}
    ratio = {k: times.ratio(k) for k in configs}
    total = time.perf_counter() - t_start
    title = (f"LoRA-Composer benchmark: {width}x{height}, {built.shape}, 2 concept LoRAs (rank 16), {steps} steps "
             f"euler, latent steps taken: {refined.get((), '-')} of {steps} (without the stopping rule "
             f"{refined.get(('stop_when_loss_rises',), '-')}), {args.repeats} repeats, "
             f"{harness.describe_machine(session)}")  # fmt: skip
    harness.print_tables(title, times, {"rows/step": (rows, "10.1f"), "working memory MiB": (growth, "20.0f"),
                                        "memory vs plain": (mem_ratio, "17.2f")})  # fmt: skip
    print(f"model weights {model_mib:.0f} MiB; working memory: the peak during the run over its start, the largest "
          f"of the repeats; memory vs plain = (weights + run's working memory) / plain's. Run took {total:.0f}s.")  # fmt: skip
    report = {"setup": vars(args), "run_seconds": med, "ratio_vs_plain": ratio,
              "ratio_spread": {k: times.ratio_spread(k) for k in configs}, "unet_rows_per_step": rows,
              "working_memory_mib": growth, "memory_ratio": mem_ratio, "total_seconds": total}  # fmt: skip
    harness.write_results("lora_composer_partial.json" if args.only else f"lora_composer_{width}x{height}.json", report)
    figures = harness.Figures(args.device)

    def add_ratio(metric, label, **kw):
        figures.add(metric, ratio[label], spread=times.ratio_spread(label), **kw)

    if "lora-composer x2" in ratio:
        add_ratio("lora_composer_time_ratio_2_concepts", "lora-composer x2", target=2.0)
        figures.add("lora_composer_memory_ratio_2_concepts", mem_ratio["lora-composer x2"], target=1.5)
        figures.add("lora_composer_working_memory", growth["lora-composer x2"], unit="MiB")
    if "mixofshow x2" in ratio:
        add_ratio("lora_composer_base_mixofshow_ratio", "mixofshow x2")
    if "lora-composer x2 every latent step" in ratio:
        add_ratio("lora_composer_time_ratio_every_latent_step", "lora-composer x2 every latent step")
    if "lora-composer x2 isolation only" in ratio:
        add_ratio("lora_composer_isolation_only_ratio", "lora-composer x2 isolation only")
    if "lora-composer x2 every layer" in ratio:
        add_ratio("lora_composer_every_layer_ratio", "lora-composer x2 every layer")
    figures.add_peak_memory("lora_composer_bench_peak_rss")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
