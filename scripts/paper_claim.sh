#!/usr/bin/env bash
# The paper's claim on real data: BSCE vs CE on cifar10-b0-s5, ResNet-32, with a 2,000
# exemplar memory (fixed_total) and with none, distillation on, the same epochs and seed.
# One run after the other so that each has the machine to itself.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-3}
DEVICE=${DEVICE:-auto}
OUT=${OUT:-results}
for memory in 2000 0; do
  for method in bsce ce; do
    .venv/bin/python -m learner.bench --protocol cifar10-b0-s5 --method "$method" \
      --memory "$memory" --epochs "$EPOCHS" --device "$DEVICE" --out "$OUT" --no-progress
  done
done
.venv/bin/python -m learner.plot "$OUT"/cifar10-b0-s5_*_e"$EPOCHS"_*.json --out "$OUT/cifar10-b0-s5-bsce-vs-ce.png"
