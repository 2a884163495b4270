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

# pip, minus the mirror's "Location ... is ignored" chatter; pip's own exit status is kept (pipefail).
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

is_comfy() { [ -n "$1" ] && [ -f "$1/comfy/model_patcher.py" ] && [ -f "$1/nodes.py" ]; }
COMFY=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  is_comfy "$COMFYUI_PATH" && COMFY="$COMFYUI_PATH"
elif [ "$(basename "$(dirname "$PACK_ROOT")")" = "custom_nodes" ] && is_comfy "$(dirname "$(dirname "$PACK_ROOT")")"; then
  COMFY="$(dirname "$(dirname "$PACK_ROOT")")"
elif is_comfy "$HOME/comfy/ComfyUI"; then
  COMFY="$HOME/comfy/ComfyUI"
fi

# What the venv must contain. A change of the base (python, torch, test requirements) rebuilds it; ComfyUI's
# requirements are added on top when a checkout is found (a unit-only run reuses a venv that has them).
BASE_SNAPSHOT="$(mktemp)"; COMFY_SNAPSHOT="$(mktemp)"
trap 'rm -f "$BASE_SNAPSHOT" "$COMFY_SNAPSHOT"' EXIT
{ "$PY_BOOT" --version 2>&1; printf '%s\n' "${TORCH_PINS[@]}"; cat "$PACK_ROOT/requirements-test.txt"; } > "$BASE_SNAPSHOT"
if [ -n "$COMFY" ]; then
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$COMFY_SNAPSHOT"
fi

if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$BASE_SNAPSHOT" "$VENV/.stamp-base"; then
  echo "[test.sh] setting up the test venv at $VENV (a few minutes the first time)"
  rm -rf "$VENV"
  "$PY_BOOT" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  echo "[test.sh] installing ${TORCH_PINS[*]}"
  pip_install "${TORCH_PINS[@]}"
  echo "[test.sh] installing requirements-test.txt"
  pip_install -r "$PACK_ROOT/requirements-test.txt"
  cp "$BASE_SNAPSHOT" "$VENV/.stamp-base"
else
  echo "[test.sh] reusing the test venv at $VENV"
fi
if [ -n "$COMFY" ] && ! cmp -s "$COMFY_SNAPSHOT" "$VENV/.stamp-comfy"; then
  echo "[test.sh] installing ComfyUI's requirements ($COMFY)"
  pip_install -r "$COMFY_SNAPSHOT" "${TORCH_PINS[@]}"
  cp "$COMFY_SNAPSHOT" "$VENV/.stamp-comfy"
fi

# The widget tests drive Debian's Chromium (no browser download); install it when we may.
if [ -n "$COMFY" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test.sh] installing Debian's chromium for the browser tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || echo "[test.sh] could not install chromium; the browser tests will be skipped"
  else
    echo "[test.sh] chromium not found and not root: the browser tests will be skipped (apt-get install chromium)"
  fi
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
