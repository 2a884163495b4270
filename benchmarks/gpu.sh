#!/usr/bin/env bash
# Every benchmark on one GPU with full-size random models (SD1.5 and SDXL), in under 8 minutes on an H100,
# from a bare machine that has Python and PyTorch but no network. Prints the JSON figure lines
# (DESIGN.md §5) and writes them to OUT/figures.jsonl, each benchmark's log to OUT/<benchmark>.log.
#
#   1. Here, on a machine with PyPI (once):
#        bash benchmarks/gpu.sh --prepare [--python 3.12]
#      copies ComfyUI ($COMFYUI_PATH or ~/comfy/ComfyUI, without .git and its own tests) to .gpu/ComfyUI,
#      downloads the wheels a bare PyTorch machine lacks (what ComfyUI and the pack import: torchsde, av,
#      open_clip_torch, segment-anything, pydantic, ...) for CPython --python (default 3.12, the GPU image's)
#      into .gpu/wheels, and lists .gpu/ in .git/info/exclude. About 55 MiB; nothing is committed.
#   2. There, with the pack's working tree and .gpu carried along (the device tool: carry [".gpu"]):
#        bash benchmarks/gpu.sh [--out DIR] [--device cuda|cpu] [--quick] [--only NAME,NAME]
#      installs the wheels that are missing into a temporary folder (offline), sets COMFYUI_PATH to
#      .gpu/ComfyUI (unless set), and runs the benchmarks one after another, each under a time limit
#      that keeps the whole run under 8 minutes (a benchmark that runs out says so in the summary).
#   On a CPU, as a check of the script and every benchmark's --device path:
#        bash benchmarks/gpu.sh --device cpu --quick
#      (each benchmark at its --quick sizes; SDXL at a tenth of its widths; no time limits). Without .gpu it
#      uses the test venv (scripts/test.sh makes it) or $PYTHON and the ComfyUI the tests use.
set -uo pipefail

PACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_DIR="$PACK_ROOT/.gpu"
DEVICE=cuda
QUICK=""
OUT=""
ONLY=""
PREPARE=""
PY_VERSION=3.12

say() { echo "[gpu.sh] $*"; }
die() { echo "[gpu.sh] $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) PREPARE=1 ;;
    --python) PY_VERSION="$2"; shift ;;
    --device) DEVICE="$2"; shift ;;
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
case "$DEVICE" in cuda|cpu) ;; *) die "--device is cuda or cpu, not $DEVICE" ;; esac

# Pure-Python needs (and av, whose wheel carries its libraries) that a PyTorch image may lack:
# "wheel name|import name". ComfyUI's own heavy ones (torch, numpy, transformers, scipy, ...) must be there.
WHEELS=(
  "torchsde|torchsde" "trampoline|trampoline" "av|av" "open_clip_torch|open_clip" "ftfy|ftfy" "wcwidth|wcwidth"
  "segment-anything|segment_anything" "pydantic|pydantic" "pydantic-core|pydantic_core"
  "annotated-types|annotated_types" "typing-inspection|typing_inspection" "einops|einops" "psutil|psutil"
)

# ----------------------------------------------------------------------------------------------- prepare
if [ -n "$PREPARE" ]; then
  command -v git >/dev/null || die "git is needed to copy ComfyUI"
  comfy="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
  [ -f "$comfy/comfy/model_patcher.py" ] || die "no ComfyUI at $comfy: set COMFYUI_PATH"
  rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/wheels"
  say "copying ComfyUI from $comfy to .gpu/ComfyUI (no .git, tests, api nodes)…"
  (cd "$comfy" && tar --exclude=.git --exclude=./tests --exclude=./tests-unit --exclude=./comfy_api_nodes \
    --exclude='__pycache__' --exclude=./models --exclude=./output --exclude=./input --exclude=./temp \
    --exclude=./user -cf - .) | (mkdir -p "$GPU_DIR/ComfyUI" && cd "$GPU_DIR/ComfyUI" && tar -xf -)
  # ComfyUI's folder_paths expects these; an empty api-nodes package keeps its optional import quiet
  mkdir -p "$GPU_DIR/ComfyUI/models" "$GPU_DIR/ComfyUI/comfy_api_nodes"
  say "downloading wheels for CPython $PY_VERSION (manylinux x86_64)…"
  for entry in "${WHEELS[@]}"; do
    name="${entry%%|*}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$GPU_DIR/wheels" "$name" 2>&1 | grep -v "^WARNING: Location 'file:" || true
  done
  exclude="$PACK_ROOT/.git/info/exclude"
  if [ -d "$PACK_ROOT/.git" ] && ! grep -qx '/.gpu/' "$exclude" 2>/dev/null; then
    mkdir -p "$(dirname "$exclude")" && echo '/.gpu/' >> "$exclude"
  fi
  say "ready: $(du -sh "$GPU_DIR" | cut -f1) in .gpu ($(ls "$GPU_DIR/wheels" | wc -l) wheels). Carry .gpu to the GPU machine."
  exit 0
fi

# ----------------------------------------------------------------------------------------------- python
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ ! -d "$GPU_DIR" ] && [ -x "${MULTICONCEPT_VENV:-$HOME/.cache/multi-concept/venv-py311}/bin/python" ]; then
  PY="${MULTICONCEPT_VENV:-$HOME/.cache/multi-concept/venv-py311}/bin/python"
else
  PY=python3
fi
"$PY" -c "import torch" 2>/dev/null || die "$PY has no torch: set PYTHON=/path/to/python with PyTorch"

if [ -d "$GPU_DIR/wheels" ]; then
  site="$(mktemp -d /tmp/multiconcept-gpu-site.XXXXXX)"
  missing=()
  for entry in "${WHEELS[@]}"; do
    name="${entry%%|*}"; module="${entry##*|}"
    "$PY" -c "import $module" 2>/dev/null && continue
    wheel=$(ls "$GPU_DIR/wheels/$(echo "$name" | tr - _)"-*.whl 2>/dev/null | head -n 1)
    [ -n "$wheel" ] && missing+=("$wheel")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${#missing[@]} carried wheel(s) into $site (offline)…"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${missing[@]}" \
      || die "could not install the carried wheels (run --prepare with --python $("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'))"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  [ -n "${COMFYUI_PATH:-}" ] || export COMFYUI_PATH="$GPU_DIR/ComfyUI"
fi
for entry in "${WHEELS[@]}"; do
  module="${entry##*|}"
  "$PY" -c "import $module" 2>/dev/null || die "Python module $module is missing: run 'bash benchmarks/gpu.sh --prepare' on a machine with PyPI and carry .gpu along"
done
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  die "--device cuda: torch sees no CUDA GPU here (use --device cpu --quick for a CPU check)"
fi

OUT="${OUT:-$PACK_ROOT/benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
FIGURES="$OUT/figures.jsonl"
: > "$FIGURES"
export MULTICONCEPT_FIGURES="$FIGURES" PYTHONUNBUFFERED=1 TQDM_DISABLE=1

# -------------------------------------------------------------------------------------------- the plan
# name | seconds allowed on the GPU (they add up to 450 s: with start-ups, under 8 minutes) | arguments on the
# GPU (full sizes) | arguments for --quick. Each benchmark also gets --device and --figures.
PLAN=(
  "scoped_lora_sd15|40|bench_scoped_lora.py --size 512 --steps 12 --repeats 3|bench_scoped_lora.py --quick"
  "scoped_lora_sdxl|70|bench_scoped_lora.py --family sdxl --size 1024 --steps 8 --repeats 2|bench_scoped_lora.py --family sdxl --quick"
  "mixofshow|45|bench_mixofshow.py --size 512 --steps 12 --repeats 3|bench_mixofshow.py --quick"
  "omg|40|bench_omg.py --size 512 --steps 15 --repeats 2|bench_omg.py --quick"
  "lora_composer|45|bench_lora_composer.py --size 512 --steps 20 --repeats 2|bench_lora_composer.py --quick"
  "concept_conductor|45|bench_concept_conductor.py --size 512 --steps 20 --repeats 2 --concepts 1,2|bench_concept_conductor.py --quick"
  "fusion|40|bench_fusion.py --size 512 --steps 8 --concepts 2|bench_fusion.py --quick"
  "edlora|25|bench_edlora.py --size 512 --steps 12 --repeats 3|bench_edlora.py --quick"
  "training|30|bench_training.py --family sd15 --size 512 --steps 4|bench_training.py --family sd15 --quick"
  "training_sdxl|45|bench_training.py --family sdxl --size 1024 --steps 2 --repeats 1|bench_training.py --family sdxl --quick"
  "compare_methods|25|compare_methods.py --quick --out $OUT/compare|compare_methods.py --quick --out $OUT/compare"
)

say "device $DEVICE$([ -n "$QUICK" ] && echo ", --quick sizes"), ComfyUI ${COMFYUI_PATH:-as the tests find it}, python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
say "figures -> $FIGURES"
summary=()
start_all=$(date +%s)
for entry in "${PLAN[@]}"; do
  IFS='|' read -r name limit gpu_args quick_args <<< "$entry"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  args="$gpu_args"
  [ -n "$QUICK" ] && args="$quick_args"
  read -r -a argv <<< "$args"
  script="$PACK_ROOT/benchmarks/${argv[0]}"
  log="$OUT/$name.log"
  say "── $name: ${argv[*]} --device $DEVICE$([ "$DEVICE" = cuda ] && [ -z "$QUICK" ] && echo " (limit ${limit}s)")"
  t0=$(date +%s)
  if [ "$DEVICE" = cuda ] && [ -z "$QUICK" ]; then
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$script" "${argv[@]:1}" --device "$DEVICE" --figures "$FIGURES" > "$log" 2>&1
  else
    "$PY" "$script" "${argv[@]:1}" --device "$DEVICE" --figures "$FIGURES" > "$log" 2>&1
  fi
  rc=$?
  took=$(( $(date +%s) - t0 ))
  case "$rc" in
    0) status="ok" ;;
    124|137) status="ran out of its ${limit}s" ;;
    *) status="failed (exit $rc): $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)" ;;
  esac
  grep '^{"metric"' "$log" || true
  summary+=("$(printf '%-20s %5ss  %s' "$name" "$took" "$status")")
done
say "── summary ($(( $(date +%s) - start_all ))s in all; logs and figures.jsonl in $OUT)"
failed=0
for line in "${summary[@]}"; do
  echo "  $line"
  [[ "$line" == *"  ok" ]] || failed=1
done
say "$(wc -l < "$FIGURES") figure lines in $FIGURES"
exit "$failed"
