#!/usr/bin/env bash
# A separate venv for bench/decode.py's llama.cpp peer (llama-cpp-python, built from source here: the
# registry has no binary wheel). GGML_AMX=OFF: llama.cpp's AMX path crashed on this project's Intel
# Xeon (issue 20), and an AMD EPYC has no AMX anyway; GGML_NATIVE (the default) compiles for this CPU,
# so the peer gets AVX-512 / VNNI where the CPU has them, as edgevlm's kernels do. About 10 minutes on
# two cores.
#   scripts/setup_llama_peer.sh [VENV_DIR]   then   python bench/decode.py --llama-python VENV_DIR/bin/python
set -euo pipefail
VENV=${1:-.venv-llama}
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq --upgrade pip
CMAKE_ARGS="-DGGML_AMX=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/python" -m pip install -qq --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama.cpp peer ready: llama-cpp-python', llama_cpp.__version__)"
