"""A real ComfyUI server in a subprocess, with the pack installed, driven over HTTP (e2e tests).

Layout of the server's base directory (``--base-directory``)::

    custom_nodes/comfyui-multiconcept -> the pack root (a symlink; a copy without .git where links fail)
    models/checkpoints/<tiny checkpoint>  (a hard link to the session's build, else a symlink or copy)
    models/{loras,sams,clip_vision,embeddings,open_clip}, input/, output/, temp/, user/
    server.log                            (everything ComfyUI prints)

The process runs in its own process group and is stopped (SIGTERM, then SIGKILL) by ``stop()``, by the
fixture's teardown and, as a last resort, at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from .locate import PACK_ROOT

PACK_DIR_NAME = "comfyui-multiconcept"
SUBDIRS = (
    "custom_nodes",
    "models/checkpoints",
    "models/loras",
    "models/sams",
    "models/clip_vision",
    "models/embeddings",
    "models/open_clip",
    "input",
    "output",
    "temp",
    "user",
)
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "output")


def _die_with_parent():  # runs in the child before exec
    """Linux: SIGTERM the server when the test process dies, even by a signal that skips atexit."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except Exception:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptRejected(Exception):
    """POST /prompt answered with an error (400: validation failed); ``body`` is ComfyUI's JSON."""

    def __init__(self, status: int, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ComfyServer:
    def __init__(
        self,
        comfy_path: Path,
        base_dir: Path,
        checkpoint: Path | None = None,
        python: str = sys.executable,
        startup_timeout: float = 180,
        extra_args: tuple[str, ...] = (),
    ):
        self.comfy_path = Path(comfy_path)
        self.base_dir = Path(base_dir)
        self.python = python
        self.extra_args = tuple(extra_args)
        self.client_id = str(uuid.uuid4())
        self.log_path = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        for sub in SUBDIRS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self.pack_dir = self.base_dir / "custom_nodes" / PACK_DIR_NAME
        self.install_mode = self._install_pack()
        if checkpoint is not None:
            self._link_model(Path(checkpoint), self.base_dir / "models" / "checkpoints")
        atexit.register(self.stop)
        try:
            self._start(startup_timeout)
            self._check_pack_loaded()
        except BaseException:
            self.stop()
            raise

    # -- set-up --------------------------------------------------------------------------------

    def _install_pack(self) -> str:
        if self.pack_dir.is_symlink() or self.pack_dir.exists():
            return "symlink" if self.pack_dir.is_symlink() else "copy"
        try:
            self.pack_dir.symlink_to(PACK_ROOT, target_is_directory=True)
            return "symlink"
        except OSError:
            shutil.copytree(PACK_ROOT, self.pack_dir, ignore=COPY_IGNORE)
            return "copy"

    @staticmethod
    def _link_model(src: Path, folder: Path) -> Path:
        target = folder / src.name
        if target.exists():
            return target
        for make in (os.link, os.symlink):
            try:
                make(src, target)
                return target
            except OSError:
                pass
        shutil.copy2(src, target)
        return target

    def _command(self, port: int) -> list[str]:
        return [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
            "--disable-api-nodes",  # the paid-API nodes: not needed, and they slow the start
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]

    def _start(self, timeout: float, attempts: int = 3):
        for attempt in range(attempts):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            if self._log is not None:
                self._log.close()
            self._log = open(self.log_path, "a" if attempt else "w")
            env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(
                self._command(self.port),
                cwd=self.comfy_path,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stop() ends ComfyUI and anything it started
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            if self._wait_ready(timeout):
                return
            if "address already in use" not in self.log_tail(20).lower() or attempt == attempts - 1:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once GET /system_stats answers; False if the process died; raises on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if requests.get(self.url + "/system_stats", timeout=2).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")

    def _check_pack_loaded(self):
        """ComfyUI logs one line per custom node folder in "Import times for custom nodes"."""
        log = self.log_path.read_text(errors="replace")
        lines = [
            ln for ln in log.splitlines() if re.search(r"seconds.*:\s.*custom_nodes[/\\]" + PACK_DIR_NAME + r"\s*$", ln)
        ]
        if not lines:
            raise RuntimeError(f"ComfyUI did not try to import {self.pack_dir}:\n{self.log_tail()}")
        if any("IMPORT FAILED" in ln for ln in lines):
            raise RuntimeError(f"ComfyUI could not import the pack from {self.pack_dir}:\n{self.log_tail(120)}")
        self.pack_node_ids = sorted(k for k in self.object_info() if k.startswith("MultiConcept"))

    # -- lifetime ------------------------------------------------------------------------------

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15):
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None and not self._log.closed:
            self._log.close()
        atexit.unregister(self.stop)

    # -- HTTP ----------------------------------------------------------------------------------

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self) -> dict:
        r = self.get("/object_info", timeout=60)
        r.raise_for_status()
        return r.json()

    def post_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its prompt_id. Raises PromptRejected (with ComfyUI's
        ``{"error": ..., "node_errors": ...}`` as ``.body``) when the server refuses it."""
        # json.dumps with NaN/Infinity allowed (requests' json= refuses them): API clients can send them,
        # and ComfyUI's server parses them, so the tests must be able to as well.
        body = json.dumps({"prompt": prompt, "client_id": client_id or self.client_id}, allow_nan=True)
        r = self.post("/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code != 200:
            raise PromptRejected(r.status_code, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history/<id> until the prompt finished (success or error); returns its history entry.

        The first polls come quickly (a prompt refused in its node's checks finishes in milliseconds, and the
        fuzz test sends hundreds), then every 0.25 s."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") is not None and status.get("status_str") in ("success", "error"):
                return entry
            if not self.running:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(pause)
            pause = min(0.25, pause * 2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.post_prompt(prompt), timeout)

    def output_file(self, filename: str, subfolder: str = "", type: str = "output") -> Path:  # noqa: A002
        """Where a ``{"filename", "subfolder", "type"}`` entry of /history outputs is on disk."""
        return self.base_dir / type / subfolder / filename

    def output_image(self, entry: dict, node: str):
        """The one image node ``node`` saved or previewed in a finished prompt, as float64 RGB ``[H, W, 3]``."""
        import numpy as np
        from PIL import Image

        images = entry["outputs"][node]["images"]
        assert len(images) == 1, images
        item = images[0]
        with Image.open(self.output_file(item["filename"], item["subfolder"], item["type"])) as im:
            return np.asarray(im.convert("RGB")).astype(np.float64)
