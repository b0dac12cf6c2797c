#!/usr/bin/env bash
# A protocol replayed through the HTTP API next to the offline runner's result, end to end:
# a fresh server and learner worker on an empty store, `python -m loadtest.replay --compare`,
# then both processes stopped. The worker gets the offline run's recipe, seed and torch
# thread count, so its training is the offline run's (see loadtest/README.md).
#
#   scripts/replay_vs_offline.sh     # cifar10-b0-s5, BSCE, memory 2000, 3 epochs, seed 1993
#   OFFLINE=results/cifar10-b0-s5_ce_mem0_resnet32_e3_seed1993_cpu.json METHOD=ce MEMORY=0 \
#       THREADS=1 scripts/replay_vs_offline.sh
#
# Redis: REDIS_URL if set (a key prefix of our own is used and deleted afterwards), else the
# embedded Redis under a temporary BSCE_DATA_HOME. Extra arguments go to
# `python -m loadtest.replay`.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/stack.sh
PROTOCOL=${PROTOCOL:-cifar10-b0-s5}
METHOD=${METHOD:-bsce}
MEMORY=${MEMORY:-2000}
EPOCHS=${EPOCHS:-3}
SEED=${SEED:-1993}
BACKBONE=${BACKBONE:-resnet32}
THREADS=${THREADS:-2}
OFFLINE=${OFFLINE:-results/${PROTOCOL}_${METHOD}_mem${MEMORY}_${BACKBONE}_e${EPOCHS}_seed${SEED}_cpu.json}
OUT=${OUT:-results}
PORT=${PORT:-$(free_port)}
# One step is one job: a cifar10 step is 10,000 images, about 31 MiB of JSON.
export BSCE_MAX_BODY_BYTES=${BSCE_MAX_BODY_BYTES:-67108864}
export BSCE_MAX_LEARN_IMAGES=${BSCE_MAX_LEARN_IMAGES:-10000}

stack_start replay "$PORT" --base-model none --backbone "$BACKBONE" --memory "$MEMORY" --epochs "$EPOCHS" \
    --method "$METHOD" --seed "$SEED" --threads "$THREADS"

# Several offline files: OFFLINE="a.json b.json" (the first is `comparison`).
# shellcheck disable=SC2086
$PY -m loadtest.replay --protocol "$PROTOCOL" --url "http://127.0.0.1:$PORT" --token "$TOKEN" \
    --method "$METHOD" --epochs "$EPOCHS" --memory "$MEMORY" --seed "$SEED" \
    --backbone "$BACKBONE" --out "$OUT" --compare $OFFLINE "$@"
