"""What every benchmark shares: ComfyUI in-process on the chosen device, clocks, memory, repeats with their
spread, the checks that a timed configuration did its work, and the figure lines.

* ``add_common_arguments(parser)``: ``--quick``, ``--device auto|cpu|cuda`` and ``--figures FILE`` (append
  the figure lines there too; ``$MULTICONCEPT_FIGURES`` is the default, which benchmarks/gpu.sh sets).
* ``start_comfy(args, prefix)``: the in-process ComfyUI (tests/support/comfy_inprocess.py) on that device.
* ``Clock``: ``now()`` that waits for the GPU first, so a step's time is the GPU's work, not its queueing.
* ``RunMemory``: the peak memory of one run over its start: resident memory on the CPU (freed memory given
  back first with ``malloc_trim``, so each run shows its own working set), allocated memory on CUDA.
* ``Repeats``: per configuration and repeat, the timed samples (step or whole-run seconds); the median over
  all of them and the spread over repeats (the fastest and slowest repeat's median), and ratios to a
  baseline paired repeat by repeat, so that a machine slowed during one repeat moves the spread, not the
  headline.
* ``check_did_work``: every timed configuration's output must be finite, not flat, and different from
  plain sampling's where the configuration changes something (optionally only inside a region), or the
  benchmark stops: a configuration that silently skipped its work would otherwise look fast.
* ``sd15_bench_models(args, session, n_loras, rank)``: the benchmarks' SD1.5 set-up on the device (the UNet at
  full widths, or small with ``small_channels``; a CLIP-L; kohya-shaped LoRAs saved in models/loras), with
  ``lora_stack`` and ``edlora_modules`` for the concept stacks and ED-LoRA files that fit it.
* ``sdxl_bench_models(args, session)``: the same for SDXL (all 70 cross-attention layers; real or small widths,
  ComfyUI's SDXL CLIP at full or reduced depth).
* ``bench_parser`` / ``parse_args``: a benchmark's parser with the usual run arguments (``--size``, ``--steps``,
  ``--repeats``, ``--rank``) and the common ones; ``--quick``'s settings applied after parsing.
* ``counted_configs`` / ``run_interleaved``: configurations on row-counting model clones (``--only`` applied),
  run once per repeat in turn, each whole run timed and checked before its time counts; ``sample_steps``: one
  sampling run timed step by step.
* ``print_tables`` / ``print_columns`` / ``write_results``: the report and benchmarks/results/*.json.

Figures (benchmarks/figures.py, re-exported here as ``Figures``) carry the spread beside the value where there is
one. Benchmarks take what they share from this module and tests/support/builders only, never from each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.figures import Figures  # noqa: F401 - the figure lines; benchmarks take shared things from here

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class BenchmarkError(RuntimeError):
    """A configuration did not do what it is timed for (or the set-up cannot run): the benchmark stops."""


# ---------------------------------------------------------------------------------------- arguments


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where ComfyUI runs the models: cuda when a GPU is present (auto), else the CPU",
    )
    parser.add_argument(
        "--figures",
        default=os.environ.get("MULTICONCEPT_FIGURES", ""),
        help="also append the JSON figure lines to this file (default: $MULTICONCEPT_FIGURES)",
    )


RUN_ARGUMENTS = {  # name: (type, help) of the run arguments most benchmarks take
    "size": (int, "image size in pixels (square)"),
    "steps": (int, "sampling steps of every run"),
    "repeats": (int, "interleaved repetitions per configuration"),
    "rank": (int, "rank of each concept LoRA"),
}


def bench_parser(doc: str, quick_help: str, **run) -> argparse.ArgumentParser:
    """A benchmark's parser, described by its docstring's first line: the run arguments given in ``run`` (of
    RUN_ARGUMENTS; each a default, or ``(default, help)``), then ``add_common_arguments``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, given in run.items():
        kind, text = RUN_ARGUMENTS[name]
        default, text = given if isinstance(given, tuple) else (given, text)
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)
    add_common_arguments(parser, quick_help)
    return parser


def parse_args(parser: argparse.ArgumentParser, quick: dict | None = None, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then with ``--quick`` the settings in ``quick`` (argument name -> value) over
    whatever was given."""
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in (quick or {}).items():
            setattr(args, name, value)
    return args


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: torch sees no CUDA GPU on this machine (use --device cpu)")
    return name


def start_comfy(args: argparse.Namespace, prefix: str):
    """ComfyUI in this process on ``args.device`` (resolved in place), or None (with a line) when not found."""
    from tests.support.comfy_inprocess import make_session
    from tests.support.locate import find_comfyui

    comfy_path = find_comfyui()
    if comfy_path is None:
        print("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")
        return None
    args.device = resolve_device(args.device)
    return make_session(comfy_path, Path(tempfile.mkdtemp(prefix=prefix)), device=args.device)


def model_dtype(device: str):
    """The dtype ComfyUI would run an SD1.5/SDXL UNet in on ``device``: fp16 on a GPU, fp32 on the CPU."""
    import torch

    return torch.float16 if device == "cuda" else torch.float32


def describe_machine(session) -> str:
    import comfy.model_management
    import torch

    device = comfy.model_management.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    return f"{device} ({name}), ComfyUI {session.version}, torch {torch.__version__}"


# ------------------------------------------------------------------------------------ clock, memory


class Clock:
    """``now()`` after the GPU's queued work is done (a no-op wait on the CPU)."""

    def __init__(self):
        import torch

        self._sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def now(self) -> float:
        import torch

        if self._sync is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self._sync = torch.cuda.synchronize
        if self._sync is not None:
            self._sync()
        return time.perf_counter()


class _Peak:
    """``base`` and ``peak`` in bytes, set by the subclass; read in MiB."""

    base = peak = 0

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


class PeakRSS(_Peak):
    """Highest resident set size of this process while the block runs, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
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


class RunMemory(_Peak):
    """Peak memory of one run over its start. On CUDA: torch's allocated memory (``peak_mib`` is the peak
    allocated during the run); on the CPU: resident memory after ``malloc_trim`` (see PeakRSS)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._rss = None if self.cuda else PeakRSS()

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the growth is then a lower bound
            pass
        self._rss.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._rss.__exit__(*exc)
            self.base, self.peak = self._rss.base, self._rss.peak


def timed_run(fn, clock: Clock | None = None):
    """``(fn(), seconds, memory)``: one whole run, timed with ``clock`` (GPU work included) inside a
    ``RunMemory`` (its ``peak_mib`` / ``growth_mib``)."""
    clock = clock or Clock()
    with RunMemory() as memory:
        t0 = clock.now()
        result = fn()
        seconds = clock.now() - t0
    return result, seconds, memory


def process_peak_mib() -> float:
    """The process's peak: CUDA's peak allocation on a GPU, else the peak resident memory."""
    import resource
    import sys

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------ repeats


class Repeats:
    """Timed samples per configuration and repeat; medians, spreads and paired ratios."""

    def __init__(self):
        self.samples: dict[str, dict[int, list[float]]] = {}

    def add(self, label: str, repeat: int, seconds) -> None:
        values = [float(s) for s in (seconds if isinstance(seconds, (list, tuple)) else [seconds])]
        if not values:
            raise BenchmarkError(f"{label}: no timed samples in repeat {repeat + 1} (too few steps?)")
        self.samples.setdefault(label, {}).setdefault(repeat, []).extend(values)

    def labels(self) -> list[str]:
        return list(self.samples)

    def all(self, label: str) -> list[float]:
        return [s for values in self.samples[label].values() for s in values]

    def median(self, label: str) -> float:
        return statistics.median(self.all(label))

    def spread(self, label: str) -> tuple[float, float]:
        """(fastest, slowest) repeat's median."""
        per_repeat = [statistics.median(v) for v in self.samples[label].values()]
        return min(per_repeat), max(per_repeat)

    def ratio(self, label: str, base: str = "plain") -> float:
        return self.median(label) / self.median(base)

    def ratio_spread(self, label: str, base: str = "plain") -> tuple[float, float]:
        """(lowest, highest) of the per-repeat ratios, each repeat's median over the baseline's in that repeat."""
        ratios = [
            statistics.median(values) / statistics.median(self.samples[base][r])
            for r, values in self.samples[label].items()
            if r in self.samples[base]
        ]
        return min(ratios), max(ratios)

    def table_rows(self, base: str = "plain", unit: float = 1000.0, suffix: str = "ms", digits: int = 0) -> list[str]:
        """One line per configuration: median, its spread over repeats, ratio to the baseline and its spread
        (``unit``/``suffix``: milliseconds by default; whole runs: ``unit=1, suffix="s", digits=1``)."""
        width = max([26, *(len(label) + 2 for label in self.samples)])
        rows = [f"{'':{width}}{'median':>10}{'repeats':>20}{'vs ' + base:>10}{'repeats':>18}"]
        for label in self.samples:
            lo, hi = self.spread(label)
            rlo, rhi = self.ratio_spread(label, base)
            spread = f"{lo * unit:.{digits}f}-{hi * unit:.{digits}f}{suffix}"
            rows.append(
                f"{label:{width}}{self.median(label) * unit:{10 - len(suffix)}.{digits}f}{suffix}{spread:>20}"
                f"{self.ratio(label, base):9.3f}x{rlo:10.3f}-{rhi:.3f}x"
            )
        return rows


# --------------------------------------------------------------------------------------------- checks


def check_did_work(label: str, output, plain=None, region=None, changes: bool = True, min_change: float = 1e-4):
    """Stop the benchmark unless ``output`` (a latent or image tensor) is finite and not flat, and, with
    ``plain`` given, differs from it (``changes``) or equals it (``changes=False``): inside ``region`` (a mask
    at the tensor's spatial size) when given. ``min_change``: mean |difference| over mean |plain|."""
    import torch

    out = output.detach().float().cpu()
    if not torch.isfinite(out).all():
        raise BenchmarkError(f"{label}: the output has NaN or inf values")
    if float(out.std()) < 1e-6:
        raise BenchmarkError(f"{label}: the output is flat (std {float(out.std()):.2e})")
    if plain is None:
        return
    ref = plain.detach().float().cpu()
    if ref.shape != out.shape:
        raise BenchmarkError(f"{label}: output shape {tuple(out.shape)} differs from plain's {tuple(ref.shape)}")
    diff = (out - ref).abs()
    scale = ref.abs()
    if region is not None:
        weight = region.detach().float().cpu().expand_as(diff)
        change = float((diff * weight).sum() / weight.sum().clamp_min(1e-12))
        scale_value = float((scale * weight).sum() / weight.sum().clamp_min(1e-12))
    else:
        change, scale_value = float(diff.mean()), float(scale.mean())
    relative = change / max(scale_value, 1e-12)
    where = " inside its region" if region is not None else ""
    if changes and relative < min_change:
        raise BenchmarkError(
            f"{label}: the output equals plain sampling's{where} (mean |change| {relative:.2e} of plain's): "
            "the configuration did not do its work, so its time would mean nothing"
        )
    if not changes and relative >= min_change:
        raise BenchmarkError(f"{label}: the output should equal plain sampling's{where}, it differs by {relative:.2e}")


def count_model_rows(patcher):
    """A clone of ``patcher`` whose diffusion-model calls are counted: ``(clone, counter)``; ``counter.rows``
    is the number of latent rows the UNet ran on, ``counter.calls`` the number of calls (through a
    DIFFUSION_MODEL wrapper, so every route through ComfyUI's model counts: hook groups, batched conds)."""
    import comfy.patcher_extension

    class Counter:
        calls = 0
        rows = 0

        def reset(self):
            self.calls = self.rows = 0

    counter = Counter()

    def wrapper(executor, x, *args, **kwargs):
        counter.calls += 1
        counter.rows += int(x.shape[0])
        return executor(x, *args, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_count_rows", wrapper)
    return clone, counter


def select_only(configs: dict, only: str, keep: tuple = ("plain",), parser=None) -> dict:
    """``configs`` cut to ``keep`` and the comma-separated names in ``only`` (``--only``; empty: all of them);
    an unknown name stops the benchmark with the known ones (``parser.error`` when a parser is given)."""
    if not only:
        return configs
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    unknown = wanted - set(configs)
    if unknown:
        message = f"--only: unknown configuration(s) {sorted(unknown)}; known: {sorted(configs)}"
        if parser is not None:
            parser.error(message)
        raise BenchmarkError(message)
    return {k: v for k, v in configs.items() if k in keep or k in wanted}


def counted_configs(makers: dict, model, only: str = "", parser=None) -> tuple[dict, dict]:
    """``(configs, counters)``: every maker that ``--only`` keeps (``select_only``) called with its own clone of
    ``model`` that counts the UNet rows it runs (``count_model_rows``), and that clone's counter."""
    configs, counters = {}, {}
    for label, make in select_only(makers, only, parser=parser).items():
        counted, counters[label] = count_model_rows(model)
        configs[label] = make(counted)
    return configs, counters


# ------------------------------------------------------------------------------------------- sampling


def sample_steps(model, noise, latent, positive, negative, steps: int, cfg: float = 5.0, sampler: str = "euler",
                 clock: Clock | None = None, keep_first: bool = False):  # fmt: skip
    """``comfy.sample.sample`` (``scheduler`` normal, seed 0) with a clock on every step's callback:
    ``(seconds of each step after the first, the first step's seconds (loading and patching included), the
    first step's denoised prediction on the CPU (with ``keep_first``, else None), the output latent)``."""
    import comfy.sample

    clock = clock or Clock()
    stamps, first = [], []

    def callback(step, x0, x, total):
        stamps.append(clock.now())
        if keep_first and step == 0:
            first.append(x0.detach().float().cpu().clone())

    t0 = clock.now()
    out = comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent,
                              callback=callback, disable_pbar=True, seed=0)  # fmt: skip
    step_times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return step_times, stamps[0] - t0, first[0] if first else None, out


def to_latent(mask, height: int, width: int | None = None):
    """A pixel mask ``[H, W]`` (or ``[N, H, W]``) pooled to the latent grid, on the CPU: the ``region`` of
    ``check_did_work`` and of the locality measures."""
    import torch

    m = mask.detach().float().cpu()
    return torch.nn.functional.adaptive_avg_pool2d(m.reshape(-1, 1, *m.shape[-2:]), (height, width or height))[
        :, 0
    ].reshape(*m.shape[:-2], height, width or height)


@dataclass
class Interleaved:
    """What ``run_interleaved`` measured, by configuration."""

    times: Repeats  # whole-run seconds per repeat
    memory: dict  # the largest of the repeats' peak over the run's start (RunMemory.growth_mib), MiB
    rows: dict  # UNet rows per sampling step (the last repeat's)
    results: dict  # the last repeat's result

    def memory_ratio(self, weights_mib: float) -> dict:
        """Per configuration: (model weights + its working memory) over plain's."""
        return {k: (weights_mib + v) / (weights_mib + self.memory["plain"]) for k, v in self.memory.items()}


def run_interleaved(configs: dict, counters: dict, repeats: int, steps: int, region=None, output=None,
                    after=None, clock: Clock | None = None) -> Interleaved:  # fmt: skip
    """Every configuration once per repeat, in order ("plain" first), each a whole run (``timed_run``). Before a
    run's time counts, its output (``output(result)``; default: the result) is checked (``check_did_work``):
    finite and not flat, and every configuration but plain changes plain's output (inside ``region``, a latent
    mask, where given). ``counters`` (``count_model_rows``) give the UNet rows per step; ``after(label, result)``,
    called after each checked run, may collect what the result carries and returns text for its printed line."""
    clock = clock or Clock()
    out = Interleaved(Repeats(), dict.fromkeys(configs, 0.0), {}, {})
    plain = None
    width = max(len(label) for label in configs) + 1
    for r in range(repeats):
        for label, fn in configs.items():
            counters[label].reset()
            result, seconds, memory = timed_run(fn, clock)
            latent = (output(result) if output else result).detach().float().cpu()
            base = None if label == "plain" else plain
            check_did_work(label, latent, base, None if base is None else region)
            if label == "plain":
                plain = latent
            out.times.add(label, r, seconds)
            out.memory[label] = max(out.memory[label], memory.growth_mib)
            out.rows[label] = counters[label].rows / steps
            out.results[label] = result
            extra = f"  {after(label, result)}" if after else ""
            print(f"  repeat {r + 1}/{repeats} {label:{width}} {seconds:8.1f}s  +{memory.growth_mib:6.0f} MiB  "
                  f"{out.rows[label]:5.1f} UNet rows/step in {counters[label].calls / steps:.1f} call(s){extra}",
                  flush=True)  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- models


@dataclass
class BenchModels:
    """What ``sd15_bench_models`` built: the UNet (a ModelPatcher), the CLIP, and LoRA files."""

    model: object
    clip: object
    loras: list = field(default_factory=list)  # kohya-shaped LoRA state dicts, on the CPU
    files: list = field(default_factory=list)  # their names in ComfyUI's models/loras
    shape: str = ""  # what was built, for a report's title line
    small_channels: int | None = None  # the small UNet's width (None: SD1.5's real widths)
    clip_layers: int = 12

    @property
    def unet_parameters(self) -> int:
        return sum(p.numel() for p in self.model.model.parameters())

    @property
    def model_mib(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.model.model.parameters()) / 2**20

    def edlora_modules(self) -> tuple[dict, dict | None]:
        """``(unet_modules, te_modules)`` for ``tests.support.builders.edlora.official_edlora`` that fit this UNet
        and CLIP (None: the factory's default, SD1.5's 12 CLIP-L layers)."""
        from tests.support.builders.edlora import clip_te_modules, sd15_unet_modules
        from tests.support.builders.sd15 import sd15_block_width

        if self.small_channels:
            width = self.small_channels
            return sd15_unet_modules(channels_of=lambda block: width), clip_te_modules(self.clip_layers, 768)
        return sd15_unet_modules(channels_of=sd15_block_width), None

    def lora_stack(self, session, concepts: list[dict]):
        """A ConceptStack of the first ``len(concepts)`` LoRAs (kind "lora", in memory), each concept's other
        fields (label, class_word, ...) from its dict."""
        stack_mod = session.pack_module("samplers.concept_stack")
        stack = stack_mod.ConceptStack()
        for i, fields in enumerate(concepts):
            name = self.files[i].rsplit(".", 1)[0]
            adapter = stack_mod.LoRAFile(name, self.loras[i])
            concept = stack_mod.Concept(uid="", kind="lora", source=self.files[i], words=(), adapter=adapter, **fields)
            stack = stack.with_concept(concept)
        return stack


def sd15_bench_models(args, session, n_loras: int = 0, rank: int = 16, name: str = "bench",
                      small_channels: int | None = None, lora_scale: float = 0.4) -> BenchModels:  # fmt: skip
    """The benchmarks' SD1.5 set-up, seeded random weights, on ``args.device``:

    * the UNet: SD1.5's at its real widths (320/640/1280, 860M parameters; tests/support/builders/sd15.py), or
      with ``small_channels`` an SD1.5-shaped one that wide everywhere; in ``model_dtype(args.device)``;
    * the CLIP: a full-size CLIP-L (12 layers, width 768, the real tokenizer) in ComfyUI's default text-encoder
      dtype, or with ``small_channels`` a 3-layer one (MLP 256);
    * ``n_loras`` kohya-shaped LoRAs (rank ``rank``, seeds 100, 101, ...) on every linear layer of the
      transformer blocks, as typical character LoRAs are, saved (from the CPU) as ``{name}_{i}.safetensors`` in
      the session's models/loras."""
    from safetensors.torch import save_file

    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.lora import make_lora, transformer_linears
    from tests.support.builders.sd15 import UNET_CONFIG, build_full_sd15_model, build_unet_model

    t0 = time.perf_counter()
    dtype = model_dtype(args.device)
    if small_channels:
        config = {**UNET_CONFIG, "model_channels": int(small_channels)}
        model = build_unet_model("sd15", config, seed=0, dtype=dtype, device=args.device)
        clip = build_tiny_clip("sd15", seed=0, layers=3, mlp=256)
        shape = f"SD1.5-shaped UNet {small_channels} channels wide (random), CLIP-L with 3 layers (random)"
    else:
        model = build_full_sd15_model(seed=0, dtype=dtype, device=args.device)
        clip = build_tiny_clip("sd15", seed=0, layers=None, mlp=None)
        shape = "SD1.5 widths (random), CLIP-L (random, 12 layers)"
    clip_dtype = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in clip.cond_stage_model.parameters()}))
    built = BenchModels(model, clip, shape=f"{shape}, UNet {str(dtype).removeprefix('torch.')}, CLIP {clip_dtype}",
                        small_channels=small_channels, clip_layers=3 if small_channels else 12)  # fmt: skip
    targets = transformer_linears(model) if n_loras else []
    for i in range(n_loras):
        sd = make_lora(model, targets, rank=rank, seed=100 + i, scale=lora_scale)
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        file = f"{name}_{i}.safetensors"
        save_file(sd, str(session.models_dir / "loras" / file))
        built.loras.append(sd)
        built.files.append(file)
    print(f"built {built.shape} ({built.unet_parameters / 1e6:.0f}M UNet parameters) on {args.device}"
          + (f" and {n_loras} LoRAs of rank {rank}" if n_loras else "")
          + f" in {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    return built


def sdxl_bench_models(args, session, small_channels: int | None = None, clip_layers: int | None = None) -> BenchModels:
    """The benchmarks' SDXL set-up, seeded random weights, on ``args.device``: the UNet with SDXL's whole layout
    (70 cross-attention layers) at its real widths (320/640/1280, 2.6B parameters), or ``small_channels`` wide
    (model_channels; heads of 16); ComfyUI's SDXL CLIP (CLIP-L and CLIP-G at their real widths) with each text
    model's real depth (12 and 32 layers), or ``clip_layers`` layers each (MLP 4x the width)."""
    from tests.support.builders.clip import build_tiny_clip
    from tests.support.builders.sd15 import build_unet_model
    from tests.support.builders.sdxl import ALL_CROSS_ATTENTION_CONFIG, FULL_UNET_CONFIG

    t0 = time.perf_counter()
    dtype = model_dtype(args.device)
    config = (
        FULL_UNET_CONFIG
        if not small_channels
        else {**ALL_CROSS_ATTENTION_CONFIG, "model_channels": int(small_channels)}
    )
    model = build_unet_model("sdxl", config, seed=0, out_gain=0.1, dtype=dtype, device=args.device)
    clip = build_tiny_clip("sdxl", seed=0, layers=clip_layers, mlp=None)
    unet = f"SDXL layout {small_channels} channels wide" if small_channels else "SDXL widths"
    text = f"CLIP-L + CLIP-G with {clip_layers} layers each" if clip_layers else "CLIP-L + CLIP-G (12 and 32 layers)"
    clip_dtype = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in clip.cond_stage_model.parameters()}))
    built = BenchModels(model, clip, shape=f"{unet} (random), {text} (random), UNet {str(dtype).removeprefix('torch.')}, "
                        f"CLIP {clip_dtype}", small_channels=small_channels, clip_layers=clip_layers or 32)  # fmt: skip
    print(f"built {built.shape} ({built.unet_parameters / 1e6:.0f}M UNet parameters) on {args.device} in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    return built


# -------------------------------------------------------------------------------------------- reports


def print_tables(title: str, times: Repeats, columns: dict | None = None, whole_runs: bool = True,
                 base: str = "plain", what: str = "") -> None:  # fmt: skip
    """A benchmark's report: ``title``, the table of ``times`` (``Repeats.table_rows``: seconds, one sample per
    repeat, or with ``whole_runs=False`` milliseconds per step), under it ``columns`` (``print_columns``), and
    a line that says how to read it (``what``: what the median is of)."""
    print(f"\n{title}")
    units = {"unit": 1.0, "suffix": "s", "digits": 2 if what else 1} if whole_runs else {}
    for line in times.table_rows(base=base, **units):
        print(line)
    if columns:
        print_columns(times.labels(), columns)
    what = what or ("whole-run seconds over the repeats" if whole_runs else "of every timed step")
    print(f"median: {what}; repeats: the fastest and slowest repeat's median; vs {base}: the medians' ratio, then "
          f"the lowest and highest ratio within one repeat.")  # fmt: skip


def print_columns(labels, columns: dict, width: int | None = None) -> None:
    """A table of one row per label: ``columns`` maps a heading to ``(values by label, format)``, e.g.
    ``{"rows/step": (rows, "10.1f")}`` (the format's width is the column's; a missing value is left blank)."""
    labels = list(labels)
    width = width or max([26, *(len(label) + 2 for label in labels)])
    specs = [(head, values, fmt, int(fmt.split(".")[0] or 10)) for head, (values, fmt) in columns.items()]
    print(f"{'':{width}}" + "".join(f"{head:>{w}}" for head, _, _, w in specs))
    for label in labels:
        cells = [f"{values[label]:{fmt}}" if label in values else " " * w for _, values, fmt, w in specs]
        print(f"{label:{width}}" + "".join(cells))


def write_results(name: str, report: dict) -> Path:
    """``report`` as JSON in benchmarks/results/``name``; its path."""
    import json

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(report, indent=2))
    return path
