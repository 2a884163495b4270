"""Real ComfyUI, in-process: initialised once per test session with a temporary base folder.

What ComfyUI's main.py would do, minus the server: CPU mode, model/input/output/temp folders registered
through folder_paths, the built-in extra nodes, then this pack through ``nodes.load_custom_node`` (so the
pack is imported exactly as ComfyUI imports it from custom_nodes/). ``run`` executes each graph with a fresh
``execution.PromptExecutor``, so no node output is reused from an earlier run. ``persistent()`` gives a
session that keeps one executor (and its output cache) across runs, as a running server does: a loaded
checkpoint is then reused by the next prompt, so whatever a node wrote into it would show there.

Import order matters and is easy to get wrong:

* ``comfy.cli_args.args.cpu`` must be set before anything imports ``comfy.model_management``;
* ``utils.extra_config`` must be imported before ``nodes``: importing ``nodes`` puts ``comfy/`` first on
  sys.path, after which ``utils`` resolves to ``comfy/utils.py``;
* ComfyUI has its own ``tests`` package and this pack has top-level ``nodes``/``samplers`` folders, so the
  ComfyUI checkout goes first on sys.path (our ``tests`` is already imported by then).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .locate import PACK_ROOT, comfyui_version

MODEL_FOLDERS = ("checkpoints", "loras", "sams", "clip_vision", "embeddings", "open_clip")
COMFY_TOP_LEVEL = ("nodes", "folder_paths", "execution", "server", "comfy", "comfy_extras", "comfy_api", "utils")


class ServerStub:
    """What PromptExecutor and execution.execute use of PromptServer; records what would be sent.

    ``client_id`` is set by the executor from ``extra_data`` (None unless a run asks for one); with None,
    ComfyUI sends only broadcast messages, as for a prompt queued without a client.
    """

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}  # read by the progress handler's preview feature check
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class RunResult:
    success: bool
    outputs: dict  # node id -> ui output (what /history shows), from executor.history_result
    error: dict | None  # the execution_error message (exception_message, node_id, node_type, ...)
    messages: list  # executor.status_messages: (event, data), execution_start ... execution_success/error
    executor: object = field(repr=False, default=None)
    prompt_id: str = ""
    sent: list = field(repr=False, default_factory=list)  # what the stub server would have sent
    raw: dict = field(repr=False, default_factory=dict)  # node id -> its cached outputs when the run ended

    def value(self, node_id, index: int = 0):
        """The raw value output ``index`` of ``node_id`` produced in this run (e.g. an IMAGE tensor)."""
        return output_value(self, node_id, index)

    @property
    def cached(self) -> list[str]:
        """The node ids the executor took from its cache instead of running (the execution_cached message)."""
        return [n for event, data in self.messages if event == "execution_cached" for n in data["nodes"]]


def output_value(result: RunResult, node_id, index: int = 0):
    if result.executor is None:
        raise KeyError(f"the prompt did not execute (validation failed: {result.error})")
    # execution.py caches [[batch values], ...]; taken when the run ended (a persistent executor's cache
    # moves on with its next prompt)
    entry = result.raw.get(str(node_id))
    if entry is None:
        raise KeyError(f"node {node_id} produced no cached output in this run")
    outputs = getattr(entry, "outputs", entry)
    value = outputs[index]
    return value[0] if isinstance(value, list) and len(value) == 1 else value


class InProcessComfy:
    def __init__(self, comfy_path: Path, base_dir: Path, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        self.device = device
        self.comfy_path = Path(comfy_path).resolve()
        self.version = comfyui_version(self.comfy_path)
        self.base_dir = Path(base_dir)
        self.models_dir = self.base_dir / "models"
        self.input_dir = self.base_dir / "input"
        self.output_dir = self.base_dir / "output"
        self.temp_dir = self.base_dir / "temp"
        self.pack_root = PACK_ROOT
        self.pack_module_name: str | None = None
        self.pack_node_ids: list[str] = []
        self._init()

    # -- start-up ------------------------------------------------------------------------------

    def _check_no_foreign_modules(self):
        for name in COMFY_TOP_LEVEL:
            mod = sys.modules.get(name)
            where = getattr(mod, "__file__", None) if mod is not None else None
            if where and not Path(where).resolve().is_relative_to(self.comfy_path):
                raise RuntimeError(
                    f"`{name}` was imported from {where} before ComfyUI was set up; "
                    f"it must come from {self.comfy_path} (is the pack root ahead of ComfyUI on sys.path?)"
                )

    def _init(self):
        self._check_no_foreign_modules()
        path = str(self.comfy_path)
        while path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)

        import comfy.cli_args  # ComfyUI parses argv only when main.py asks it to; these are the defaults

        comfy.cli_args.args.cpu = self.device == "cpu"
        mm = sys.modules.get("comfy.model_management")
        if self.device == "cpu" and mm is not None and getattr(getattr(mm, "cpu_state", None), "name", "CPU") != "CPU":
            raise RuntimeError("comfy.model_management was imported before CPU mode was set")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU here (use --device cpu)")

        import folder_paths  # noqa: I001
        import utils.extra_config  # noqa: F401  (before `nodes`, see the module docstring)

        for d in (self.input_dir, self.output_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FOLDERS:
            d = self.models_dir / name
            d.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(name, str(d), is_default=True)
        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_temp_directory(str(self.temp_dir))
        folder_paths.set_input_directory(str(self.input_dir))

        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        before = set(nodes.NODE_CLASS_MAPPINGS)
        ok = asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
        if not ok:
            raise RuntimeError(f"ComfyUI could not load the pack from {PACK_ROOT} (see the log above)")
        self.pack_module_name = self._find_pack_module()
        self.pack_node_ids = sorted(k for k in set(nodes.NODE_CLASS_MAPPINGS) - before if k.startswith("MultiConcept"))
        foreign = sorted(k for k in set(nodes.NODE_CLASS_MAPPINGS) - before if not k.startswith("MultiConcept"))
        if foreign:
            raise AssertionError(f"the pack registered node ids without the MultiConcept prefix: {foreign}")

    def _find_pack_module(self) -> str:
        """The sys.modules name ComfyUI gave the pack (load_custom_node: the folder path, '.' -> '_x_')."""
        init = (PACK_ROOT / "__init__.py").resolve()
        for name, mod in list(sys.modules.items()):
            f = getattr(mod, "__file__", None)
            if f and name != "multiconcept" and Path(f).resolve() == init:
                return name
        raise RuntimeError("ComfyUI reported the pack loaded but no module for it is in sys.modules")

    # -- access -------------------------------------------------------------------------------

    def pack_module(self, dotted: str = ""):
        """A module of the pack as ComfyUI loaded it, e.g. ``pack_module("samplers.edlora.layerwise")``."""
        name = f"{self.pack_module_name}.{dotted}" if dotted else self.pack_module_name
        return importlib.import_module(name)

    def node_class(self, node_id: str):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS[node_id]

    # -- running graphs ------------------------------------------------------------------------

    def validate(self, prompt: dict):
        """``(ok, error)`` as POST /prompt would judge it; error is ``{"error": ..., "node_errors": ...}``."""
        import execution

        valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        ok = bool(valid[0])
        return ok, None if ok else {"error": valid[1], "node_errors": valid[3]}

    def run(self, prompt: dict, outputs: list[str] | None = None, client_id: str | None = None) -> RunResult:
        """Validate, then execute with a fresh PromptExecutor (nothing cached from earlier runs).

        ``outputs``: the output node ids to execute (default: every valid output, like the server).
        ``client_id``: make the stub server record per-node messages too (executing, executed, progress).
        A prompt that fails validation is not executed: ``success`` is False and ``error`` carries
        ``exception_message`` (the validation error's message), ``node_errors`` and ``validation``.
        """
        import execution

        server = ServerStub()
        return self._execute(
            prompt, outputs, client_id, server, lambda: execution.PromptExecutor(server, cache_type=False)
        )

    def persistent(self) -> PersistentSession:
        """A session that runs every graph through one PromptExecutor, like a server between prompts."""
        return PersistentSession(self)

    def _execute(self, prompt: dict, outputs, client_id, server: ServerStub, make_executor) -> RunResult:
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, outputs))
        if not valid[0]:
            err = valid[1] or {}
            error = {
                "exception_message": f"{err.get('message', '')}: {err.get('details', '')}".strip(": "),
                "node_id": None,
                "node_type": None,
                "validation": err,
                "node_errors": valid[3],
            }
            return RunResult(False, {}, error, [], None, prompt_id)
        server.messages = []
        executor = make_executor()
        extra_data = {"client_id": client_id} if client_id else {}
        executor.execute(prompt, prompt_id, extra_data, valid[2])
        error = next((data for event, data in executor.status_messages if event == "execution_error"), None)
        history = getattr(executor, "history_result", None) or {}
        raw = {str(n): executor.caches.outputs.get(str(n)) for n in prompt}
        return RunResult(
            executor.success and error is None,
            history.get("outputs", {}),
            error,
            list(executor.status_messages),
            executor,
            prompt_id,
            list(server.messages),
            {n: v for n, v in raw.items() if v is not None},
        )

    def output_value(self, result: RunResult, node_id, index: int = 0):
        """The raw value a node produced in that run (e.g. an IMAGE tensor), from the executor's cache."""
        return output_value(result, node_id, index)

    def output_path(self, item: dict) -> Path:
        """Where an ``{"filename", "subfolder", "type"}`` ui entry (e.g. from SaveImage) is on disk."""
        root = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}[item.get("type", "output")]
        return root / item.get("subfolder", "") / item["filename"]


class PersistentSession:
    """One ``execution.PromptExecutor`` (classic cache, as ComfyUI's main.py makes it) for several runs.

    Like a server between prompts, the executor keeps the outputs of nodes whose inputs did not change:
    the CheckpointLoaderSimple of the next prompt hands out the *same* MODEL/CLIP/VAE objects. Only nodes
    whose inputs changed run again; change an input (a SaveImage prefix, a seed) to force a re-run.
    ``RunResult.cached`` lists the nodes taken from the cache in a run.
    """

    def __init__(self, comfy: InProcessComfy):
        import execution

        self.comfy = comfy
        self.server = ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)

    def run(self, prompt: dict, outputs: list[str] | None = None, client_id: str | None = None) -> RunResult:
        return self.comfy._execute(prompt, outputs, client_id, self.server, lambda: self.executor)


_SESSION: InProcessComfy | None = None


def make_session(comfy_path: Path, base_dir: Path, device: str = "cpu") -> InProcessComfy:
    """The one in-process ComfyUI of this Python process (ComfyUI's globals allow only one).

    ``device``: "cpu" (ComfyUI's --cpu; the tests) or "cuda" (ComfyUI's own GPU management; benchmarks)."""
    global _SESSION
    if _SESSION is None:
        os.environ.setdefault("TQDM_DISABLE", "1")
        _SESSION = InProcessComfy(comfy_path, base_dir, device)
    elif Path(comfy_path).resolve() != _SESSION.comfy_path:
        raise RuntimeError(f"ComfyUI from {_SESSION.comfy_path} is already loaded in this process")
    elif device != _SESSION.device:
        raise RuntimeError(f"ComfyUI is already set up for {_SESSION.device} in this process, not {device}")
    return _SESSION
