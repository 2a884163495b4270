"""Test harness: markers by folder, ComfyUI discovery, the session's ComfyUI, checkpoint and server.

* tests/unit        -> marker ``unit``: pure torch, always run (the pack is importable as ``multiconcept``).
* tests/integration -> marker ``integration``: real ComfyUI in-process (fixture ``comfy``).
* tests/e2e         -> marker ``e2e``: a real ComfyUI server over HTTP (fixture ``comfy_server``).
* marker ``browser``: drives the frontend in headless Chromium (tests/e2e/test_regions_widget.py).

Without a ComfyUI checkout (see tests/support/locate.py) integration and e2e tests are skipped with one
reason, printed in the header; the closing summary says how many ran and how many were skipped for want of it.
With ComfyUI present, a browser test that skips (no Chromium, no playwright) fails the run instead: the
widget would otherwise go untested while the run passes.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
_PACK_ROOT = _TESTS_DIR.parent
# `tests.support` must be importable however pytest was started (`python -m pytest` adds the cwd, plain
# `pytest` does not). ComfyUI has a `tests` package of its own, so this has to happen before ComfyUI is set up.
if str(_PACK_ROOT) not in sys.path:
    sys.path.insert(0, str(_PACK_ROOT))

from tests.support.locate import (  # noqa: E402
    PACK_ROOT,
    SKIP_REASON,
    comfyui_version,
    find_comfyui,
    wrong_comfyui_path,
)

COMFY_PATH = find_comfyui()
COMFY_VERSION = comfyui_version(COMFY_PATH) if COMFY_PATH else None
KINDS = ("unit", "integration", "e2e")
COMFY_MARKERS = ("integration", "e2e")
TINY_CKPT = "mc_tiny_sd15.safetensors"


def _alias_pack_as_multiconcept():
    """Make the pack importable as ``multiconcept`` without ComfyUI (its __init__ imports nothing of it)."""
    if "multiconcept" in sys.modules:
        return sys.modules["multiconcept"]
    spec = importlib.util.spec_from_file_location(
        "multiconcept", PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["multiconcept"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["multiconcept"]
        raise
    return module


_alias_pack_as_multiconcept()


# ------------------------------------------------------------------------------- markers and skips


def _kind_of(path: Path) -> str | None:
    try:
        first = Path(path).resolve().relative_to(_TESTS_DIR).parts[0]
    except (ValueError, IndexError):
        return None
    return first if first in KINDS else None


BROWSER_SETUP = (
    "install Debian's chromium package (apt-get install chromium; scripts/test.sh does this when run as root) "
    "and playwright (pip install -r requirements-test.txt)"
)


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the ComfyUI frontend in headless Chromium (playwright)")
    message = wrong_comfyui_path()
    if message:  # a wrong explicit path must fail the run, not skip every ComfyUI test
        raise pytest.UsageError(message)


# The scopes that take longest under two workers, about longest first (the e2e tests, one scope, take a third
# of the suite's work; read off a --durations run): first in the queue under ``pytest -n``, so that the workers
# finish together instead of one starting a long module at the end. Only the order changes; a stale entry
# costs balance, nothing else.
LONGEST_FIRST = (
    "tests/e2e",
    "tests/integration/test_omg.py",
    "tests/integration/test_lora_composer.py",
    "tests/integration/test_concept_conductor.py",
    "tests/integration/test_compare_methods.py",
    "tests/integration/test_training_cli.py",
    "tests/integration/test_mixofshow_regional.py",
    "tests/integration/test_training.py",
    "tests/integration/test_training_sdxl.py",
    "tests/integration/test_fusion.py",
    "tests/integration/test_response_mix.py",
)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        kind = _kind_of(item.path)
        if kind is not None and item.get_closest_marker(kind) is None:
            item.add_marker(getattr(pytest.mark, kind))
        if COMFY_PATH is None and any(item.get_closest_marker(m) for m in COMFY_MARKERS):
            item.add_marker(skip)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: this order is the order scopes are handed out
        rank = {scope: i for i, scope in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(worker_scope(item.nodeid), len(rank)))


def worker_scope(nodeid: str) -> str:
    """Which tests share a worker under ``pytest -n N`` (scripts/test.sh runs two workers): every e2e test
    on one, so one ComfyUI server serves them all; the other tests a module at a time, so a module's
    expensive fixtures (a demo run, a trained concept) are built once."""
    path = nodeid.split("::", 1)[0]
    return "tests/e2e" if path.startswith("tests/e2e/") else path


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown (and unused) without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    config.option.loadscopereorder = False  # keep LONGEST_FIRST's order (xdist would sort by test count)
    return ScopeScheduling(config, log)


def pytest_report_header(config):
    if COMFY_PATH is None:
        return [SKIP_REASON]
    return [f"ComfyUI {COMFY_VERSION} found at {COMFY_PATH} (integration and e2e tests run against it)"]


# ---------------------------------------------------------------------------------- the summary

_results: dict[str, dict] = {}  # nodeid -> {"kind": "comfy"|"unit"|"other", "outcome": ..., "want": bool}
_timings: dict[str, float] = {}


_scope_seconds: dict[str, float] = {}  # worker scope -> seconds of its tests (setup + call + teardown)


def pytest_runtest_logreport(report):
    scope = worker_scope(report.nodeid)
    _scope_seconds[scope] = _scope_seconds.get(scope, 0.0) + float(getattr(report, "duration", 0.0) or 0.0)
    kw = report.keywords
    kind = "comfy" if any(m in kw for m in COMFY_MARKERS) else "unit" if "unit" in kw else "other"
    entry = _results.setdefault(report.nodeid, {"kind": kind, "outcome": None, "want": False})
    if report.skipped and not hasattr(report, "wasxfail"):
        if entry["outcome"] is None:
            entry["outcome"] = "skipped"
            entry["want"] = SKIP_REASON in str(report.longrepr)
    elif report.failed:
        entry["outcome"] = "failed"
    elif report.when == "call" and entry["outcome"] is None:
        entry["outcome"] = "passed"  # passed, xfailed or xpassed: it ran


def _count(kind: str) -> dict[str, int]:
    counts = {"ran": 0, "failed": 0, "want": 0, "skipped": 0}
    for entry in _results.values():
        if entry["kind"] != kind or entry["outcome"] is None:
            continue
        if entry["outcome"] == "skipped":
            counts["want" if entry["want"] else "skipped"] += 1
        else:
            counts["ran"] += 1
            counts["failed"] += entry["outcome"] == "failed"
    return counts


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    comfy, unit, other = _count("comfy"), _count("unit"), _count("other")
    where = f"ComfyUI {COMFY_VERSION} ({COMFY_PATH})" if COMFY_PATH else "ComfyUI not found"
    line = (
        f"{where}: {comfy['ran']} tests ran against ComfyUI (integration+e2e), {comfy['want']} skipped for want of it"
    )
    if comfy["skipped"]:
        line += f", {comfy['skipped']} skipped for other reasons"
    if comfy["failed"]:
        line += f", {comfy['failed']} failed"
    if "build" in _timings:
        line += f" (tiny SD1.5 checkpoint built in {_timings['build']:.1f}s)"
    unit_line = f"unit tests: {unit['ran']} ran"
    if unit["failed"]:
        unit_line += f", {unit['failed']} failed"
    if unit["skipped"] or unit["want"]:
        unit_line += f", {unit['skipped'] + unit['want']} skipped"
    if other["ran"] or other["skipped"] or other["want"]:
        unit_line += f"; {other['ran']} other tests ran"
    terminalreporter.write_line(line)
    terminalreporter.write_line(unit_line)
    if len(_scope_seconds) > 1 and hasattr(config, "workerinput") is False and config.getoption("numprocesses", None):
        # what LONGEST_FIRST should list (the scopes a worker takes whole), longest first
        top = sorted(_scope_seconds.items(), key=lambda kv: -kv[1])[:12]
        terminalreporter.write_line(
            "longest scopes: " + ", ".join(f"{k.removeprefix('tests/')} {v:.0f}s" for k, v in top)
        )


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def multiconcept():
    """The pack imported without ComfyUI, as ``multiconcept``."""
    return _alias_pack_as_multiconcept()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI initialised in this process (CPU, temporary base dir, built-in nodes + this pack)."""
    if COMFY_PATH is None:
        pytest.skip(SKIP_REASON)
    from tests.support.comfy_inprocess import make_session

    return make_session(COMFY_PATH, tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def tiny_checkpoint_path(comfy) -> Path:
    """The tiny SD1.5 checkpoint, built once per session into the in-process models/checkpoints."""
    from tests.support.builders.sd15 import build_tiny_sd15

    path = comfy.models_dir / "checkpoints" / TINY_CKPT
    start = time.perf_counter()
    build_tiny_sd15(path, seed=0)
    _timings.setdefault("build", time.perf_counter() - start)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_path) -> str:
    """The checkpoint's file name, as CheckpointLoaderSimple's ckpt_name wants it."""
    return tiny_checkpoint_path.name


@pytest.fixture(scope="module")
def tiny_models(comfy, tiny_checkpoint):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded once per module (a load takes a fraction of a second)
    and shared by its tests, as a running ComfyUI shares a loaded checkpoint between prompts: tests clone,
    never change them. Not once per session: a module that leaves ComfyUI's weight patching of its clones in
    some state must not decide the numbers of the next module (see the note on issue 25)."""
    import nodes

    return tuple(nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint)[:3])


@pytest.fixture(scope="module")
def tiny_models_shallow_clip(comfy, tiny_checkpoint_path):
    """(MODEL, CLIP, VAE) of the tiny checkpoint with the first 3 of CLIP-L's 12 layers (SHALLOW_TEXT_LAYERS in
    tests/support/builders/sd15.py), for modules whose time is the text encoder: ED-LoRA prompts are encoded
    16 times (once per cross-attention layer), and training runs that forward and backward, three quarters of
    a step at full depth. Loaded with ComfyUI's own ``te_model_options`` (the text model's config, as for any
    CLIP whose depth differs); the layers beyond are not read from the file."""
    from comfy.sd import load_checkpoint_guess_config

    from tests.support.builders.sd15 import SHALLOW_TEXT_LAYERS

    options = {"clip_l_model_config": {"num_hidden_layers": SHALLOW_TEXT_LAYERS}}
    return tuple(load_checkpoint_guess_config(str(tiny_checkpoint_path), te_model_options=options)[:3])


@pytest.fixture(scope="session")
def comfy_server(tiny_checkpoint_path, tmp_path_factory):
    """A ComfyUI server subprocess with the pack in custom_nodes and the tiny checkpoint; stopped at the end."""
    from tests.support.server import ComfyServer

    server = ComfyServer(COMFY_PATH, tmp_path_factory.mktemp("server_base"), checkpoint=tiny_checkpoint_path)
    try:
        yield server
    finally:
        server.stop()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (
        report.skipped
        and COMFY_PATH is not None
        and item.get_closest_marker("browser") is not None
        and not hasattr(report, "wasxfail")
    ):
        # ComfyUI is here, so the browser tests must run: a missing browser is a broken set-up, not a skip
        report.outcome = "failed"
        report.longrepr = (
            f"browser test skipped although ComfyUI was found at {COMFY_PATH}: {_skip_reason(report)}\n"
            f"The browser tests must run when ComfyUI is present: {BROWSER_SETUP}."
        )
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = getattr(item, "funcargs", {}).get("comfy_server")
        if server is not None:
            report.sections.append(("ComfyUI server log (tail)", server.log_tail()))
    return report
