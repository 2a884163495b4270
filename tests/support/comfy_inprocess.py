"""Real ComfyUI, in-process: initialised once per test session with a temporary base folder."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .locate import PACK_ROOT, comfyui_version

MODEL_FOLDERS = ("checkpoints", "loras", "sams", "clip_vision", "embeddings")


class _ServerStub:
    """What PromptExecutor needs of PromptServer; records the messages it would send."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class RunResult:
    success: bool
    outputs: dict
    error: dict | None
    messages: list
    executor: object = field(repr=False, default=None)


class InProcessComfy:
    def __init__(self, comfy_path: Path, base_dir: Path):
        self.comfy_path = Path(comfy_path)
        self.version = comfyui_version(self.comfy_path)
        self.base_dir = Path(base_dir)
        self.models_dir = self.base_dir / "models"
        self.output_dir = self.base_dir / "output"
        self.pack_module_name = None
        self.pack_node_ids: list[str] = []
        self._init()

    def _init(self):
        path = str(self.comfy_path)
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
        import comfy.cli_args  # ComfyUI only parses argv when main.py asks it to

        comfy.cli_args.args.cpu = True
        # Order matters: `utils.extra_config` must be imported before `nodes` (DESIGN.md §3).
        import folder_paths  # noqa: I001
        import utils.extra_config  # noqa: F401

        for sub in ("input", "output", "temp"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name in MODEL_FOLDERS:
            d = self.models_dir / name
            d.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(name, str(d), is_default=True)
        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_temp_directory(str(self.base_dir / "temp"))
        folder_paths.set_input_directory(str(self.base_dir / "input"))

        import nodes

        before = set(nodes.NODE_CLASS_MAPPINGS)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        ok = asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
        if not ok:
            raise RuntimeError(f"ComfyUI could not load the pack from {PACK_ROOT} (see the log above)")
        self.pack_module_name = str(PACK_ROOT).replace(".", "_x_")
        self.pack_node_ids = sorted(k for k in set(nodes.NODE_CLASS_MAPPINGS) - before if k.startswith("MultiConcept"))

    # -- access -------------------------------------------------------------------------------

    def pack_module(self, dotted: str):
        return importlib.import_module(f"{self.pack_module_name}.{dotted}")

    def node_class(self, node_id: str):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS[node_id]

    # -- running graphs ------------------------------------------------------------------------

    def validate(self, prompt: dict):
        import execution

        valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        ok = bool(valid[0])
        return ok, None if ok else {"error": valid[1], "node_errors": valid[3]}

    def run(self, prompt: dict, outputs: list[str] | None = None) -> RunResult:
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            return RunResult(
                False, {}, {"exception_message": str(valid[1]), "node_errors": valid[3], "node_type": None}, [], None
            )
        server = _ServerStub()
        executor = execution.PromptExecutor(server)
        executor.execute(prompt, prompt_id, {}, outputs if outputs is not None else valid[2])
        error = None
        for event, data in executor.status_messages:
            if event == "execution_error":
                error = data
        history = executor.history_result or {}
        return RunResult(executor.success, history.get("outputs", {}), error, executor.status_messages, executor)

    def output_value(self, result: RunResult, node_id: str, index: int = 0):
        """The raw value a node produced in that run (e.g. an IMAGE tensor), from the executor's cache."""
        cache = result.executor.caches.outputs
        entry = cache.get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} produced no cached output")
        outputs = getattr(entry, "outputs", entry)
        value = outputs[index]
        return value[0] if isinstance(value, list) else value


def make_session(comfy_path: Path, base_dir: Path) -> InProcessComfy:
    os.environ.setdefault("TQDM_DISABLE", "1")
    return InProcessComfy(comfy_path, base_dir)
