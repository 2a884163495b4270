#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine:  bash scripts/test.sh [pytest args]
#
# Makes (or reuses) a virtual environment at ${MULTICONCEPT_VENV:-~/.cache/multi-concept/venv-py311} with
# torch 2.14.1 + torchvision 0.29.1, requirements-test.txt and, when a ComfyUI checkout is found
# (COMFYUI_PATH, the folder this pack sits in, or ~/comfy/ComfyUI), ComfyUI's requirements. Then pytest.
set -euo pipefail

PACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MULTICONCEPT_VENV:-$HOME/.cache/multi-concept/venv-py311}"
PY_BOOT="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

is_comfy() { [ -n "$1" ] && [ -f "$1/comfy/model_patcher.py" ] && [ -f "$1/nodes.py" ]; }
COMFY=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  is_comfy "$COMFYUI_PATH" && COMFY="$COMFYUI_PATH"
elif [ "$(basename "$(dirname "$PACK_ROOT")")" = "custom_nodes" ] && is_comfy "$(dirname "$(dirname "$PACK_ROOT")")"; then
  COMFY="$(dirname "$(dirname "$PACK_ROOT")")"
elif is_comfy "$HOME/comfy/ComfyUI"; then
  COMFY="$HOME/comfy/ComfyUI"
fi

# What the venv must contain; a change of any of it rebuilds the venv.
REQ_SNAPSHOT="$(mktemp)"
trap 'rm -f "$REQ_SNAPSHOT"' EXIT
{
  "$PY_BOOT" --version 2>&1
  printf '%s\n' "${TORCH_PINS[@]}"
  cat "$PACK_ROOT/requirements-test.txt"
  if [ -n "$COMFY" ]; then grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt"; fi
} > "$REQ_SNAPSHOT"
STAMP="$VENV/.multiconcept-stamp"

if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQ_SNAPSHOT" "$STAMP"; then
  echo "[test.sh] setting up the test venv at $VENV (a few minutes the first time)"
  rm -rf "$VENV"
  "$PY_BOOT" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  echo "[test.sh] installing ${TORCH_PINS[*]}"
  "$VENV/bin/python" -m pip install -q "${TORCH_PINS[@]}"
  echo "[test.sh] installing requirements-test.txt"
  "$VENV/bin/python" -m pip install -q -r "$PACK_ROOT/requirements-test.txt"
  if [ -n "$COMFY" ]; then
    echo "[test.sh] installing ComfyUI's requirements ($COMFY)"
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$VENV/.comfy-requirements.txt"
    "$VENV/bin/python" -m pip install -q -r "$VENV/.comfy-requirements.txt"
  fi
  cp "$REQ_SNAPSHOT" "$STAMP"
else
  echo "[test.sh] reusing the test venv at $VENV"
fi

if [ -n "$COMFY" ]; then
  export COMFYUI_PATH="$COMFY"
  echo "[test.sh] ComfyUI: $COMFY"
else
  echo "[test.sh] no ComfyUI checkout found: unit tests only (set COMFYUI_PATH to run the rest)"
fi

cd "$PACK_ROOT"
set +e
"$VENV/bin/python" -m pytest tests -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test.sh] pytest collected no tests; treating as success"
  rc=0
fi
exit "$rc"
