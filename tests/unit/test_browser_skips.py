"""With ComfyUI present, the browser tests must run: a missing Chromium or playwright fails the run.

Each case runs pytest on tests/e2e/test_regions_widget.py in a subprocess, with a stand-in ComfyUI
checkout (just the two files tests/support/locate.py looks for) or none, and with Chromium or playwright
hidden. Nothing gets as far as starting a server or a browser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WIDGET_TESTS = "tests/e2e/test_regions_widget.py"
N_WIDGET_TESTS = 3


def _pytest(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH", "PATH", "HOME")}
    home = tmp_path / "home"  # no ~/comfy/ComfyUI here
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "pytest", WIDGET_TESTS, "-p", "no:cacheprovider", "-q", "-rs"],
        cwd=ROOT,
        env={**keep, "HOME": str(home), "PWD": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _fake_comfyui(tmp_path: Path) -> Path:
    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "model_patcher.py").write_text("")
    (comfy / "nodes.py").write_text("")
    return comfy


def _bin_dir(tmp_path: Path, with_chromium: bool) -> Path:
    """A PATH of its own: empty, or holding only a stand-in ``chromium`` (never run in these cases)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    if with_chromium:
        fake = d / "chromium"
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)
    return d


def _no_playwright(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import playwright`` fail as if it were not installed."""
    d = tmp_path / "shadow"
    (d / "playwright").mkdir(parents=True)
    (d / "playwright" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'playwright' (hidden by the test)\", name='playwright')\n"
    )
    return d


@pytest.fixture
def not_in_custom_nodes():
    if ROOT.parent.name == "custom_nodes":
        pytest.skip("the pack sits in a ComfyUI's custom_nodes: ComfyUI would always be found")


@pytest.mark.parametrize("missing", ["chromium", "playwright"])
def test_a_skipped_browser_test_fails_the_run_when_comfyui_is_there(tmp_path, missing):
    env = {"COMFYUI_PATH": str(_fake_comfyui(tmp_path))}
    if missing == "chromium":
        env["PATH"] = str(_bin_dir(tmp_path, with_chromium=False))
    else:
        env["PATH"] = str(_bin_dir(tmp_path, with_chromium=True))
        env["PYTHONPATH"] = str(_no_playwright(tmp_path))
    run = _pytest(env, tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert f"{N_WIDGET_TESTS} errors" in out and "skipped" not in out.splitlines()[-1], out
    assert "browser test skipped although ComfyUI was found" in out, out
    assert "install Debian's chromium package" in out and "playwright" in out, out
    assert ("Chromium not found" if missing == "chromium" else "playwright is not installed") in out, out
    assert f"{N_WIDGET_TESTS} failed" in out, out  # the closing ComfyUI line counts them as failed


def test_without_comfyui_the_browser_tests_skip_with_the_comfyui_line(tmp_path, not_in_custom_nodes):
    from tests.support.locate import SKIP_REASON

    run = _pytest({"PATH": str(_bin_dir(tmp_path, with_chromium=False))}, tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert f"{N_WIDGET_TESTS} skipped" in out.splitlines()[-1], out
    assert SKIP_REASON in out and "Chromium" not in out and "browser test skipped" not in out, out
    assert f"ComfyUI not found: 0 tests ran against ComfyUI (integration+e2e), {N_WIDGET_TESTS} skipped" in out, out
