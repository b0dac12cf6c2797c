"""Redis killed (SIGKILL) in the middle of a memory replacement (a new generation written
and the old one collected, in one transaction, as a commit does), then restarted from its
append-only file: the memory read back is the old generation or the new one, whole."""

from __future__ import annotations

import functools
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from storage import ExemplarStore, JobQueue, close, connect, rewrite_aof
from tests.test_storage_support import RedisProcess, images

pytestmark = pytest.mark.integration

CLASSES, PER_CLASS, CHW = 20, 100, (3, 32, 32)  # 6 MB per memory


@functools.cache
def _memory(version: int) -> dict[int, np.ndarray]:
    # Each generation differs in every byte and in its class set, so a mix is visible.
    rng = np.random.default_rng(version)
    first = version % 3
    return {
        c: rng.integers(0, 256, size=(PER_CLASS, *CHW), dtype=np.uint8)
        for c in range(first, first + CLASSES)
    }


def _matches(back: dict[int, np.ndarray], memory: dict[int, np.ndarray]) -> bool:
    return back.keys() == memory.keys() and all(np.array_equal(back[k], memory[k]) for k in memory)


def _stage_replacement(
    ex: ExemplarStore, pipe: redis.client.Pipeline, memory: dict[int, np.ndarray], generation: int
) -> None:
    """Queue `memory` as `generation` and the removal of every other generation."""
    ex.stage_write(pipe, ex.prepare(memory, generation))
    ex.stage_delete(pipe, [g for g in ex.generations() if g != generation])


def _replace(ex: ExemplarStore, memory: dict[int, np.ndarray], generation: int) -> None:
    pipe = ex.r.pipeline(transaction=True)
    _stage_replacement(ex, pipe, memory, generation)
    pipe.execute()


def _only(ex: ExemplarStore) -> int:
    """The one generation stored."""
    gens = ex.generations()
    assert len(gens) == 1, f"generations {gens}: the replacement was not one unit"
    return gens[0]


def _start_replacement(
    url: str, memory: dict[int, np.ndarray], version: int
) -> tuple[threading.Thread, list[BaseException]]:
    """Replace the memory in a thread; returns once the transaction is about to be sent."""
    ready, errors = threading.Event(), []

    def run() -> None:
        r = connect(url)
        ex = ExemplarStore(r, "crash")
        pipe = r.pipeline(transaction=True)
        _stage_replacement(ex, pipe, memory, version)
        ready.set()
        try:
            pipe.execute()
        except redis.RedisError as e:  # the server died under it: expected
            errors.append(e)

    writer = threading.Thread(target=run)
    writer.start()
    ready.wait(30)
    return writer, errors


def test_memory_survives_kill_during_replacement(redis_process: RedisProcess) -> None:
    r = connect(redis_process.url)
    _replace(ExemplarStore(r, "crash"), _memory(0), 0)
    writer, _ = _start_replacement(redis_process.url, _memory(0), 0)
    t = time.perf_counter()
    writer.join()
    took = time.perf_counter() - t  # how long one transaction is in flight

    committed = 0
    outcomes = {"old": 0, "new": 0, "writer saw the kill": 0}
    rnd = random.Random(1)
    for version in range(1, 7):
        new = _memory(version)
        writer, errors = _start_replacement(redis_process.url, new, version)
        time.sleep(rnd.uniform(0, took))
        redis_process.kill()
        writer.join(timeout=30)
        outcomes["writer saw the kill"] += bool(errors)
        redis_process.start()

        r = connect(redis_process.url)
        ex = ExemplarStore(r, "crash")
        got = _only(ex)
        back = ex.read(got)
        if got == version:
            assert _matches(back, new), f"round {version}: new version number, mixed content"
            committed = version
            outcomes["new"] += 1
        else:
            assert got == committed, (
                f"round {version}: version {got}, expected {committed} or {version}"
            )
            assert _matches(back, _memory(committed)), f"round {version}: old memory not whole"
            outcomes["old"] += 1
        assert ex.counts(got) == {k: PER_CLASS for k in back}
        r.close()
    # Not asserted (timing decides), but shown with -s: normally both outcomes occur.
    print(f"kill outcomes: {outcomes}; one replacement took {took * 1000:.0f} ms")


def _tear_last_transaction(path: Path, before: int, fraction: float) -> None:
    full = path.read_bytes()
    path.write_bytes(full[: before + int((len(full) - before) * fraction)])


def test_memory_survives_a_torn_append_only_file(redis_process: RedisProcess) -> None:
    """The cut that timing rarely hits: the server died while writing the transaction to
    its append-only file. We tear the file inside the last transaction at a few points;
    after each restart (and the AOF rewrite that follows a crash, see `rewrite_aof`) the
    old memory is whole, and later transactions do not resurrect the torn one."""
    r = connect(redis_process.url)
    ex = ExemplarStore(r, "crash")
    _replace(ex, _memory(0), 0)
    r.close()
    redis_process.kill()
    saved = {p.name: p.read_bytes() for p in (redis_process.workdir / "appendonlydir").iterdir()}

    for fraction in (0.0001, 0.5, 0.9999):
        for name, data in saved.items():  # back to "memory 0 committed"
            (redis_process.workdir / "appendonlydir" / name).write_bytes(data)
        redis_process.start()
        r = connect(redis_process.url)
        incr = max(
            (redis_process.workdir / "appendonlydir").glob("*.incr.aof"),
            key=lambda p: p.stat().st_mtime,
        )
        before = incr.stat().st_size
        _replace(ExemplarStore(r, "crash"), _memory(1), 1)
        r.close()
        redis_process.kill()
        _tear_last_transaction(incr, before, fraction)

        redis_process.start()
        r = connect(redis_process.url)
        ex = ExemplarStore(r, "crash")
        assert _only(ex) == 0 and _matches(ex.read(0), _memory(0)), f"torn at {fraction}"
        rewrite_aof(r)
        # Another transaction, then a restart: the memory is still memory 0.
        JobQueue(r, "crash").submit(images(1, 1), ["x"])
        r.close()
        redis_process.kill()
        redis_process.start()
        r = connect(redis_process.url)
        ex = ExemplarStore(r, "crash")
        assert _only(ex) == 0 and _matches(ex.read(0), _memory(0)), f"resurrected at {fraction}"
        assert r.xlen("crash:jobs") == 1
        r.close()
        redis_process.kill()


def test_embedded_server_repairs_a_torn_append_only_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    aof = data_dir / "redis" / "appendonly.aof"
    r = connect(None, data_dir)
    _replace(ExemplarStore(r, "crash"), _memory(0), 0)
    before = aof.stat().st_size
    _replace(ExemplarStore(r, "crash"), _memory(1), 1)
    _kill_embedded(r)
    _tear_last_transaction(aof, before, 0.5)

    r = connect(None, data_dir)  # loads the torn file, then rewrites it
    assert ExemplarStore(r, "crash").generations() == [0]
    JobQueue(r, "crash").submit(images(1, 1), ["x"])
    _kill_embedded(r)
    r = connect(None, data_dir)
    try:
        ex = ExemplarStore(r, "crash")
        assert _only(ex) == 0 and _matches(ex.read(0), _memory(0))
        assert r.xlen("crash:jobs") == 1
    finally:
        close(r)


def _kill_embedded(r: redis.Redis) -> None:
    pid = r.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and r.pid:
        time.sleep(0.02)
    r.connection_pool.disconnect()
