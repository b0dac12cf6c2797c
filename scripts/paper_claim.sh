#!/usr/bin/env bash
# The paper's claim on real data: BSCE vs CE on cifar10-b0-s5, ResNet-32, with a 2,000
# exemplar memory (fixed_total) and with none, distillation on, the same epochs and seed.
# PARALLEL=1 runs the four at once with one torch thread each (same total CPU, less wall).
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-3}
DEVICE=${DEVICE:-auto}
OUT=${OUT:-results}
PARALLEL=${PARALLEL:-0}
run() {
  .venv/bin/python -m learner.bench --protocol cifar10-b0-s5 --method "$1" --memory "$2" \
    --epochs "$EPOCHS" --device "$DEVICE" --out "$OUT" --no-progress "${@:3}"
}
for memory in 2000 0; do
  for method in bsce ce; do
    if [ "$PARALLEL" = 1 ]; then
      run "$method" "$memory" --threads 1 > "$OUT/log-$method-$memory.txt" 2>&1 &
    else
      run "$method" "$memory"
    fi
  done
done
wait
.venv/bin/python -m learner.plot "$OUT"/cifar10-b0-s5_*_e"$EPOCHS"_*.json --out "$OUT/cifar10-b0-s5-bsce-vs-ce.png"
