#!/usr/bin/env bash
# Runs the test suite on a fresh machine:  bash scripts/test.sh [pytest args]
#
#  * ComfyUI is looked for where tests/support/locate.py looks: $COMFYUI_PATH (if set, only there), else the
#    ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>), else ~/comfy/ComfyUI. Without one, only the
#    unit tests run (the others are skipped with one line saying why).
#  * A virtual environment at ${MULTICONCEPT_VENV:-~/.cache/multi-concept/venv-py311} gets torch 2.14.1 +
#    torchvision 0.29.1, requirements-test.txt and, when ComfyUI is found, ComfyUI's requirements.txt (minus
#    torch/torchvision/torchaudio, so the pinned torch is kept). A stamp file in the venv holds hashes of
#    what went in: a different python, torch pin or requirements-test.txt, or a different ComfyUI
#    requirements.txt than the one installed before, recreates the venv. A unit-only run reuses a venv that
#    also has ComfyUI's requirements.
#  * Then `python -m pytest tests "$@"` from the repo root. Exit code 5 (nothing collected) counts as success.
set -euo pipefail

PACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MULTICONCEPT_VENV:-$HOME/.cache/multi-concept/venv-py311}"
PY_BOOT="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
STAMP="$VENV/.multiconcept-stamp"
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "[test.sh] $*"; }

# pip, quiet, minus the local mirror's "Location ... is ignored" chatter; pip's exit status is kept (pipefail).
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

hash_of() { "$PY_BOOT" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'; }

is_comfy() { [ -n "$1" ] && [ -f "$1/comfy/model_patcher.py" ] && [ -f "$1/nodes.py" ]; }

# --- where is ComfyUI (same order as tests/support/locate.py) -------------------------------------------
COMFY=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  if is_comfy "$COMFYUI_PATH"; then COMFY="$(cd "$COMFYUI_PATH" && pwd)"; fi
elif [ "$(basename "$(dirname "$PACK_ROOT")")" = "custom_nodes" ] && is_comfy "$(dirname "$(dirname "$PACK_ROOT")")"; then
  COMFY="$(dirname "$(dirname "$PACK_ROOT")")"
elif is_comfy "$HOME/comfy/ComfyUI"; then
  COMFY="$HOME/comfy/ComfyUI"
fi

# --- the venv ------------------------------------------------------------------------------------------
command -v "$PY_BOOT" >/dev/null || { echo "[test.sh] $PY_BOOT not found (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
COMFY_REQS="$(mktemp)"
trap 'rm -f "$COMFY_REQS"' EXIT

BASE_HASH="$({ "$PY_BOOT" --version 2>&1; printf '%s\n' "${TORCH_PINS[@]}"; cat "$PACK_ROOT/requirements-test.txt"; } | hash_of)"
COMFY_HASH=""
if [ -n "$COMFY" ]; then
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$' "$COMFY/requirements.txt" > "$COMFY_REQS" || true
  COMFY_HASH="$(hash_of < "$COMFY_REQS")"
fi

stamp_get() { [ -f "$STAMP" ] && sed -n "s/^$1=//p" "$STAMP" || true; }
stamp_write() { printf 'base=%s\ncomfy=%s\n' "$1" "$2" > "$STAMP"; }
OLD_BASE="$(stamp_get base)"
OLD_COMFY="$(stamp_get comfy)"

recreate=""
if [ ! -x "$VENV/bin/python" ]; then
  recreate="no venv yet"
elif [ "$OLD_BASE" != "$BASE_HASH" ]; then
  recreate="python, torch pin or requirements-test.txt changed"
elif [ -n "$COMFY_HASH" ] && [ -n "$OLD_COMFY" ] && [ "$OLD_COMFY" != "$COMFY_HASH" ]; then
  recreate="ComfyUI's requirements.txt changed"
fi

if [ -n "$recreate" ]; then
  say "setting up test venv at $VENV ($recreate; a few minutes)…"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY_BOOT" -m venv "$VENV"
  pip_install --upgrade pip >/dev/null || true
  say "installing ${TORCH_PINS[*]}…"
  pip_install "${TORCH_PINS[@]}"
  say "installing requirements-test.txt…"
  pip_install -r "$PACK_ROOT/requirements-test.txt" "${TORCH_PINS[@]}"
  stamp_write "$BASE_HASH" ""
  OLD_COMFY=""
else
  say "reusing test venv at $VENV"
fi

if [ -n "$COMFY_HASH" ] && [ "$OLD_COMFY" != "$COMFY_HASH" ]; then
  say "installing ComfyUI's requirements ($COMFY/requirements.txt, without torchaudio)…"
  pip_install -r "$COMFY_REQS" "${TORCH_PINS[@]}"
  stamp_write "$BASE_HASH" "$COMFY_HASH"
fi

# The browser tests (tests/e2e/test_regions_widget.py) drive Debian's Chromium; install it when we may.
if [ -n "$COMFY" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium for the browser tests…"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || say "could not install chromium; the browser tests will be skipped"
  else
    say "chromium not found and not root: the browser tests will be skipped (apt-get install chromium)"
  fi
fi

# --- pytest --------------------------------------------------------------------------------------------
if [ -n "$COMFY" ]; then
  export COMFYUI_PATH="$COMFY"
  say "ComfyUI: $COMFY"
else
  say "no ComfyUI found: unit tests only"
fi

cd "$PACK_ROOT"
# `tests` unless the caller names test paths itself (else pytest would run everything plus those).
targets=(tests)
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then targets=(); break; fi ;;
  esac
done

set +e
"$VENV/bin/python" -m pytest "${targets[@]}" -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  say "pytest collected no tests; treating that as success"
  rc=0
fi
exit "$rc"
