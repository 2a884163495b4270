"""Scoped LoRA (Regional LoRA) cost and locality, as ratios against plain ComfyUI sampling in the same run.

    python benchmarks/bench_scoped_lora.py [--quick] [--size 512] [--steps 4] [--repeats 3] [--rank 16]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. The model is an SD1.5 UNet at full
widths (320/640/1280, 860M parameters) with seeded random weights; prompts are random context tensors (no
text encoder is needed to time the UNet). Each LoRA is kohya-shaped (rank ``--rank``) on every linear layer
of the transformer blocks, as typical character LoRAs are. Configurations, interleaved per repeat:

* plain: the model alone, positive + negative (one UNet call of 2 rows per step);
* scoped x2 / x4: Regional LoRA's runtime with 2 / 4 concepts, each in its own box (one call per step);
* merged x2: the same LoRAs merged into the weights by ComfyUI (the free lunch that bleeds);
* core hooks x2 / x4: the route ComfyUI offers today — CreateHookLora + ConditioningSetProperties (mask,
  hooks) + ConditioningCombine — which runs one pass per hook group per step.

Per-step times come from the sampler's callback (the first step, which includes loading and patching, is
left out). Peak memory: the process's highest resident memory during each configuration (sampled every 5
ms), reported as the extra over plain sampling's highest; CPU allocators keep freed memory, so read it as an
upper bound. Locality (DESIGN.md §6) is the leak of concept 1's change at the
first step, scoped vs merged. ``--quick``: 256x256, 3 steps, 2 repeats. The output ends with one JSON figure
per line (benchmarks/figures.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.figures import Figures  # noqa: E402

SD15_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_head_channels": -1,
}


class PeakRSS:
    """Highest resident set size while the block runs, sampled in a thread."""

    def __init__(self, interval=0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def build_unet(seed: int):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        model.diffusion_model.out[-1].weight.mul_(0.1)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def transformer_linears(patcher) -> list[str]:
    import torch

    out = []
    for name, module in patcher.model.diffusion_model.named_modules():
        if ".transformer_blocks." in name and isinstance(module, torch.nn.Linear):
            out.append(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per configuration")
    parser.add_argument("--rank", type=int, default=16, help="rank of each LoRA")
    parser.add_argument("--quick", action="store_true", help="256x256, 3 steps, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.repeats = 256, 3, 2

    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return 2
    from tests.support.comfy_inprocess import make_session

    session = make_session(comfy_path, Path(tempfile.mkdtemp(prefix="mc_bench_scoped_")))

    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import torch
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLoraModelOnly
    from safetensors.torch import save_file

    from tests.support.lora_factory import make_lora

    stack = session.pack_module("samplers.concept_stack")
    adapters = session.pack_module("samplers.scoped_lora.adapters")
    runtime = session.pack_module("samplers.scoped_lora.runtime")
    locality = session.pack_module("samplers.scoped_lora.locality")

    t0 = time.perf_counter()
    model = build_unet(seed=0)
    print(f"built a random SD1.5 UNet ({sum(p.numel() for p in model.model.parameters()) / 1e6:.0f}M parameters) "
          f"in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    targets = transformer_linears(model)
    loras = [make_lora(model, targets, rank=args.rank, seed=100 + i, scale=0.4) for i in range(4)]
    for i, sd in enumerate(loras):
        save_file(sd, str(session.models_dir / "loras" / f"bench_{i}.safetensors"))

    s, lat = args.size, args.size // 8
    boxes = []
    for i in range(4):  # 2 x 2 grid of boxes with a gap; concepts 1 and 2 side by side
        x0, y0 = (i % 2) * s // 2, (i // 2) * s // 2
        m = torch.zeros(s, s)
        m[y0 + s // 16 : y0 + s // 2 - s // 16, x0 + s // 16 : x0 + s // 2 - s // 16] = 1.0
        boxes.append(m)

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
        conds = []
        for i in range(n):
            hooks = CreateHookLoraModelOnly().create_hook_model_only(f"bench_{i}.safetensors", 1.0)[0]
            conds += ConditioningSetProperties().set_properties(pos, 1.0, "default", mask=boxes[i][None], hooks=hooks)[
                0
            ]
        return conds  # ConditioningCombine is list concatenation

    configs = {
        "plain": (model, pos),
        "scoped x2": (scoped(2), pos),
        "scoped x4": (scoped(4), pos),
        "merged x2": (merged(2), pos),
        "core hooks x2": (model, hooked_positive(2)),
        "core hooks x4": (model, hooked_positive(4)),
    }

    latent = torch.zeros(1, 4, lat, lat)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(mdl, positive, steps, keep_x0=False):
        stamps, first = [], []

        def cb(step, x0, x, total):
            stamps.append(time.perf_counter())
            if keep_x0 and step == 0:
                first.append(x0.clone())

        comfy.sample.sample(mdl, noise, steps, 5.0, "euler", "normal", positive, neg, latent,
                            callback=cb, disable_pbar=True, seed=0)  # fmt: skip
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], first

    step_times = {k: [] for k in configs}
    peaks = {k: [] for k in configs}
    for r in range(args.repeats):
        for label, (mdl, positive) in configs.items():
            with PeakRSS() as peak:
                times, _ = run(mdl, positive, args.steps)
            step_times[label].extend(times)
            peaks[label].append(peak.peak_mib)
            print(f"  repeat {r + 1}/{args.repeats} {label:14} {statistics.median(times) * 1000:9.0f} ms/step")

    med = {k: statistics.median(v) for k, v in step_times.items()}
    ratio = {k: med[k] / med["plain"] for k in med}

    # locality: concept 2's change at the first step, with concept 1 present in both runs
    def first_x0(mdl):
        return run(mdl, pos, 1, keep_x0=True)[1][0]

    base_without = first_x0(scoped(1))
    with_both = first_x0(scoped(2))
    merged_without = first_x0(merged(1))
    merged_both = first_x0(merged(2))
    lat_mask = torch.nn.functional.adaptive_avg_pool2d(boxes[1][None, None], (lat, lat))[0, 0]
    leak_scoped = locality.leak(with_both - base_without, lat_mask, 1)
    leak_merged = locality.leak(merged_both - merged_without, lat_mask, 1)

    print(f"\nScoped LoRA benchmark: {args.size}x{args.size}, SD1.5 widths (random), rank {args.rank}, "
          f"{args.steps} steps ({args.steps - 1} timed) x {args.repeats} repeats, "
          f"{comfy.model_management.get_torch_device()}, ComfyUI {session.version}, torch {torch.__version__}")  # fmt: skip
    extra = {k: max(v) - max(peaks["plain"]) for k, v in peaks.items()}
    print(f"{'':16}{'per step':>12}{'vs plain':>10}{'peak vs plain':>15}")
    for k in configs:
        print(f"{k:16}{med[k] * 1000:10.0f}ms{ratio[k]:9.3f}x{extra[k]:+12.0f}MiB")
    print(f"locality (leak of concept 2 at the first step): scoped {leak_scoped:.3f}, merged {leak_merged:.3f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    report = {"setup": vars(args), "per_step_seconds": med, "ratio_vs_plain": ratio,
              "peak_mib": {k: max(v) for k, v in peaks.items()}, "peak_extra_vs_plain_mib": extra,
              "leak": {"scoped": leak_scoped, "merged": leak_merged}}  # fmt: skip
    (out / "scoped_lora.json").write_text(json.dumps(report, indent=2))

    figures = Figures()
    figures.add("scoped_lora_step_ratio_2_concepts", ratio["scoped x2"], target=1.15)
    figures.add("scoped_lora_step_ratio_4_concepts", ratio["scoped x4"], target=1.3)
    figures.add("merged_lora_step_ratio_2_concepts", ratio["merged x2"])
    figures.add("core_hooks_step_ratio_2_concepts", ratio["core hooks x2"])
    figures.add("core_hooks_step_ratio_4_concepts", ratio["core hooks x4"])
    figures.add(
        "core_hooks_over_scoped_2_concepts", med["core hooks x2"] / med["scoped x2"], target=1.0, better="higher"
    )
    figures.add(
        "core_hooks_over_scoped_4_concepts", med["core hooks x4"] / med["scoped x4"], target=1.5, better="higher"
    )
    figures.add("scoped_lora_leak_first_step", leak_scoped)
    figures.add("merged_lora_leak_first_step", leak_merged)
    for k in ("scoped x2", "scoped x4", "core hooks x4"):
        figures.add(f"peak_rss_over_plain_{k.replace(' ', '_')}", extra[k], unit="MiB")
    figures.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
