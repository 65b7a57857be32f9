#!/usr/bin/env bash
# On a machine with a CUDA GPU: time the quick doctor and one 200-round run on cpu and on cuda, and check that the
# GPU's numbers match the CPU's within the tolerances benchmarks/gpu_compare.py states and derives.
#   bash benchmarks/gpu_check.sh                 # writes runs/gpu_check/ (times.txt, the runs, the doctors)
#   OUT=/tmp/g ROUNDS=200 GPU_JOBS=2 bash benchmarks/gpu_check.sh
# Not run by the fedgap authors so far: the machine it was written on has no GPU (docs/ray.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
ROUNDS=${ROUNDS:-200}
GPU_JOBS=${GPU_JOBS:-2}  # quick-doctor runs sharing the GPU at once
export NVIDIA_TF32_OVERRIDE=0  # float32 on the GPU as on the CPU (TF32 would keep 10 mantissa bits)

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA GPU on this machine; run it where there is one" >&2
  exit 1
fi
mkdir -p "$OUT"
: > "$OUT/times.txt"

timed() {  # timed NAME COMMAND...: runs it, its output in OUT/NAME.log, its wall time in OUT/times.txt
  local name=$1; shift
  local start end
  start=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "gpu_check: $name failed, see $OUT/$name.log" >&2; exit 1; }
  end=$(date +%s.%N)
  printf '%-12s %8.1f s\n' "$name" "$(echo "$end - $start" | bc)" | tee -a "$OUT/times.txt"
}

"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))' | tee -a "$OUT/times.txt"
for device in cpu cuda; do
  timed "short-$device" "$PY" -m fedgap run server.rounds=3 eval.every=1 engine.threads=1 "engine.device=$device" \
    --out "$OUT/short-$device" --overwrite --quiet
  timed "run-$device" "$PY" -m fedgap run "server.rounds=$ROUNDS" "engine.device=$device" \
    --out "$OUT/run-$device" --overwrite --quiet
done
timed doctor-cpu "$PY" -m fedgap doctor --preset quick --out "$OUT/doctor-cpu" --overwrite --quiet
timed doctor-cuda "$PY" -m fedgap doctor --preset quick engine.device=cuda --jobs "$GPU_JOBS" \
  --out "$OUT/doctor-cuda" --overwrite --quiet
"$PY" benchmarks/gpu_compare.py "$OUT"
