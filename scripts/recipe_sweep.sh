#!/usr/bin/env bash
# The balance sweep that chose the worker's default recipe (README, "Choosing the recipe").
# cifar10-b0-s5 on 1,000 training images per class, 3 epochs per step, ResNet-32, seed 1993:
# each variant changes one balance knob of learner/core/config.py against today's recipe.
# Usage: scripts/recipe_sweep.sh [OUT]   (about 3 minutes a run on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/recipe_sweep}
COMMON=(--protocol cifar10-b0-s5 --max-train-per-class 1000 --epochs 3 --min-steps 0 --threads 2 --no-progress)
source scripts/bench_runs.sh
# "today": the recipe before this change (adaptive lambda uncapped, masked absent classes).
run m500-bsce-today --memory 500 --distill-cap 1
run m500-bsce-cap0.5 --memory 500 --distill-cap 0.5
run m500-ce --memory 500 --method ce --distill-cap 1
run m0-bsce-today --memory 0 --distill-cap 1
run m0-bsce-cap0.5 --memory 0 --distill-cap 0.5
run m0-bsce-absent20 --memory 0 --absent-count 20 --distill-cap 1
run m0-bsce-absent20-cap0.5 --memory 0 --absent-count 20 --distill-cap 0.5
