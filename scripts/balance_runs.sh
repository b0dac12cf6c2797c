#!/usr/bin/env bash
# cifar10-b0-s5 at one budget (1,000 training images a class, 3 epochs a step, no step
# minimum), ResNet-32, seed 1993: the default recipe over three class orders with memory
# 2,000, 500 and 0, and on the protocol's own order the paper's CE baseline and the recipe
# before the balance controls ("today": adaptive lambda uncapped). About 3 minutes a run on
# 2 idle cores. Usage: scripts/balance_runs.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/balance}
COMMON=(--protocol cifar10-b0-s5 --max-train-per-class 1000 --epochs 3 --min-steps 0 --threads 2 --no-progress)
source scripts/bench_runs.sh
for m in 2000 500; do
  run "m$m-default-orders3" --memory "$m" --orders 3
  run "m$m-today" --memory "$m" --distill-cap 1
  run "m$m-ce" --memory "$m" --method ce --distill-cap 1
done
run m0-default-orders3 --memory 0 --orders 3
run m0-today --memory 0 --distill-cap 1
run m0-ce --memory 0 --method ce --distill-cap 1
