# Sourced by the scripts that need a fresh local stack (scripts/swap_under_load.sh,
# scripts/replay_vs_offline.sh): a temporary store, a learner worker and `bentoml serve`,
# stopped (and an external Redis's keys deleted) when the script exits.
#
#   stack_start NAME PORT WORKER_ARGS...
#
# Sets TMP, TOKEN and exports BSCE_API_TOKEN, BENTOML_HOME, BSCE_PREFIX, BSCE_DATA_HOME.
# Redis: REDIS_URL if set (a key prefix of our own), else the embedded Redis under TMP.

PY=${PY:-.venv/bin/python}
STACK_PIDS=()

stack_cleanup() {
    for pid in "${STACK_PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 3
    for pid in "${STACK_PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
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

stack_start() {
    local name=$1 port=$2
    shift 2
    TMP=$(mktemp -d -t "bsce-$name-XXXXXX")
    TOKEN=$($PY -c 'import secrets; print(secrets.token_hex(16))')
    export BSCE_API_TOKEN=$TOKEN BSCE_WORKERS=${BSCE_WORKERS:-2} BENTOML_HOME=$TMP/bentoml
    export BSCE_PREFIX=bsce-$name-$(basename "$TMP") BSCE_DATA_HOME=$TMP/state
    export BENTOML_DO_NOT_TRACK=true PYTHONUNBUFFERED=1
    trap stack_cleanup EXIT
    setsid $PY -m learner.worker "$@" >"$TMP/worker.log" 2>&1 &
    STACK_PIDS+=($!)
    setsid .venv/bin/bentoml serve server.service:BsceServe --host 127.0.0.1 --port "$port" \
        >"$TMP/server.log" 2>&1 &
    STACK_PIDS+=($!)
}

free_port() {
    $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
