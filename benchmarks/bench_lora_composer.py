"""LoRA-Composer cost (time and peak memory) as ratios against plain ComfyUI sampling in the same run.

    python benchmarks/bench_lora_composer.py [--quick] [--size 512 | --size 1024x768] [--steps 6] [--repeats 2]
                                             [--only "lora-composer x2"]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. The model is an SD1.5 UNet at full widths
(860M parameters, seeded random weights; benchmarks/bench_scoped_lora.py builds it), the text encoder a
full-size random CLIP-L. Two concepts, each a kohya-shaped LoRA (rank 16) on every linear layer of the
transformer blocks with a class word, in two boxes side by side (left and right halves with a margin).
Configurations, interleaved per repeat, each a whole sampling run of ``--steps`` steps (euler, CFG 7.5),
under ``torch.inference_mode()`` as ComfyUI's executor runs nodes:

* plain: the model alone with the global prompt (one UNet call of 2 rows per step);
* mixofshow x2: the Mix-of-Show Regional node with the two concepts (what LoRA-Composer builds on);
* lora-composer x2: the LoRA-Composer Guider with the official defaults: latent steps up to half of the
  schedule (steps 1..4 of 6 here: 67 % of the steps, more than the official 26 of 50), isolation, and
  re-initialisation (one more positive pass);
* lora-composer x2 every latent step: the same without the stopping rule (the worst case: a latent step at
  every step up to half of the schedule);
* lora-composer x2 isolation only: no latent steps, no re-initialisation.

Time: whole-run seconds over plain's (the model is loaded before timing). Peak memory: the highest resident
memory during each run over the memory at its start (freed memory returned to the system first), and the
ratio of (model + that growth) over plain's — the official code needs 39-56 GB of GPU memory at 1024x768.
``--quick``: 256x256, 2 repeats. The output ends with one JSON figure per line (benchmarks/figures.py).
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

from benchmarks.bench_mixofshow import RunMemory  # noqa: E402
from benchmarks.bench_scoped_lora import build_unet, transformer_linears  # noqa: E402
from benchmarks.figures import Figures  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512", help="image size: 512 or WIDTHxHEIGHT (e.g. 1024x768)")
    parser.add_argument("--steps", type=int, default=6, help="sampling steps of every run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions per configuration")
    parser.add_argument("--quick", action="store_true", help="256x256, 2 repeats")
    parser.add_argument("--only", default="", help="comma-separated configurations besides plain")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = "256", 2
    width, height = parse_size(args.size)
    t_start = time.perf_counter()

    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return 2
    from tests.support.comfy_inprocess import make_session

    session = make_session(comfy_path, Path(tempfile.mkdtemp(prefix="mc_bench_lc_")))

    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import torch
    from safetensors.torch import save_file

    import nodes
    from tests.support.lora_factory import make_lora
    from tests.support.tiny_clip import build_tiny_clip

    stack_mod = session.pack_module("samplers.concept_stack")
    regions_mod = session.pack_module("samplers.regions")
    composer_node = session.node_class("MultiConceptLoRAComposer")
    mos_node = session.node_class("MultiConceptMixOfShowRegional")

    model = build_unet(seed=0)
    model_mib = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2**20
    clip = build_tiny_clip("sd15", seed=0, layers=None, mlp=None)
    loras = [make_lora(model, transformer_linears(model), rank=16, seed=100 + i, scale=0.4) for i in range(2)]
    stack = stack_mod.ConceptStack()
    for i, box in enumerate(BOXES):
        save_file(loras[i], str(session.models_dir / "loras" / f"bench_lc_{i}.safetensors"))
        stack = stack.with_concept(
            stack_mod.Concept(
                uid="",
                kind="lora",
                source=f"bench_lc_{i}.safetensors",
                words=(),
                label=box["label"],
                class_word=box["label"],
                adapter=stack_mod.LoRAFile(f"bench_lc_{i}", loras[i]),
            )  # fmt: skip
        )
    regions = regions_mod.parse_regions(json.dumps({"boxes": list(BOXES)}), width, height)
    encode = nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, GLOBAL)[0], encode(clip, NEGATIVE)[0]
    latent = torch.zeros(1, 4, height // 8, width // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    steps = args.steps
    sampler = comfy.samplers.sampler_object("euler")
    refined = {}

    def plain():
        return comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", pos, neg, latent, disable_pbar=True,
                                   seed=0)  # fmt: skip

    def sigmas():
        return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)

    def mixofshow():
        m, p, n, _ = mos_node.execute(model, clip, regions, GLOBAL, NEGATIVE, concepts=stack).result
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(p, n)
        g.set_cfg(7.5)
        return g.sample(noise, latent, sampler, sigmas(), disable_pbar=True, seed=0)

    def composer(**kw):
        def run():
            guider = composer_node.execute(model, clip, regions, GLOBAL, NEGATIVE, 7.5, concepts=stack, **kw).result[0]
            out = guider.sample(noise, latent, sampler, sigmas(), disable_pbar=True, seed=0)
            refined[tuple(sorted(kw))] = guider.steps_refined
            return out

        return run

    configs = {
        "plain": plain,
        "mixofshow x2": mixofshow,
        "lora-composer x2": composer(),
        "lora-composer x2 every latent step": composer(stop_when_loss_rises=False),
        "lora-composer x2 isolation only": composer(step_size=0.0, reinitialise=False),
    }
    if args.only:
        keep = {k.strip() for k in args.only.split(",")}
        unknown = keep - set(configs)
        if unknown:
            print(f"unknown configurations {sorted(unknown)}; choose from {sorted(configs)}")
            return 2
        configs = {k: v for k, v in configs.items() if k == "plain" or k in keep}
    with torch.inference_mode():
        plain()  # load the model once, untimed
        times = {k: [] for k in configs}
        growth = {k: 0.0 for k in configs}
        for r in range(args.repeats):
            for label, fn in configs.items():
                with RunMemory() as mem:
                    t0 = time.perf_counter()
                    out = fn()
                    times[label].append(time.perf_counter() - t0)
                growth[label] = max(growth[label], mem.growth_mib)
                assert torch.isfinite(out).all(), label
                print(f"  repeat {r + 1}/{args.repeats} {label:32} {times[label][-1]:8.1f}s  +{mem.growth_mib:7.0f} MiB",
                      flush=True)  # fmt: skip

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: med[k] / med["plain"] for k in med}
    mem_ratio = {k: (model_mib + growth[k]) / (model_mib + growth["plain"]) for k in med}
    total = time.perf_counter() - t_start
    print(f"\nLoRA-Composer benchmark: {width}x{height}, SD1.5 widths (random), CLIP-L (random), 2 concept LoRAs "
          f"(rank 16), {steps} steps euler, latent steps taken: {refined.get((), '-')} of {steps} (without the stopping rule "
          f"{refined.get(('stop_when_loss_rises',), '-')}), "
          f"{args.repeats} repeats, {comfy.model_management.get_torch_device()}, ComfyUI {session.version}, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{'':34}{'run':>9}{'vs plain':>10}{'working memory':>16}{'memory vs plain':>17}")
    for k in configs:
        print(f"{k:34}{med[k]:8.1f}s{ratio[k]:9.2f}x{growth[k]:13.0f} MiB{mem_ratio[k]:15.2f}x")
    print(f"model weights {model_mib:.0f} MiB; memory ratio = (weights + run's working memory) / plain's. "
          f"Run took {total:.0f}s.")  # fmt: skip
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    name = "lora_composer_partial.json" if args.only else f"lora_composer_{width}x{height}.json"
    (out / name).write_text(json.dumps({"setup": vars(args), "run_seconds": med, "ratio_vs_plain": ratio,
                                        "working_memory_mib": growth, "memory_ratio": mem_ratio,
                                        "total_seconds": total}, indent=2))  # fmt: skip
    figures = Figures()
    if "lora-composer x2" in ratio:
        figures.add("lora_composer_time_ratio_2_concepts", ratio["lora-composer x2"], target=2.0)
        figures.add("lora_composer_memory_ratio_2_concepts", mem_ratio["lora-composer x2"], target=1.5)
        figures.add("lora_composer_working_memory", growth["lora-composer x2"], unit="MiB")
    if "mixofshow x2" in ratio:
        figures.add("lora_composer_base_mixofshow_ratio", ratio["mixofshow x2"])
    if "lora-composer x2 every latent step" in ratio:
        figures.add("lora_composer_time_ratio_every_latent_step", ratio["lora-composer x2 every latent step"])
    if "lora-composer x2 isolation only" in ratio:
        figures.add("lora_composer_isolation_only_ratio", ratio["lora-composer x2 isolation only"])
    figures.add_peak_memory("lora_composer_bench_peak_rss")
    figures.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
