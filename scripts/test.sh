#!/usr/bin/env bash
# Runs the test suite on a fresh machine:  bash scripts/test.sh [pytest args]
#
#  * ComfyUI is looked for where tests/support/locate.py looks: $COMFYUI_PATH (if set, only there; a set
#    but wrong COMFYUI_PATH is an error), else the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>),
#    else ~/comfy/ComfyUI. When none is found, the ComfyUI release pinned in pyproject.toml
#    ([tool.multiconcept] comfyui_version) is fetched into ~/comfy/ComfyUI with a shallow git clone of its
#    tag. If that fails (no network), one line says so and only the unit tests run.
#    MULTICONCEPT_COMFYUI_VERSION=latest (or another version) fetches that one instead (the CI matrix uses
#    it); MULTICONCEPT_COMFYUI_REPO changes where it is cloned from.
#  * A virtual environment at ${MULTICONCEPT_VENV:-~/.cache/multi-concept/venv-py311} gets torch 2.14.1 +
#    torchvision 0.29.1 (from $MULTICONCEPT_TORCH_INDEX when set, e.g. PyTorch's CPU index), the test
#    requirements and, when ComfyUI is found, ComfyUI's requirements.txt (minus torch/torchvision/torchaudio,
#    so the pinned torch is kept). A stamp file in the venv records what went in: a different python, torch
#    pin or requirements-test.txt recreates the venv; a different ComfyUI requirements.txt is installed on top.
#  * Lint: `ruff check` and `ruff format --check` (ruff pinned in requirements-test.txt); a lint failure
#    fails the run after the tests ran. MULTICONCEPT_LINT=0 skips it.
#  * Then `python -m pytest tests "$@"` from the repo root in two worker processes (pytest-xdist: the e2e tests
#    share one worker and its ComfyUI server, other tests go a module at a time; MULTICONCEPT_WORKERS=1 or
#    `-p no:xdist` for one process), ending with the table of the 30 slowest tests (`--durations=30`, unless
#    "$@" names its own). Exit code 5 (nothing collected) counts as success.
set -euo pipefail

PACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MULTICONCEPT_VENV:-$HOME/.cache/multi-concept/venv-py311}"
PY_BOOT="${PYTHON:-python3}"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
STAMP="$VENV/.multiconcept-stamp"
COMFY_REPO="${MULTICONCEPT_COMFYUI_REPO:-https://github.com/Comfy-Org/ComfyUI}"
COMFY_HOME_DIR="$HOME/comfy/ComfyUI"
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "[test.sh] $*"; }
die() { echo "[test.sh] $*" >&2; exit 2; }

# pip, quiet, minus the local mirror's "Location ... is ignored" chatter; pip's exit status is kept (pipefail).
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

hash_of() { "$PY_BOOT" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'; }

is_comfy() { [ -n "$1" ] && [ -f "$1/comfy/model_patcher.py" ] && [ -f "$1/nodes.py" ]; }

pinned_comfyui() { sed -n 's/^comfyui_version *= *"\([^"]*\)".*/\1/p' "$PACK_ROOT/pyproject.toml" | head -n 1; }

# The newest release tag (vX.Y.Z) of the ComfyUI repository, without the "v".
latest_comfyui() {
  git ls-remote --tags --refs "$COMFY_REPO" 'v*' 2>/dev/null | sed -n 's#.*refs/tags/v\([0-9]*\.[0-9]*\.[0-9]*\)$#\1#p' \
    | sort -t . -k1,1n -k2,2n -k3,3n | tail -n 1
}

# Shallow clone of tag v$1 into ~/comfy/ComfyUI. Returns non-zero (having said why) when it cannot.
fetch_comfyui() {
  local version="$1" tmp
  if ! command -v git >/dev/null 2>&1; then
    say "git not found, cannot fetch ComfyUI $version: unit tests only"
    return 1
  fi
  if [ -e "$COMFY_HOME_DIR" ] && [ -n "$(ls -A "$COMFY_HOME_DIR" 2>/dev/null)" ]; then
    say "$COMFY_HOME_DIR exists but is not a ComfyUI checkout; not touching it: unit tests only"
    return 1
  fi
  mkdir -p "$(dirname "$COMFY_HOME_DIR")"
  tmp="$(mktemp -d "$(dirname "$COMFY_HOME_DIR")/.ComfyUI.fetch.XXXXXX")"
  say "no ComfyUI found: fetching ComfyUI $version (tag v$version of $COMFY_REPO) into $COMFY_HOME_DIR…"
  if GIT_TERMINAL_PROMPT=0 git -c advice.detachedHead=false clone -q --depth 1 --branch "v$version" \
    "$COMFY_REPO" "$tmp/ComfyUI" >"$tmp.log" 2>&1 && is_comfy "$tmp/ComfyUI"; then
    rm -rf "$COMFY_HOME_DIR" && mv "$tmp/ComfyUI" "$COMFY_HOME_DIR"
    rm -rf "$tmp" "$tmp.log"
    return 0
  fi
  say "could not fetch ComfyUI $version from $COMFY_REPO ($(grep -v '^\s*$' "$tmp.log" | tail -n 1 || true)): unit tests only"
  rm -rf "$tmp" "$tmp.log"
  return 1
}

# --- where is ComfyUI (same order as tests/support/locate.py) -------------------------------------------
COMFY=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  is_comfy "$COMFYUI_PATH" || die "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no comfy/model_patcher.py and nodes.py there). Fix the path, or unset COMFYUI_PATH to use ~/comfy/ComfyUI (fetched if missing)."
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
elif [ "$(basename "$(dirname "$PACK_ROOT")")" = "custom_nodes" ] && is_comfy "$(dirname "$(dirname "$PACK_ROOT")")"; then
  COMFY="$(dirname "$(dirname "$PACK_ROOT")")"
elif is_comfy "$COMFY_HOME_DIR"; then
  COMFY="$COMFY_HOME_DIR"
else
  want="${MULTICONCEPT_COMFYUI_VERSION:-$(pinned_comfyui)}"
  [ -n "$want" ] || die "pyproject.toml has no [tool.multiconcept] comfyui_version"
  if [ "$want" = latest ]; then
    want="$(latest_comfyui || true)"
    [ -n "$want" ] || say "could not list ComfyUI's releases at $COMFY_REPO (no network?): unit tests only"
  fi
  if [ -n "$want" ] && fetch_comfyui "$want"; then
    COMFY="$COMFY_HOME_DIR"
  fi
fi

# --- the venv ------------------------------------------------------------------------------------------
command -v "$PY_BOOT" >/dev/null || die "$PY_BOOT not found (set PYTHON=/path/to/python3.11)"
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
fi

if [ -n "$recreate" ]; then
  say "setting up test venv at $VENV ($recreate; a few minutes)…"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY_BOOT" -m venv "$VENV"
  pip_install --upgrade pip >/dev/null || true
  say "installing ${TORCH_PINS[*]}…"
  if [ -n "${MULTICONCEPT_TORCH_INDEX:-}" ]; then
    pip_install "${TORCH_PINS[@]}" --index-url "$MULTICONCEPT_TORCH_INDEX" --extra-index-url https://pypi.org/simple
  else
    pip_install "${TORCH_PINS[@]}"
  fi
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
      || say "could not install chromium (the browser tests will fail: install Debian's chromium package)"
  else
    say "chromium not found and not root: the browser tests will fail (apt-get install chromium)"
  fi
fi

# --- lint ----------------------------------------------------------------------------------------------
cd "$PACK_ROOT"
lint_rc=0
if [ "${MULTICONCEPT_LINT:-1}" != 0 ]; then
  if "$VENV/bin/python" -m ruff --version >/dev/null 2>&1; then
    say "lint: $("$VENV/bin/python" -m ruff --version) check + format --check"
    "$VENV/bin/python" -m ruff check --quiet . || lint_rc=1
    "$VENV/bin/python" -m ruff format --check --quiet . || lint_rc=1
  else
    say "ruff is missing from the test venv ($VENV); rerun after deleting it"
    lint_rc=1
  fi
fi

# --- pytest --------------------------------------------------------------------------------------------
if [ -n "$COMFY" ]; then
  export COMFYUI_PATH="$COMFY"
  say "ComfyUI: $COMFY"
else
  unset COMFYUI_PATH
  say "no ComfyUI: unit tests only"
fi
export MULTICONCEPT_VENV="$VENV"

# `tests` unless the caller names test paths itself (else pytest would run everything plus those).
targets=(tests)
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then targets=(); break; fi ;;
  esac
done

# The duration table at the end (the slowest tests), unless the caller chose their own.
extra=(--durations=30 --durations-min=1)
for arg in "$@"; do
  case "$arg" in --durations*) extra=() ;; esac
done

# Two workers (pytest-xdist; every e2e test on one, other tests a module at a time), unless the caller chose:
# MULTICONCEPT_WORKERS=N (0 or 1: one process), or -n / -p no:xdist among the arguments.
workers="${MULTICONCEPT_WORKERS:-2}"
for arg in "$@"; do
  case "$arg" in -n | -n[0-9]* | --numprocesses* | --dist* | no:xdist) workers=1 ;; esac
done
if [ "$workers" -gt 1 ]; then
  extra+=(-n "$workers")
  # The cores shared out among the workers (and the e2e server and processes they start): with torch's
  # default of a thread per core in every process, a first two-worker run on two cores had done a quarter of
  # the suite after 17 minutes.
  cores="$(nproc 2>/dev/null || echo 2)"
  threads=$((cores / workers))
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"
  say "pytest with $workers workers, OMP_NUM_THREADS=$OMP_NUM_THREADS (MULTICONCEPT_WORKERS=1 for one process)"
fi

set +e
"$VENV/bin/python" -m pytest "${targets[@]}" -p no:cacheprovider "${extra[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  say "pytest collected no tests; treating that as success"
  rc=0
fi
if [ "$lint_rc" -ne 0 ]; then
  say "lint failed (see the ruff output above; \`ruff format .\` fixes formatting)"
  [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
