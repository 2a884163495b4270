"""The README's test command (scripts/test.sh) itself: where it looks for ComfyUI, when it fetches one.

Each test runs the real script in a scratch HOME, with a stand-in ``git`` first on PATH that records its
arguments (and fails like a machine without network, or "clones" a minimal ComfyUI), reusing the test venv
this run already uses, and asks pytest inside for one small unit test file. The venv is the one
scripts/test.sh made (it exports MULTICONCEPT_VENV and leaves a stamp in it); run directly under another
Python, these tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PINNED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["multiconcept"]["comfyui_version"]
INNER_TESTS = "tests/unit/test_regions.py"

FAKE_GIT = """#!/usr/bin/env bash
# Stand-in git: records each call; "clone" fails like an offline machine unless FAKE_GIT_CLONE_OK=1.
printf '%s\\n' "$*" >> "$FAKE_GIT_LOG"
case "$*" in
  *ls-remote*) echo "fatal: unable to access: Could not resolve host: github.com" >&2; exit 128 ;;
  *clone*)
    if [ "${FAKE_GIT_CLONE_OK:-0}" = 1 ]; then
      dest="${@: -1}"
      mkdir -p "$dest/comfy"
      : > "$dest/comfy/model_patcher.py"; : > "$dest/nodes.py"
      cp "$FAKE_REQS" "$dest/requirements.txt"
      echo '__version__ = "'"$FAKE_VERSION"'"' > "$dest/comfyui_version.py"
      exit 0
    fi
    echo "fatal: unable to access 'https://github.com/Comfy-Org/ComfyUI/': Could not resolve host: github.com" >&2
    exit 128 ;;
esac
exec /usr/bin/env -u FAKE_GIT_LOG git "$@"
"""


def _venv() -> Path:
    venv = Path(os.environ.get("MULTICONCEPT_VENV", sys.prefix))
    if Path(sys.prefix).resolve() != venv.resolve() or not (venv / ".multiconcept-stamp").is_file():
        pytest.skip("needs the venv made by scripts/test.sh (run the suite with `bash scripts/test.sh`)")
    return venv


def _boot_python() -> str:
    """The interpreter the venv was made from (pyenv shims would not survive the scratch HOME)."""
    for line in (Path(sys.prefix) / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            for name in ("python3", "python"):
                candidate = Path(value.strip()) / name
                if candidate.exists():
                    return str(candidate)
    return shutil.which("python3") or "python3"


@pytest.fixture
def sandbox(tmp_path):
    if ROOT.parent.name == "custom_nodes":
        pytest.skip("the pack sits in a ComfyUI's custom_nodes: test.sh would always find that ComfyUI")
    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    venv = _venv()
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    git = bin_dir / "git"
    git.write_text(FAKE_GIT)
    git.chmod(git.stat().st_mode | stat.S_IEXEC)
    # The fake ComfyUI's requirements: the same file the venv already has, so nothing new gets installed.
    reqs = tmp_path / "requirements.txt"
    real = os.environ.get("COMFYUI_PATH")
    reqs.write_text((Path(real) / "requirements.txt").read_text() if real else "")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COMFYUI_PATH", "MULTICONCEPT_COMFYUI_VERSION", "MULTICONCEPT_COMFYUI_REPO", "PYTEST_ADDOPTS",
                     "MULTICONCEPT_WORKERS")
        and not k.startswith("PYTEST_XDIST_")  # this run's own worker identity
    }  # fmt: skip
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        MULTICONCEPT_VENV=str(venv),
        PYTHON=_boot_python(),
        FAKE_GIT_LOG=str(tmp_path / "git.log"),
        FAKE_REQS=str(reqs),
        FAKE_VERSION=PINNED,
    )

    class Sandbox:
        def run(self, *pytest_args, **extra_env):
            out = subprocess.run(
                ["bash", str(ROOT / "scripts" / "test.sh"), *pytest_args],
                cwd=ROOT,
                env={**env, **extra_env},
                capture_output=True,
                text=True,
                timeout=600,
            )
            return out.returncode, out.stdout + out.stderr

        def git_calls(self) -> list[str]:
            log = tmp_path / "git.log"
            return log.read_text().splitlines() if log.exists() else []

    sandbox = Sandbox()
    sandbox.home = home
    sandbox.tmp = tmp_path
    return sandbox


def test_no_comfyui_and_no_network_runs_the_unit_tests_and_says_why(sandbox):
    rc, out = sandbox.run(INNER_TESTS, "-q", MULTICONCEPT_LINT="0")
    assert rc == 0, out
    clones = [c for c in sandbox.git_calls() if c.startswith("-c") or " clone " in f" {c} "]
    assert len(clones) == 1, sandbox.git_calls()
    assert f"--branch v{PINNED} https://github.com/Comfy-Org/ComfyUI" in clones[0]
    told = [ln for ln in out.splitlines() if "could not fetch ComfyUI" in ln]
    assert len(told) == 1 and PINNED in told[0] and "unit tests only" in told[0], out
    assert "0 tests ran against ComfyUI" in out and " passed" in out
    assert not (sandbox.home / "comfy" / "ComfyUI").exists(), "a failed fetch must leave nothing behind"


def test_fetches_the_pinned_release_when_none_is_found(sandbox):
    rc, out = sandbox.run(INNER_TESTS, "-q", MULTICONCEPT_LINT="0", FAKE_GIT_CLONE_OK="1")
    assert rc == 0, out
    assert any(f"--branch v{PINNED}" in c for c in sandbox.git_calls())
    fetched = sandbox.home / "comfy" / "ComfyUI"
    assert (fetched / "comfy" / "model_patcher.py").is_file()
    assert f"[test.sh] ComfyUI: {fetched}" in out
    assert f"ComfyUI {PINNED} ({fetched}): " in out  # the suite ran against what was fetched


def test_an_existing_folder_that_is_not_comfyui_is_left_alone(sandbox):
    keep = sandbox.home / "comfy" / "ComfyUI" / "my_notes.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    rc, out = sandbox.run(INNER_TESTS, "-q", MULTICONCEPT_LINT="0", FAKE_GIT_CLONE_OK="1")
    assert rc == 0, out
    assert keep.read_text() == "mine" and sorted(os.listdir(keep.parent)) == ["my_notes.txt"]
    assert not any("clone" in c for c in sandbox.git_calls())
    assert "not a ComfyUI checkout; not touching it" in out


def test_a_set_comfyui_path_is_used_and_nothing_is_fetched(sandbox):
    fake = sandbox.tmp / "MyComfy"
    (fake / "comfy").mkdir(parents=True)
    (fake / "comfy" / "model_patcher.py").write_text("")
    (fake / "nodes.py").write_text("")
    shutil.copy(sandbox.tmp / "requirements.txt", fake / "requirements.txt")
    # lint on whatever the caller's environment says (MULTICONCEPT_LINT=0 while iterating must not fail this)
    rc, out = sandbox.run(INNER_TESTS, "-q", COMFYUI_PATH=str(fake), MULTICONCEPT_LINT="1")
    assert rc == 0, out
    assert sandbox.git_calls() == [], "nothing may be fetched when COMFYUI_PATH is set"
    assert f"[test.sh] ComfyUI: {fake}" in out
    assert "[test.sh] lint: ruff" in out  # lint is part of the command
    assert "[test.sh] pytest with 2 workers" in out and " passed" in out  # the default: two pytest-xdist workers


def test_a_wrong_comfyui_path_is_an_error_not_a_skip(sandbox):
    rc, out = sandbox.run(INNER_TESTS, "-q", COMFYUI_PATH=str(sandbox.tmp / "nowhere"))
    assert rc == 2, out
    assert "is not a ComfyUI checkout" in out and "nowhere" in out
    assert sandbox.git_calls() == [] and " passed" not in out
