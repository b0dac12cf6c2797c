"""Helpers shared by the storage tests (tests/test_storage*.py) and others; no tests here.
Their fixtures (``machine_redis``, ``embedded_redis``, ``r``, ``prefix``, ``redis_process``)
are in tests/conftest.py.

Every test works under its own key prefix, so runs that share the machine's Redis database
13 (or the embedded server) never see each other's keys; teardown deletes that prefix's
keys only, never the whole database.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from storage import connect

TEST_REDIS_URL = os.environ.get("BSCE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def prefix_keys(r: redis.Redis, prefix: str) -> set[bytes]:
    return set(r.scan_iter(match=f"{prefix}:*", count=1000))


def drop_prefix(r: redis.Redis, prefix: str) -> None:
    keys = list(prefix_keys(r, prefix))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i : i + 500])


def images(n: int, seed: int, chw: tuple[int, int, int] = (3, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *chw), dtype=np.uint8)


def require_redis(url: str) -> redis.Redis:
    """A client of the Redis at ``url``; the test fails (not skips) when none answers."""
    r = connect(url)
    try:
        r.ping()
    except redis.ConnectionError as e:
        r.close()
        pytest.fail(f"no Redis at {url} ({e}); `make test` starts one (scripts/ensure_redis.sh)")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A redis-server of the test's own, persisting every write (AOF, fsync always)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    # Loading a large AOF answers LOADING errors until done; ping waits it out.
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
