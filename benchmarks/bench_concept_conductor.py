"""Concept Conductor cost (time, its split, and peak memory) as ratios against plain ComfyUI sampling in the same run.

    python benchmarks/bench_concept_conductor.py [--quick] [--size 512] [--steps 6] [--repeats 1]
                                                 [--concepts 1,2,3] [--kind edlora | lora]
                                                 [--device auto|cpu|cuda] [--figures FILE]

Needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and the test venv. ComfyUI runs in this process on
``--device`` (cuda when a GPU is present); the models are built there (benchmarks/harness.py
``sd15_bench_models``): an SD1.5 UNet at full widths (320/640/1280, 860M parameters, seeded random weights;
fp16 on CUDA, fp32 on the CPU), a full-size random CLIP-L. The concepts (a man, a woman, a dog) are synthetic ED-LoRAs in the official
Mix-of-Show layout (tests/support/builders/edlora.py: rank 4 on q/k/v/out of every text-encoder layer and of
attn1/attn2 of all 16 transformer blocks, 16 layer tokens per word) on a stack built with the Concept Stack:
ED-LoRA node; ``--kind lora``: kohya-shaped LoRAs (rank 16) on every linear layer of the transformer blocks
instead (Concept Stack: LoRA node, no words; seeds 100, 101, 102). Each concept has a box: one column of a 3-column tiling with a
margin, concept ``i`` in column ``i``. One scene prompt names all three class words. Configurations,
interleaved per repeat, each a whole sampling run of ``--steps`` steps (euler, normal schedule, CFG 7.5) under
``torch.inference_mode()`` as ComfyUI's executor runs nodes:

* plain: the model alone with the scene prompt (one UNet call of 2 rows per step);
* conductor xN: ``build_guider`` (samplers/concept_conductor/setup.py) with the first N concepts and
  ``ConductorSettings()`` (the official defaults: alignment in the first 30 % of the steps, shape-aware masks
  re-chosen in 25-40 % of them with 100 k-means restarts), then ``ConductorGuider.sample``.

Checks, before a run's time counts (benchmarks/harness.py ``check_did_work``): every final latent is finite and
not flat, and every conductor run changes plain's final latent inside concept 1's column. The UNet rows each
run sends through ComfyUI's model are counted (a DIFFUSION_MODEL wrapper; the alignment's truncated forward
passes may bypass it) and printed per step.

Time: whole-run seconds over plain's (the model is loaded by an untimed 1-step run first; building the guider,
which encodes the branches' prompts, is inside the run: "setup"; every clock waits for the GPU), the median
over repeats with the spread of the per-repeat ratios (each repeat's run over plain's in that repeat), which
the time-ratio figures carry. The split comes from timers wrapped around
the methods of each run's guider instance (no behaviour change): the reference run (``_reference_run``: the
scene sampled plainly as far as the alignment reads), the alignment passes (``_align``: the truncated forward of
every branch's positive row up to the alignment layer, then the backward pass to the latent; the
forward/backward boundary is where ``layout_loss`` is called), the mask refinements (``ConductorState.refine``:
k-means; capturing the attention is inside the branch calls) and the batched branch calls (``branch_outputs``:
N+1 branches with CFG, 2(N+1) rows per step); "other" is the rest (CFG, the sampler). Each part is reported over
plain's whole run. The method's floor, without alignment: the reference's share of the steps plus N+1. Growth
per concept: the slope of the whole-run ratio over the concept counts. Memory: the peak during each run over its
start (CUDA: allocated memory; CPU: resident memory, freed memory returned to the system first), and the ratio
of (model + that growth) over plain's.

Steps: the official defaults are fractions of the schedule, so the step count changes the shares: at 20 steps
the alignment takes steps 1-7 (35 %) and the refinement 4 steps; at the default 6, steps 1-3 (50 %) and 1
refinement, which fits the whole run (plain + 1, 2, 3 concepts, one repeat) in about half an hour on 2 idle
cores (8 steps take about 36 minutes). So each run is also projected to 20 steps from its measured costs (per
branch step, per reference step, per alignment pass, per refinement; setup once). ``--quick``: a small
SD1.5-shaped UNet (64 channels everywhere), a 3-layer CLIP-L, 256x256, 10 steps (alignment 40 %, 3
refinements), 2 repeats, concepts 1,2,3: a few minutes, a smoke check of the split rather than the full-width
figure. The output ends with one JSON figure per line (benchmarks/figures.py; ``--figures FILE`` appends them
there too).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from tests.support.builders.edlora import official_edlora  # noqa: E402

SCENE = "a photo of a man, a woman and a dog in a garden, high detail"
NEGATIVE = "blurry, lowres"
CFG = 7.5
CONCEPTS = (  # words, class word, seed
    (("<man1>", "<man2>"), "man", 61),
    (("<ann1>", "<ann2>"), "woman", 62),
    (("<rex1>", "<rex2>"), "dog", 63),
)
QUICK_CHANNELS = 64
PROJECTED_STEPS = 20
PARTS = ("setup", "reference", "alignment", "branches", "refinement")


def column_masks(n: int, size: int):
    """``[n, size, size]``: concept ``i`` in column ``i`` of a 3-column tiling, with a margin."""
    import torch

    masks = torch.zeros(n, size, size)
    col, margin = size // 3, size // 16
    for i in range(n):
        masks[i, margin : size - margin, i * col + margin // 2 : (i + 1) * col - margin // 2] = 1.0
    return masks


def main() -> int:
    t_start = time.perf_counter()
    quick = "small UNet (64 wide), 3-layer CLIP, 256x256, 10 steps, 2 repeats"
    steps = (6, "sampling steps of every run (official: 200)")
    parser = harness.bench_parser(__doc__, quick, size=512, steps=steps, repeats=1)
    parser.add_argument("--concepts", default="1,2,3", help="comma-separated concept counts (1 to 3)")
    parser.add_argument("--kind", choices=("edlora", "lora"), default="edlora", help="the concepts' adapter files")
    args = harness.parse_args(parser, quick={"size": 256, "steps": 10, "repeats": 2})
    counts = sorted({int(c) for c in args.concepts.split(",") if c.strip()})
    if not counts or min(counts) < 1 or max(counts) > len(CONCEPTS):
        parser.error(f"--concepts: counts between 1 and {len(CONCEPTS)}")
    if args.size % 64:
        parser.error("--size must be a multiple of 64")

    if (session := harness.start_comfy(args, "mc_bench_cc_")) is None:
        return 2

    n_loras = max(counts) if args.kind == "lora" else 0
    small = QUICK_CHANNELS if args.quick else None
    built = harness.sd15_bench_models(args, session, n_loras=n_loras, rank=16, name="bench_cc", small_channels=small)
    guider_mod, setup_mod = (session.pack_module(f"samplers.concept_conductor.{m}") for m in ("guider", "setup"))

    import comfy.sample
    import comfy.samplers

    import nodes

    model, clip, model_mib = built.model, built.clip, built.model_mib
    unet_modules, te_modules = built.edlora_modules()
    stacks = {}
    stack = None
    for i, (words, class_word, seed) in enumerate(CONCEPTS[: max(counts)]):
        if args.kind == "edlora":
            name = f"bench_cc_{i}.pth"
            torch.save(official_edlora(words=words, seed=seed, unet_modules=unet_modules, te_modules=te_modules),
                       session.models_dir / "loras" / name)  # fmt: skip
            node = session.node_class("MultiConceptStackEDLoRA")
        else:
            name = built.files[i]
            node = session.node_class("MultiConceptStackLoRA")
        stack = node.execute(name, 1.0, 1.0, class_word, concepts=stack, class_word=class_word).result[0]
        stacks[i + 1] = stack

    encode = nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, SCENE)[0], encode(clip, NEGATIVE)[0]
    s, steps = args.size, args.steps
    latent = torch.zeros(1, 4, s // 8, s // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    sampler = comfy.samplers.sampler_object("euler")
    # one alignment step per aligned step (the default repeats it round(200 / steps) times, the official count of
    # gradient steps; the projection below prices that from the measured cost of one alignment pass)
    settings = guider_mod.ConductorSettings(scale_to_steps=None)
    official = guider_mod.ConductorSettings()
    clock = harness.Clock()
    now = clock.now
    column_1 = harness.to_latent(column_masks(1, s)[0], s // 8)  # concept 1's column on the latent grid

    # the forward/backward boundary of an alignment pass: the loss is computed right after the truncated forward
    mark = {"loss_at": None}
    original_loss = guider_mod.layout_loss

    def marked_loss(*a, **kw):
        mark["loss_at"] = now()
        return original_loss(*a, **kw)

    guider_mod.layout_loss = marked_loss

    def timed(split: dict, key: str, fn):
        def wrapper(*a, **kw):
            t = now()
            mark["loss_at"] = None
            try:
                return fn(*a, **kw)
            finally:
                end = now()
                split[key] += end - t
                if key == "alignment" and mark["loss_at"] is not None:
                    split["alignment forward"] += mark["loss_at"] - t
                    split["alignment backward"] += end - mark["loss_at"]

        return wrapper

    def plain(mdl, n_steps=steps):
        def run():
            out = comfy.sample.sample(mdl, noise, n_steps, CFG, "euler", "normal", pos, neg, latent,
                                      disable_pbar=True, seed=0)  # fmt: skip
            return out, {}, {}

        return run

    def sigmas():
        return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)

    def conductor(n):
        def make(mdl):
            def run():
                split = dict.fromkeys((*PARTS, "alignment forward", "alignment backward"), 0.0)
                t = now()
                guider = setup_mod.build_guider("bench", mdl, clip, stacks[n], SCENE, NEGATIVE, CFG,
                                                column_masks(n, s), settings)  # fmt: skip
                split["setup"] = now() - t
                guider._reference_run = timed(split, "reference", guider._reference_run)
                guider._align = timed(split, "alignment", guider._align)
                guider.branch_outputs = timed(split, "branches", guider.branch_outputs)
                guider.state.refine = timed(split, "refinement", guider.state.refine)
                out = guider.sample(noise, latent, sampler, sigmas(), disable_pbar=True, seed=0)
                info = {"aligned": guider.steps_aligned, "refinements": guider.state.refinements,
                        "reference_steps": max(settings.alignment_steps(steps), default=-1) + 1}  # fmt: skip
                return out, split, info

            return run

        return make

    makers = {"plain": plain, **{f"conductor x{n}": conductor(n) for n in counts}}
    configs, counters = harness.counted_configs(makers, model)  # each configuration counts the UNet rows it runs
    with torch.inference_mode():
        t0 = now()
        plain(model, 1)()  # load the model once, untimed (one step is enough)
        print(f"untimed first plain step (loads the model) {now() - t0:.0f}s", flush=True)
        splits = {k: [] for k in configs}

        def keep_split(label, result):  # each repeat's split; its parts end the printed line
            splits[label].append(result[1])
            return "  ".join(f"{k} {v:.1f}s" for k, v in result[1].items() if k in PARTS)

        # interleaved repeats; every conductor run must change plain's final latent in concept 1's column
        measured = harness.run_interleaved(configs, counters, args.repeats, steps, region=column_1,
                                           output=lambda result: result[0], after=keep_split, clock=clock)  # fmt: skip
    guider_mod.layout_loss = original_loss
    times, growth, rows = measured.times, measured.memory, measured.rows
    infos = {k: v[2] for k, v in measured.results.items()}

    med = {k: times.median(k) for k in configs}
    plain_s = med["plain"]
    ratio = {k: times.ratio(k) for k in configs}
    part_s = {
        k: {p: statistics.median(sp[p] for sp in splits[k]) for p in splits[k][0]} for k in configs if k != "plain"
    }
    for k, parts in part_s.items():
        parts["other"] = med[k] - sum(parts[p] for p in PARTS)
    part_ratio = {k: {p: v / plain_s for p, v in parts.items()} for k, parts in part_s.items()}
    mem_ratio = measured.memory_ratio(model_mib)
    floor = {f"conductor x{n}": infos[f"conductor x{n}"]["reference_steps"] / steps + n + 1 for n in counts}
    growth_per_concept = float("nan")
    if len(counts) > 1:
        lo, hi = f"conductor x{counts[0]}", f"conductor x{counts[-1]}"
        growth_per_concept = (ratio[hi] - ratio[lo]) / (counts[-1] - counts[0])

    def projected(k: str, at: int, repeats: int = 1) -> float:
        """The run's ratio at ``at`` steps from its measured costs per step, per pass and per refinement, with
        ``repeats`` alignment passes per aligned step."""
        p, info = part_s[k], infos[k]
        aligned, refined = settings.alignment_steps(at), settings.refine_steps(at)
        seconds = (p["setup"] + p["reference"] / max(1, info["reference_steps"]) * (max(aligned, default=-1) + 1)
                   + p["alignment"] / max(1, info["aligned"]) * len(aligned) * repeats
                   + p["refinement"] / max(1, info["refinements"]) * len(refined)
                   + (p["branches"] + p["other"]) / steps * at)  # fmt: skip
        return seconds / (plain_s / steps * at)

    at20 = {k: projected(k, PROJECTED_STEPS) for k in part_s}
    at20_official = {k: projected(k, PROJECTED_STEPS, official.repeats(PROJECTED_STEPS)) for k in part_s}
    total = time.perf_counter() - t_start

    kind = "ED-LoRA (rank 4)" if args.kind == "edlora" else "LoRA (rank 16)"
    defaults = f"alignment steps {settings.alignment_steps(steps)}, refinement steps {settings.refine_steps(steps)}"
    title = ", ".join((f"Concept Conductor benchmark: {s}x{s}", built.shape, f"{kind} concepts",
                       f"{steps} steps euler", f"CFG {CFG}", f"official default settings ({defaults}; one alignment step each)",
                       f"{args.repeats} repeat(s)", harness.describe_machine(session)))  # fmt: skip
    harness.print_tables(title, times, {"floor x": (floor, "8.2f"), "rows/step": (rows, "10.1f"),
                                        "working memory MiB": (growth, "20.0f"),
                                        "memory vs plain": (mem_ratio, "17.2f")})  # fmt: skip
    print("floor: the reference's share of the steps + N + 1 branches, without alignment; rows/step: latent rows "
          "through ComfyUI's model per step; working memory: the peak during the run over its start, the largest of "
          "the repeats.")  # fmt: skip
    cols = (*PARTS, "other", "alignment forward", "alignment backward")
    print("\nsplit, each part's seconds over plain's whole run (alignment = forward + backward):")
    print(f"{'':16}" + "".join(f"{c.replace('alignment ', 'align '):>15}" for c in cols))
    for k, parts in part_ratio.items():
        print(f"{k:16}" + "".join(f"{parts[c]:14.2f}x" for c in cols))
    for k, info in infos.items():
        if k == "plain":
            continue
        plain_step = plain_s / steps
        per_ref = part_s[k]["reference"] / max(1, info["reference_steps"]) / plain_step
        per_align = part_s[k]["alignment"] / max(1, info["aligned"]) / plain_step
        per_refine = part_s[k]["refinement"] / max(1, info["refinements"])
        print(f"{k}: reference {info['reference_steps']} of {steps} steps (each {per_ref:.2f}x a plain step: 1 expected, "
              f"more is overhead or a busier machine), {info['aligned']} alignment passes (each {per_align:.2f}x a plain "
              f"step), {info['refinements']} refinements ({per_refine:.1f}s each), branch calls "
              f"{part_ratio[k]['branches']:.2f}x plain's run (N+1 = {int(k.rsplit('x', 1)[1]) + 1}); projected at "
              f"{PROJECTED_STEPS} steps: {at20[k]:.2f}x")  # fmt: skip
    print(f"growth per concept: +{growth_per_concept:.2f}x of plain. model weights {model_mib:.0f} MiB; memory ratio = "
          f"(weights + run's working memory) / plain's. Run took {total:.0f}s.")  # fmt: skip

    name = "concept_conductor_quick.json" if args.quick else f"concept_conductor_{s}x{s}.json"
    if counts != [1, 2, 3]:
        name = "concept_conductor_partial.json"
    report = {"setup": vars(args), "run_seconds": med, "ratio_vs_plain": ratio,
              "ratio_spread": {k: times.ratio_spread(k) for k in configs}, "unet_rows_per_step": rows,
              "part_seconds": part_s,
              "part_ratio_vs_plain": part_ratio, "floor": floor, "runs": infos, "working_memory_mib": growth,
              "memory_ratio": mem_ratio, "growth_per_concept": growth_per_concept,
              f"ratio_projected_{PROJECTED_STEPS}_steps": at20, "total_seconds": total}  # fmt: skip
    print(f"written to {harness.write_results(name, report)}")

    figures = harness.Figures(args.device)
    if "conductor x2" in ratio:
        figures.add("concept_conductor_time_ratio_2_concepts", ratio["conductor x2"], target=4.0,
                    spread=times.ratio_spread("conductor x2"))  # fmt: skip
        figures.add(f"concept_conductor_time_ratio_2_concepts_projected_{PROJECTED_STEPS}_steps", at20["conductor x2"],
                    target=4.0)  # fmt: skip
        # the node's default alignment: round(200 / 20) = 10 gradient steps per aligned step (the official count)
        figures.add(f"concept_conductor_time_ratio_2_concepts_projected_{PROJECTED_STEPS}_steps_official_alignment",
                    at20_official["conductor x2"])  # fmt: skip
        for part in ("reference", "branches", "alignment", "refinement"):
            figures.add(f"concept_conductor_{part}_ratio_2_concepts", part_ratio["conductor x2"][part])
        figures.add("concept_conductor_memory_ratio_2_concepts", mem_ratio["conductor x2"])
        figures.add("concept_conductor_working_memory_2_concepts", growth["conductor x2"], unit="MiB")
    for n in counts:
        if n != 2:
            label = f"conductor x{n}"
            figures.add(f"concept_conductor_time_ratio_{n}_concept{'s' if n > 1 else ''}", ratio[label],
                        spread=times.ratio_spread(label))  # fmt: skip
    if growth_per_concept == growth_per_concept:
        figures.add("concept_conductor_growth_per_concept", growth_per_concept)
    figures.add_peak_memory("concept_conductor_bench_peak_rss")
    figures.print(args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
