#!/usr/bin/env bash
# The tests use the machine's Redis at 127.0.0.1:6379 (their own database number). Start one
# when none answers; never stop or reconfigure a running one.
set -euo pipefail
if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  exit 0
fi
command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install redis-server" >&2; exit 1; }
mkdir -p /tmp/bsce-redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp/bsce-redis --logfile /tmp/bsce-redis/redis.log
for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0; sleep 0.1; done
echo "redis did not start" >&2; exit 1
