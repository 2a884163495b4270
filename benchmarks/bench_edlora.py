"""ED-LoRA cost as ratios against plain ComfyUI, measured in one process run.

    python benchmarks/bench_edlora.py [--quick] [--size 128] [--steps 8] [--repeats 5]

``--quick``: 64x64, 4 steps, 3 repeats (about a minute on 2 cores). The output ends with one JSON figure
per line (benchmarks/figures.py).

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. Uses the tests' random-weight SD1.5-shaped
checkpoint, so absolute numbers mean little; the ratios are what to read:

* per-step sampling cost with 1 and 3 ED-LoRA concepts in the prompt vs the same prompt without concepts
  on the plain checkpoint (target <= 1.05x). Steps are timed from the sampler's per-step callback, so the
  one-off LoRA weight merge at model load is not counted as a per-step cost (it is reported separately);
* prompt-encoding cost of a prompt naming 1 / 3 concepts vs the same prompt with plain words (the 16
  layer-wise encodings are batched into one text-encoder pass and made once per prompt, not per step).
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

from benchmarks.figures import Figures  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (square)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per configuration")
    parser.add_argument("--quick", action="store_true", help="small sizes: 64x64, 4 steps, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.repeats = 64, 4, 3

    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return 2
    base = Path(tempfile.mkdtemp(prefix="mc_bench_"))
    from tests.support.comfy_inprocess import make_session
    from tests.support.edlora_factory import official_edlora
    from tests.support.tiny_sd15 import build_tiny_sd15

    session = make_session(comfy_path, base)
    ckpt = session.models_dir / "checkpoints" / "bench_sd15.safetensors"
    build_tiny_sd15(ckpt)

    import comfy.model_management
    import comfy.sample
    import torch

    import nodes

    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[:3]
    loader = session.node_class("MultiConceptEDLoRALoader")
    words = [("<ann1>", "<ann2>"), ("<bob1>", "<bob2>"), ("<rex1>", "<rex2>")]
    chains = {0: (model, clip)}
    m, c = model, clip
    for i, w in enumerate(words):
        name = f"bench_{i}.pth"
        torch.save(official_edlora(words=w, seed=100 + i), session.models_dir / "loras" / name)
        m, c, _, _ = loader.execute(m, c, name, 0.7, 0.7).result
        chains[i + 1] = (m, c)

    plain_text = "a photo of a woman, a man and a dog in a garden, best quality"
    texts = {
        0: plain_text,
        1: "a photo of a <ann1> <ann2>, a man and a dog in a garden, best quality",
        3: "a photo of a <ann1> <ann2>, a <bob1> <bob2> and a <rex1> <rex2> in a garden, best quality",
    }
    configs = {"plain": (0, 0), "1 concept": (1, 1), "3 concepts": (3, 3)}
    encode = nodes.CLIPTextEncode().encode

    # -- prompt encoding ------------------------------------------------------------------------
    enc_times = {k: [] for k in configs}
    for _ in range(args.repeats):
        for label, (chain, text_key) in configs.items():
            cl = chains[chain][1]
            encode(cl, texts[text_key])  # warm: loads the text encoder with this chain's LoRA
            t0 = time.perf_counter()
            encode(cl, texts[text_key])
            enc_times[label].append(time.perf_counter() - t0)

    # -- sampling --------------------------------------------------------------------------------
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    conds = {}
    for label, (chain, text_key) in configs.items():
        cl = chains[chain][1]
        conds[label] = (encode(cl, texts[text_key])[0], encode(cl, "blurry, lowres")[0])

    step_times = {k: [] for k in configs}
    load_times = {k: [] for k in configs}
    for _ in range(args.repeats):
        for label, (chain, _) in configs.items():
            mdl = chains[chain][0]
            stamps: list[float] = []
            t0 = time.perf_counter()
            comfy.sample.sample(
                mdl,
                noise,
                args.steps,
                5.0,
                "euler",
                "normal",
                conds[label][0],
                conds[label][1],
                latent,
                callback=lambda *a, s=stamps: s.append(time.perf_counter()),
                disable_pbar=True,
                seed=0,
            )
            load_times[label].append(stamps[0] - t0)
            step_times[label].extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))

    med = {k: statistics.median(v) for k, v in step_times.items()}
    enc = {k: statistics.median(v) for k, v in enc_times.items()}
    first = {k: statistics.median(v) for k, v in load_times.items()}
    report = {
        "setup": {
            "size": args.size,
            "steps": args.steps,
            "repeats": args.repeats,
            "device": str(comfy.model_management.get_torch_device()),
            "comfyui": session.version,
            "torch": torch.__version__,
        },
        "per_step_seconds": med,
        "per_step_ratio_vs_plain": {k: med[k] / med["plain"] for k in med},
        "encode_seconds": enc,
        "encode_ratio_vs_plain": {k: enc[k] / enc["plain"] for k in enc},
        "first_step_including_model_load_seconds": first,
    }
    print(
        f"\nED-LoRA benchmark ({args.size}x{args.size}, {args.steps} steps, {args.repeats} repeats, "
        f"{report['setup']['device']}, ComfyUI {session.version})"
    )
    print(f"{'':14}{'per step':>12}{'vs plain':>10}{'encode':>12}{'vs plain':>10}")
    for k in configs:
        print(
            f"{k:14}{med[k] * 1000:10.1f}ms{med[k] / med['plain']:9.3f}x{enc[k] * 1000:10.1f}ms{enc[k] / enc['plain']:9.2f}x"
        )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "edlora.json").write_text(json.dumps(report, indent=2))
    print(f"written to {out / 'edlora.json'}")

    figures = Figures()
    figures.add("edlora_step_ratio_1_concept", med["1 concept"] / med["plain"], target=1.05)
    figures.add("edlora_step_ratio_3_concepts", med["3 concepts"] / med["plain"], target=1.05)
    figures.add("edlora_encode_ratio_1_concept", enc["1 concept"] / enc["plain"])
    figures.add("edlora_encode_ratio_3_concepts", enc["3 concepts"] / enc["plain"])
    figures.add_peak_memory("edlora_peak_rss")
    figures.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
