#!/usr/bin/env bash
# cifar10-b0-s5 at one budget (1,000 training images a class, at least 3 epochs and the
# default minimum of 150 optimizer steps a step), ResNet-32, seed 1993: the default recipe over
# three class orders with memory 2,000, 500 and 0, then, on the protocol's own order, the
# paper's CE baseline and the recipe before the balance controls ("today": adaptive lambda
# uncapped). The default-recipe runs come first because the balance target is judged on them.
# About 5 minutes a run on 2 idle cores.
# Usage: [PC=N|all] [MEMORIES="2000 500 0"] [RECIPES="default today ce"] scripts/balance_runs.sh
#        [OUT] [EXTRA FLAGS...]
#   (e.g. --min-steps 0 for the 2026-11-29 proxy table in results/balance/; PC=all
#   --min-steps 600 for results/balance_full_s600/). PC: training images a class (all: every
#   one); MEMORIES and RECIPES: the memory sizes and recipes to run, so that two instances can
#   share the work (a run's files do not depend on which instance ran it, or when).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/balance_steps150}
shift || true
PC=${PC:-1000}
MEMORIES=${MEMORIES:-2000 500 0}
RECIPES=${RECIPES:-default today ce}
CAP=()
[ "$PC" != all ] && CAP=(--max-train-per-class "$PC")
COMMON=(--protocol cifar10-b0-s5 "${CAP[@]}" --epochs 3 --threads 2 --no-progress "$@")
source scripts/bench_runs.sh
wants() { [[ " $RECIPES " == *" $1 "* ]]; }
for m in $MEMORIES; do
  if wants default; then run "m$m-default-orders3" --memory "$m" --orders 3; fi
done
for m in $MEMORIES; do
  if wants today; then run "m$m-today" --memory "$m" --distill-cap 1; fi
  if wants ce; then run "m$m-ce" --memory "$m" --method ce --distill-cap 1; fi
done
