#!/usr/bin/env bash
# Swap under load on this machine, end to end: a fresh server (BSCE_WORKERS API workers) and
# learner worker on an empty store, Locust prediction traffic while UPDATES new classes land,
# then both processes stopped and the store's keys deleted. Results in OUT (default results/).
#
#   scripts/swap_under_load.sh                         # resnet32 learner, 8 users, 5 updates
#   USERS=16 UPDATES=8 BACKBONE=resnet8 scripts/swap_under_load.sh
#
# Redis: REDIS_URL if set (a key prefix of our own is used and deleted afterwards), else the
# embedded Redis under a temporary BSCE_DATA_HOME. Extra arguments go to
# `python -m loadtest.swap_under_load`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
USERS=${USERS:-8}
SPAWN_RATE=${SPAWN_RATE:-4}
UPDATES=${UPDATES:-5}
WORKERS=${BSCE_WORKERS:-2}
BACKBONE=${BACKBONE:-resnet32}
MEMORY=${MEMORY:-2000}
EPOCHS=${EPOCHS:-1}
OUT=${OUT:-results}
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

TMP=$(mktemp -d -t bsce-swap-XXXXXX)
TOKEN=$($PY -c 'import secrets; print(secrets.token_hex(16))')
export BSCE_API_TOKEN=$TOKEN BSCE_WORKERS=$WORKERS BENTOML_HOME=$TMP/bentoml
export BSCE_PREFIX=bsce-swap-$(basename "$TMP") BSCE_DATA_HOME=$TMP/state BENTOML_DO_NOT_TRACK=true
export PYTHONUNBUFFERED=1

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 3
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    if [ -n "${REDIS_URL:-}" ]; then
        $PY - <<EOF
from storage import connect
r = connect("$REDIS_URL")
keys = list(r.scan_iter(match="$BSCE_PREFIX:*", count=1000))
for i in range(0, len(keys), 500):
    r.delete(*keys[i:i + 500])
EOF
    fi
    echo "logs: $TMP/worker.log $TMP/server.log"
}
trap cleanup EXIT

setsid $PY -m learner.worker --backbone "$BACKBONE" --memory "$MEMORY" --epochs "$EPOCHS" \
    >"$TMP/worker.log" 2>&1 &
PIDS+=($!)
setsid .venv/bin/bentoml serve server.service:BsceServe --host 127.0.0.1 --port "$PORT" \
    >"$TMP/server.log" 2>&1 &
PIDS+=($!)

$PY -m loadtest.swap_under_load --url "http://127.0.0.1:$PORT" --token "$TOKEN" \
    --users "$USERS" --spawn-rate "$SPAWN_RATE" --updates "$UPDATES" --out "$OUT" "$@"
