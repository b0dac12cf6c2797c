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

PY=.venv/bin/python
PROTOCOL=${PROTOCOL:-cifar10-b0-s5}
METHOD=${METHOD:-bsce}
MEMORY=${MEMORY:-2000}
EPOCHS=${EPOCHS:-3}
SEED=${SEED:-1993}
BACKBONE=${BACKBONE:-resnet32}
THREADS=${THREADS:-2}
OFFLINE=${OFFLINE:-results/${PROTOCOL}_${METHOD}_mem${MEMORY}_${BACKBONE}_e${EPOCHS}_seed${SEED}_cpu.json}
OUT=${OUT:-results}
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

TMP=$(mktemp -d -t bsce-replay-XXXXXX)
TOKEN=$($PY -c 'import secrets; print(secrets.token_hex(16))')
export BSCE_API_TOKEN=$TOKEN BSCE_WORKERS=${BSCE_WORKERS:-2} BENTOML_HOME=$TMP/bentoml
export BSCE_PREFIX=bsce-replay-$(basename "$TMP") BSCE_DATA_HOME=$TMP/state BENTOML_DO_NOT_TRACK=true
# One step is one job: a cifar10 step is 10,000 images, about 31 MiB of JSON.
export BSCE_MAX_BODY_BYTES=${BSCE_MAX_BODY_BYTES:-67108864}
export BSCE_MAX_LEARN_IMAGES=${BSCE_MAX_LEARN_IMAGES:-10000}
export PYTHONUNBUFFERED=1

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 3
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    if [ -n "${REDIS_URL:-}" ]; then
        $PY - <<PYEOF
from storage import connect
r = connect("$REDIS_URL")
keys = list(r.scan_iter(match="$BSCE_PREFIX:*", count=1000))
for i in range(0, len(keys), 500):
    r.delete(*keys[i:i + 500])
PYEOF
    fi
    echo "logs: $TMP/worker.log $TMP/server.log"
}
trap cleanup EXIT

setsid $PY -m learner.worker --backbone "$BACKBONE" --memory "$MEMORY" --epochs "$EPOCHS" \
    --method "$METHOD" --seed "$SEED" --threads "$THREADS" >"$TMP/worker.log" 2>&1 &
PIDS+=($!)
setsid .venv/bin/bentoml serve server.service:BsceServe --host 127.0.0.1 --port "$PORT" \
    >"$TMP/server.log" 2>&1 &
PIDS+=($!)

$PY -m loadtest.replay --protocol "$PROTOCOL" --url "http://127.0.0.1:$PORT" --token "$TOKEN" \
    --method "$METHOD" --epochs "$EPOCHS" --memory "$MEMORY" --seed "$SEED" \
    --backbone "$BACKBONE" --out "$OUT" --compare "$OFFLINE" "$@"
