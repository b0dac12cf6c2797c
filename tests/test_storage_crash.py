"""Redis killed (SIGKILL) in the middle of a memory replacement, then restarted from its
append-only file: the memory read back is the old one or the new one, whole."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import redis

from storage import ExemplarStore, connect
from tests.test_storage_support import (  # noqa: F401  (fixtures are used by name)
    RedisProcess,
    fixture_redis_process,
)

CLASSES, PER_CLASS, CHW = 20, 100, (3, 32, 32)  # 6 MB per memory


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


def _start_replacement(
    url: str, memory: dict[int, np.ndarray], version: int
) -> tuple[threading.Thread, list[BaseException]]:
    """Replace the memory in a thread; returns once the transaction is about to be sent."""
    ready, errors = threading.Event(), []

    def run() -> None:
        r = connect(url)
        ex = ExemplarStore(r, "crash")
        pipe = r.pipeline(transaction=True)
        ex.stage(pipe, ex.prepare(memory, version))
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
    ExemplarStore(r, "crash").replace_all(_memory(0), version=0)
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
        back, got = ex.read_all(), ex.version()
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
        assert ex.counts() == {k: PER_CLASS for k in back}
        r.close()
    # Not asserted (timing decides), but shown with -s: normally both outcomes occur.
    print(f"kill outcomes: {outcomes}; one replacement took {took * 1000:.0f} ms")


def test_memory_survives_a_torn_append_only_file(redis_process: RedisProcess) -> None:
    """The cut that timing rarely hits: the server died while writing the transaction to
    its append-only file. We tear the file inside the last transaction at a few points."""
    r = connect(redis_process.url)
    ex = ExemplarStore(r, "crash")
    ex.replace_all(_memory(0), version=0)
    aof_dir = redis_process.workdir / "appendonlydir"
    incr = max(aof_dir.glob("*.incr.aof"), key=lambda p: int(p.name.split(".")[-3]))
    before = incr.stat().st_size
    ex.replace_all(_memory(1), version=1)
    r.close()
    redis_process.kill()
    full = incr.read_bytes()
    assert len(full) > before + CLASSES * PER_CLASS * int(np.prod(CHW))

    for i, fraction in enumerate((0.0001, 0.5, 0.9999)):
        incr.write_bytes(full[: before + int((len(full) - before) * fraction)])
        redis_process.start()
        r = connect(redis_process.url)
        ex = ExemplarStore(r, "crash")
        assert ex.version() == 0 and _matches(ex.read_all(), _memory(0)), f"torn at {fraction}"
        # Writes after the repair survive the next restart too.
        ex.replace_all({0: np.full((2, *CHW), i, np.uint8)}, version=5 + i)
        r.close()
        redis_process.kill()
        redis_process.start()
        r = connect(redis_process.url)
        assert ExemplarStore(r, "crash").version() == 5 + i, (
            f"write after a tear at {fraction} lost"
        )
        r.close()
        redis_process.kill()

    incr.write_bytes(full)  # and the whole file gives the new memory
    redis_process.start()
    r = connect(redis_process.url)
    ex = ExemplarStore(r, "crash")
    assert ex.version() == 1 and _matches(ex.read_all(), _memory(1))
    r.close()
