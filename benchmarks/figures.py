"""Headline figures of a benchmark, one JSON object per line at the end of its output (DESIGN.md §5).

    {"metric": "regional_step_ratio_2_regions", "value": 1.08, "target": 1.15, "better": "lower",
     "spread": [1.05, 1.11], "device": "cpu"}

so anyone can collect the figures of a run by machine (``grep '^{"metric"'``). ``spread`` (where given) is
the lowest and highest of the value over the benchmark's repeats; ``device`` says where it ran.
``Figures.print(path)`` also appends the lines to ``path`` (benchmarks/gpu.sh collects them that way).
"""

from __future__ import annotations

import json
import resource
import sys


class Figures:
    def __init__(self, device: str = ""):
        self.lines: list[dict] = []
        self.device = device

    def add(
        self,
        metric: str,
        value: float,
        target: float | None = None,
        better: str = "lower",
        unit: str = "",
        spread: tuple[float, float] | None = None,
    ):
        entry = {"metric": metric, "value": round(float(value), 4)}
        if target is not None:
            entry["target"] = target
        entry["better"] = better
        if unit:
            entry["unit"] = unit
        if spread is not None:
            entry["spread"] = [round(float(spread[0]), 4), round(float(spread[1]), 4)]
        if self.device:
            entry["device"] = self.device
        self.lines.append(entry)

    def add_peak_memory(self, metric: str = "peak_rss"):
        """Peak memory of this process so far: CUDA's peak allocation when a GPU was used, else the peak
        resident memory (Linux reports KiB, macOS bytes)."""
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.add(metric.replace("rss", "cuda"), torch.cuda.max_memory_allocated() / 2**20, unit="MiB")
                return
        except ImportError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mib = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
        self.add(metric, mib, better="lower", unit="MiB")

    def print(self, path: str | None = None):
        for entry in self.lines:
            print(json.dumps(entry))
        if path:
            with open(path, "a", encoding="utf-8") as f:
                for entry in self.lines:
                    f.write(json.dumps(entry) + "\n")
