#!/usr/bin/env bash
# Install this pack into a ComfyUI and start it:  bash scripts/run-comfyui.sh [extra ComfyUI args]
#
#   * ComfyUI is taken from $COMFYUI_PATH, else the folder this pack sits in (ComfyUI/custom_nodes/<pack>),
#     else ~/comfy/ComfyUI; if there is none, comfy-cli installs one at ~/comfy/ComfyUI (needs internet).
#   * A virtual environment at ${MULTICONCEPT_VENV:-~/.cache/multi-concept/venv-py311} gets torch,
#     ComfyUI's requirements and this pack's requirements (skipped when already satisfied).
#   * The pack is linked into ComfyUI/custom_nodes/comfyui-multiconcept (an existing folder is left alone).
#   * ComfyUI starts on http://127.0.0.1:8188 (add --listen / --port to change); --cpu is added when no
#     CUDA GPU is visible.
set -euo pipefail

PACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MULTICONCEPT_VENV:-$HOME/.cache/multi-concept/venv-py311}"
PY_BOOT="${PYTHON:-python3}"

is_comfy() { [ -n "$1" ] && [ -f "$1/comfy/model_patcher.py" ] && [ -f "$1/nodes.py" ]; }

COMFY=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  is_comfy "$COMFYUI_PATH" || { echo "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no comfy/model_patcher.py)" >&2; exit 1; }
  COMFY="$COMFYUI_PATH"
elif [ "$(basename "$(dirname "$PACK_ROOT")")" = "custom_nodes" ] && is_comfy "$(dirname "$(dirname "$PACK_ROOT")")"; then
  COMFY="$(dirname "$(dirname "$PACK_ROOT")")"
elif is_comfy "$HOME/comfy/ComfyUI"; then
  COMFY="$HOME/comfy/ComfyUI"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[multi-concept] creating $VENV"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if [ -z "$COMFY" ]; then
  echo "[multi-concept] no ComfyUI found; installing one with comfy-cli at ~/comfy/ComfyUI"
  "$PY" -m pip install -q comfy-cli
  "$VENV/bin/comfy" --skip-prompt --workspace "$HOME/comfy/ComfyUI" install --cpu --skip-manager
  COMFY="$HOME/comfy/ComfyUI"
fi
echo "[multi-concept] ComfyUI: $COMFY"

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[multi-concept] installing torch"
  "$PY" -m pip install -q torch torchvision
fi
echo "[multi-concept] installing ComfyUI's and the pack's requirements"
grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$VENV/.comfy-requirements.txt"
"$PY" -m pip install -q -r "$VENV/.comfy-requirements.txt" -r "$PACK_ROOT/requirements.txt"

TARGET="$COMFY/custom_nodes/comfyui-multiconcept"
if [ "$(cd "$PACK_ROOT/.." && pwd)" != "$(cd "$COMFY/custom_nodes" 2>/dev/null && pwd)" ]; then
  if [ -e "$TARGET" ] || [ -L "$TARGET" ]; then
    echo "[multi-concept] $TARGET already exists; leaving it as it is"
  else
    ln -s "$PACK_ROOT" "$TARGET"
    echo "[multi-concept] linked $TARGET -> $PACK_ROOT"
  fi
fi

EXTRA=()
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  EXTRA+=(--cpu)
fi
cd "$COMFY"
echo "[multi-concept] starting ComfyUI: python main.py ${EXTRA[*]} $*"
exec "$PY" main.py "${EXTRA[@]}" "$@"
