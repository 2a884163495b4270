"""Test harness: markers by folder, ComfyUI discovery, the session's ComfyUI, checkpoint and server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.support.locate import PACK_ROOT, SKIP_REASON, comfyui_version, find_comfyui

COMFY_PATH = find_comfyui()
COMFY_MARKERS = ("integration", "e2e")
TINY_CKPT = "mc_tiny_sd15.safetensors"


def _alias_pack_as_multiconcept():
    """Make the pack importable as ``multiconcept`` without ComfyUI (its __init__ imports nothing of it)."""
    if "multiconcept" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "multiconcept", PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["multiconcept"] = module
    spec.loader.exec_module(module)


_alias_pack_as_multiconcept()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("unit", "integration", "e2e"):
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))
        if COMFY_PATH is None and any(item.get_closest_marker(m) for m in COMFY_MARKERS):
            item.add_marker(skip)


def pytest_report_header(config):
    if COMFY_PATH is None:
        return [SKIP_REASON]
    return [f"ComfyUI {comfyui_version(COMFY_PATH)} at {COMFY_PATH}"]


_outcomes: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report):
    item_kind = "comfy" if any(k in report.keywords for k in COMFY_MARKERS) else "unit"
    counts = _outcomes.setdefault(item_kind, {"passed": 0, "failed": 0, "skipped": 0})
    if report.when == "call" and not report.skipped:
        counts["passed" if report.passed else "failed"] += 1
    elif report.skipped and report.when in ("setup", "call"):
        counts["skipped"] += 1
    elif report.failed and report.when == "setup":
        counts["failed"] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    comfy = _outcomes.get("comfy", {"passed": 0, "failed": 0, "skipped": 0})
    unit = _outcomes.get("unit", {"passed": 0, "failed": 0, "skipped": 0})
    ran = comfy["passed"] + comfy["failed"]
    where = f"ComfyUI {comfyui_version(COMFY_PATH)} ({COMFY_PATH})" if COMFY_PATH else "ComfyUI not found"
    terminalreporter.write_line(
        f"{where}: {ran} tests ran against ComfyUI (integration+e2e), {comfy['skipped']} skipped"
        + (" for want of it" if COMFY_PATH is None else "")
    )
    terminalreporter.write_line(f"unit tests: {unit['passed'] + unit['failed']} ran, {unit['failed']} failed")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if COMFY_PATH is None:
        pytest.skip(SKIP_REASON)
    from tests.support.comfy_inprocess import make_session

    return make_session(COMFY_PATH, tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def tiny_checkpoint_path(comfy):
    from tests.support.tiny_sd15 import build_tiny_sd15

    path = comfy.models_dir / "checkpoints" / TINY_CKPT
    build_tiny_sd15(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_path):
    return TINY_CKPT


@pytest.fixture(scope="session")
def comfy_server(tiny_checkpoint_path, tmp_path_factory, request):
    from tests.support.server import ComfyServer

    server = ComfyServer(COMFY_PATH, tmp_path_factory.mktemp("server_base"), checkpoint=tiny_checkpoint_path)
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
        if server is not None:
            report.sections.append(("ComfyUI server log (tail)", server.log_tail()))
