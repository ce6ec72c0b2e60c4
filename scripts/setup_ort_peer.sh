#!/usr/bin/env bash
# A separate venv for bench/decode.py's ONNX Runtime peer: optimum-onnx pins transformers 4.x, which
# cannot share a venv with edgevlm's test dependencies (transformers 5.x).
#   scripts/setup_ort_peer.sh [VENV_DIR]   then   python bench/decode.py --ort-python VENV_DIR/bin/python
set -euo pipefail
VENV=${1:-.venv-ort}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq torch==2.13.0   # the CPU wheel first, as everywhere in this project
"$VENV/bin/python" -m pip install -qq "optimum-onnx[onnxruntime]==0.1.0"
"$VENV/bin/python" -c "import optimum.onnxruntime, onnxruntime; print('ORT peer ready: onnxruntime', onnxruntime.__version__)"
