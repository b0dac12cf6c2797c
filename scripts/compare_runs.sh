#!/usr/bin/env bash
# The methods comparison of cifar10-b0-s5 (issue 14) at the budget of the balance series
# (scripts/balance_runs.sh): 1,000 training images a class, 3 epochs and the default minimum
# of 150 optimizer steps a step, ResNet-32, seed 1993, the protocol's class order. Memory
# 2,000, then 500, then 0: every method that applies, one order each. The default recipe's
# three-order runs of the balance series are the same runs (same recipe and budget), so they
# are copied in rather than trained again. learner.compare skips a run whose result exists, so
# the series resumes where a session ended. About 4 minutes a run on 2 idle cores.
# Usage: scripts/compare_runs.sh [OUT] [BALANCE_OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/compare/cifar10-b0-s5_pc1000_e3}
BALANCE=${2:-results/balance_steps150}
COMMON=(--protocol cifar10-b0-s5 --max-train-per-class 1000 --epochs 3 --threads 2 --no-progress)
for m in 2000 500 0; do
  mkdir -p "$OUT/m$m"
  if [ -d "$BALANCE/m$m-default-orders3" ]; then
    cp -n "$BALANCE/m$m-default-orders3"/cifar10-b0-s5_bsce_*_cpu.json "$OUT/m$m/" 2>/dev/null || true
  fi
  .venv/bin/python -m learner.compare "${COMMON[@]}" --memory "$m" --out "$OUT/m$m" \
    | tee -a "$OUT/m$m.txt"
done
