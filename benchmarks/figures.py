"""Headline figures of a benchmark, one JSON object per line at the end of its output (DESIGN.md §5).

    {"metric": "regional_step_ratio_2_regions", "value": 1.08, "target": 1.15, "better": "lower"}

so anyone can collect the figures of a run by machine (``grep '^{"metric"'``).
"""

from __future__ import annotations

import json
import resource
import sys


class Figures:
    def __init__(self):
        self.lines: list[dict] = []

    def add(self, metric: str, value: float, target: float | None = None, better: str = "lower", unit: str = ""):
        entry = {"metric": metric, "value": round(float(value), 4)}
        if target is not None:
            entry["target"] = target
        entry["better"] = better
        if unit:
            entry["unit"] = unit
        self.lines.append(entry)

    def add_peak_memory(self, metric: str = "peak_rss"):
        """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mib = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
        self.add(metric, mib, better="lower", unit="MiB")

    def print(self):
        for entry in self.lines:
            print(json.dumps(entry))
