"""ED-LoRA cost as ratios against plain ComfyUI, measured in one process run.

    python benchmarks/bench_edlora.py [--quick] [--size 128] [--steps 8] [--repeats 5]
                                      [--device auto|cpu|cuda] [--figures FILE]

``--quick``: 64x64, 4 steps, 3 repeats (a few minutes on 2 cores, most of it building the models). The output
ends with one JSON figure per line (benchmarks/figures.py; ``--figures FILE`` appends them there too).

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (860M parameters, seeded random weights; fp16 on CUDA,
fp32 on the CPU) and a full-size random CLIP-L; the concepts are synthetic ED-LoRAs in the official Mix-of-Show
layout at those widths (tests/support/builders/edlora.py), each loaded with the ED-LoRA Loader (strengths 0.7)
on top of the previous one. Absolute numbers mean little; the ratios are what to read:

* per-step sampling cost with 1 and 3 ED-LoRA concepts in the prompt vs the same prompt without concepts
  on the plain model (target <= 1.05x). Steps are timed from the sampler's per-step callback (the clock waits
  for the GPU), so the one-off LoRA weight merge at model load is not counted as a per-step cost (it is
  reported separately);
* prompt-encoding cost of a prompt naming 1 / 3 concepts vs the same prompt with plain words (the 16
  layer-wise encodings are batched into one text-encoder pass and made once per prompt, not per step).

Each figure is the median over repeats (all timed steps, or one encoding per repeat) with the spread of the
per-repeat ratios (each repeat's median over plain's in that repeat). Checks (benchmarks/harness.py
``check_did_work``), before a configuration's time counts: every sampled latent is finite and not flat, and
the concept configurations' differ from plain's; a concept prompt's conditioning must carry the layer-wise
encodings. The UNet rows per step are counted (a DIFFUSION_MODEL wrapper) and printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from tests.support.builders.edlora import official_edlora  # noqa: E402


def main() -> int:
    parser = harness.bench_parser(__doc__, "small sizes: 64x64, 4 steps, 3 repeats", size=128, steps=8, repeats=5)
    args = harness.parse_args(parser, quick={"size": 64, "steps": 4, "repeats": 3})
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")

    if (session := harness.start_comfy(args, "mc_bench_edlora_")) is None:
        return 2

    built = harness.sd15_bench_models(args, session)
    layerwise_key = session.pack_module("samplers.edlora.clip").LAYERWISE_KEY

    import comfy.sample

    import nodes

    unet_modules, te_modules = built.edlora_modules()
    model, clip = built.model, built.clip
    loader = session.node_class("MultiConceptEDLoRALoader")
    words = [("<ann1>", "<ann2>"), ("<bob1>", "<bob2>"), ("<rex1>", "<rex2>")]
    chains = {0: (model, clip)}
    m, c = model, clip
    for i, w in enumerate(words):
        name = f"bench_{i}.pth"
        data = official_edlora(words=w, seed=100 + i, unet_modules=unet_modules, te_modules=te_modules)
        torch.save(data, session.models_dir / "loras" / name)
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
    clock = harness.Clock()

    # -- prompt encoding ------------------------------------------------------------------------
    enc_times = harness.Repeats()
    for r in range(args.repeats):
        for label, (chain, text_key) in configs.items():
            cl = chains[chain][1]
            encode(cl, texts[text_key])  # warm: loads the text encoder with this chain's LoRA
            t0 = clock.now()
            cond = encode(cl, texts[text_key])[0]
            seconds = clock.now() - t0
            # the check before the time counts: a concept prompt is encoded layer-wise
            if label != "plain" and not any(layerwise_key in d for _, d in cond):
                raise harness.BenchmarkError(f"{label}: the prompt's conditioning has no layer-wise encodings")
            harness.check_did_work(f"{label} (encoding)", cond[0][0])
            enc_times.add(label, r, seconds)

    # -- sampling --------------------------------------------------------------------------------
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    conds, counted = {}, {}
    for label, (chain, text_key) in configs.items():
        cl = chains[chain][1]
        conds[label] = (encode(cl, texts[text_key])[0], encode(cl, "blurry, lowres")[0])
        counted[label] = harness.count_model_rows(chains[chain][0])  # (model, counter): the UNet rows it runs

    step_times = harness.Repeats()
    load_times = {k: [] for k in configs}
    rows: dict[str, float] = {}
    calls: dict[str, float] = {}
    outputs = {}
    for r in range(args.repeats):
        for label in configs:
            mdl, counter = counted[label]
            counter.reset()
            steps, first, _, out = harness.sample_steps(mdl, noise, latent, *conds[label], args.steps, 5.0, clock=clock)
            # the check before the time counts: the concepts change plain's picture
            harness.check_did_work(label, out, None if label == "plain" else outputs["plain"])
            outputs[label] = out.detach().float().cpu()
            step_times.add(label, r, steps)
            load_times[label].append(first)
            rows[label] = counter.rows / args.steps
            calls[label] = counter.calls / args.steps

    med = {k: step_times.median(k) for k in configs}
    enc = {k: enc_times.median(k) for k in configs}
    first = {k: sorted(v)[len(v) // 2] for k, v in load_times.items()}
    report = {
        "setup": {"size": args.size, "steps": args.steps, "repeats": args.repeats, "device": args.device,
                  "model": built.shape, "machine": harness.describe_machine(session)},
        "per_step_seconds": med,
        "per_step_ratio_vs_plain": {k: step_times.ratio(k) for k in med},
        "per_step_ratio_spread": {k: step_times.ratio_spread(k) for k in med},
        "encode_seconds": enc,
        "encode_ratio_vs_plain": {k: enc_times.ratio(k) for k in enc},
        "encode_ratio_spread": {k: enc_times.ratio_spread(k) for k in enc},
        "first_step_including_model_load_seconds": first,
        "unet_rows_per_step": rows,
        "unet_calls_per_step": calls,
    }  # fmt: skip
    print(f"\nED-LoRA benchmark ({args.size}x{args.size}, {args.steps} steps, {args.repeats} repeats, {built.shape}, "
          f"{harness.describe_machine(session)})")  # fmt: skip
    print("per step:")
    for line in step_times.table_rows(digits=1):
        print(line)
    print("prompt encoding:")
    for line in enc_times.table_rows(digits=1):
        print(line)
    harness.print_columns(configs, {"rows/step": (rows, "10.0f"), "calls/step": (calls, "11.0f"),
                                    "1st step (load) s": (first, "19.2f")})  # fmt: skip
    print("median: of every timed step (per step) or every repeat's encoding; repeats: the fastest and slowest "
          "repeat's median; vs plain: medians' ratio, then the lowest and highest ratio within one repeat.")  # fmt: skip
    print(f"written to {harness.write_results('edlora.json', report)}")

    figures = harness.Figures(args.device)
    for label, n in (("1 concept", "1_concept"), ("3 concepts", "3_concepts")):
        figures.add(f"edlora_step_ratio_{n}", step_times.ratio(label), target=1.05,
                    spread=step_times.ratio_spread(label))  # fmt: skip
    for label, n in (("1 concept", "1_concept"), ("3 concepts", "3_concepts")):
        figures.add(f"edlora_encode_ratio_{n}", enc_times.ratio(label), spread=enc_times.ratio_spread(label))
    figures.add_peak_memory("edlora_peak_rss")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
