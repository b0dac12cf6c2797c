#!/usr/bin/env bash
# Swap under load on this machine, end to end: a fresh server (BSCE_WORKERS API workers) and
# learner worker on an empty store, Locust prediction traffic while UPDATES new classes land,
# then both processes stopped and the store's keys deleted. Results in OUT (default results/).
#
#   scripts/swap_under_load.sh                         # resnet32 learner, 8 users, 5 updates
#   USERS=16 UPDATES=8 BACKBONE=resnet8 scripts/swap_under_load.sh
#   # the gate's drill: the default deployment (base model), good, bad (lr 10), good update
#   BASE=default EPOCHS=4 UPDATES=3 scripts/swap_under_load.sh --update-images 100 \
#       --update-epochs 0 --bad-update 1 --out results/swap_bad_update \
#       --update-classes airplane,automobile,ship
#
# Redis: REDIS_URL if set (a key prefix of our own is used and deleted afterwards), else the
# embedded Redis under a temporary BSCE_DATA_HOME. Extra arguments go to
# `python -m loadtest.swap_under_load`.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/stack.sh
USERS=${USERS:-8}
SPAWN_RATE=${SPAWN_RATE:-4}
UPDATES=${UPDATES:-5}
BACKBONE=${BACKBONE:-resnet32}
MEMORY=${MEMORY:-2000}
EPOCHS=${EPOCHS:-1}
OUT=${OUT:-results}
PORT=${PORT:-$(free_port)}

stack_start swap "$PORT" --base-model "${BASE:-none}" --backbone "$BACKBONE" --memory "$MEMORY" --epochs "$EPOCHS"

$PY -m loadtest.swap_under_load --url "http://127.0.0.1:$PORT" --token "$TOKEN" \
    --users "$USERS" --spawn-rate "$SPAWN_RATE" --updates "$UPDATES" --out "$OUT" "$@"
