"""The learner worker under faults and operators: Redis stopped and started again (the worker
idle, and mid-job), a parent version that cannot be loaded, failed attempts that back off,
the operator's per-job limits, and a rollback or pin while a step trains.

Real Redis servers (the machine's, or one of the test's own that it stops and starts), real
training and real model files. Where a fault must land inside a step, a worker subclass
causes it from the step's own progress callback, so no assertion depends on how fast this
machine trains.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from learner.data import load_dataset
from learner.worker import Worker, WorkerConfig, retry_delay
from storage import Storage, connect
from storage.versions import WEIGHTS_FILE
from tests.test_storage_support import TEST_REDIS_URL, RedisProcess, drop_prefix, require_redis
from tests.test_worker import _config, _samples, _wait

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(name="subset", scope="module")
def fixture_subset():
    return load_dataset("cifar10-subset")


@pytest.fixture(name="storage")
def fixture_storage(tmp_path: Path) -> Iterator[Storage]:
    """A `Storage` on the machine's Redis under a prefix of its own."""
    r = require_redis(TEST_REDIS_URL)
    prefix = f"bsce-test-reliab-{uuid.uuid4().hex[:10]}"
    yield Storage(r, prefix, bentoml_home=tmp_path / "bentoml")
    drop_prefix(r, prefix)
    r.close()


def _stop(rp: RedisProcess) -> None:
    """Stop the test's Redis as an operator would: SIGTERM, it writes its files and exits."""
    assert rp.proc is not None
    rp.proc.terminate()
    rp.proc.wait(timeout=60)
    rp.proc = None


def _logged(records: list[logging.LogRecord], fragment: str) -> Callable[[], bool]:
    return lambda: any(fragment in r.getMessage() for r in list(records))


class _InThread:
    """`worker.run(once=True)` in a thread, with its result or exception."""

    def __init__(self, worker: Worker) -> None:
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
        self.thread.start()

    def _run(self, worker: Worker) -> None:
        try:
            self.result = worker.run(once=True)
        except BaseException as e:  # reported by the test
            self.error = e


class _ActsAtFirstEpoch(Worker):
    """A worker during whose step something happens after the first epoch: Redis stops,
    or an operator rolls back or pins (what would otherwise race with the training)."""

    def __init__(self, *args, act: Callable[[], object], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.act = act

    def _on_epoch(self, run, epoch: int, epochs: int, loss: float) -> None:
        if epoch == 1:
            self.act()
        super()._on_epoch(run, epoch, epochs, loss)


# -- Redis goes away -------------------------------------------------------------------------


def test_idle_worker_survives_a_redis_restart_and_runs_the_next_job(
    redis_process: RedisProcess, tmp_path: Path, subset
) -> None:
    env = {
        "REDIS_URL": redis_process.url,
        "BSCE_PREFIX": "idle",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BSCE_STORE_RETRY_BASE_S": "0.05",
        "BSCE_STORE_RETRY_MAX_S": "0.5",
    }
    log_file = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "learner.worker", "--base-model", "none", "--min-steps", "0"]
    cmd += ["--gate", "off"]
    cmd += ["--backbone", "resnet8", "--epochs", "1", "--memory", "40", "--device", "cpu"]
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    storage = Storage(connect(redis_process.url), "idle", bentoml_home=tmp_path / "bentoml")
    try:
        _wait(lambda: storage.versions.current() == 0, 180, "version 0")
        _stop(redis_process)
        noticed = "store unavailable while waiting for jobs"
        _wait(
            lambda: noticed in log_file.read_text() or proc.poll() is not None,
            120,
            "the worker to notice",
        )
        assert proc.poll() is None, log_file.read_text()  # it did not exit
        redis_process.start()  # same port, same files
        job = storage.jobs.submit(*_samples(subset, [0, 1], per_class=20))
        _wait(lambda: storage.jobs.status(job).state == "done", 300, "the job")
        assert proc.poll() is None, log_file.read_text()
        assert storage.versions.current() == 1 and storage.jobs.status(job).version == 1
        assert "store reachable again" in log_file.read_text()
        proc.terminate()
        assert proc.wait(timeout=120) == 0, log_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        storage.close()


def test_redis_stopped_mid_job_the_version_is_committed_once(
    redis_process: RedisProcess, tmp_path: Path, subset, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "bentoml"
    storage = Storage(connect(redis_process.url), "midjob", bentoml_home=home)
    worker = _ActsAtFirstEpoch(
        Storage(connect(redis_process.url), "midjob", bentoml_home=home),
        _config(epochs=3),
        CPU,
        consumer="w",
        act=lambda: _stop(redis_process),
    )
    worker.ensure_initial_version()
    job = storage.jobs.submit(*_samples(subset, [0, 1], per_class=20))
    with caplog.at_level(logging.INFO, logger="bsce.worker"):
        running = _InThread(worker)
        # Epochs 2 and 3 train with Redis down; then the commit waits for it.
        _wait(_logged(caplog.records, "store unavailable while committing job"), 300, "commit")
        redis_process.start()
        running.thread.join(timeout=300)
    assert not running.thread.is_alive() and running.error is None and running.result == 1
    status = storage.jobs.status(job)
    assert (status.state, status.version, status.attempts) == ("done", 1, 1)
    assert [v.version for v in storage.versions.list()] == [0, 1]
    assert storage.versions.version_for_job(job) == 1 and storage.versions.current() == 1
    assert storage.jobs.pending() == 0
    assert len(storage.versions.model_store.list("bsce-classifier")) == 2


# -- jobs that no retry can fix, and retries that wait -----------------------------------------


def test_a_parent_that_cannot_be_loaded_fails_each_job_at_once(storage: Storage, subset) -> None:
    worker = Worker(storage, _config(), CPU, consumer="w")
    worker.ensure_initial_version()
    weights = storage.versions.model_dir(0) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated on disk
    jobs = [storage.jobs.submit(*_samples(subset, [c], per_class=5)) for c in (0, 1)]
    assert worker.run(once=True) == 1 and worker.run(once=True) == 1
    for job in jobs:
        status = storage.jobs.status(job)
        assert (status.state, status.attempts) == ("failed", 1)
        error = status.error or ""
        assert error.startswith("ParentUnloadableError: model version 0, the parent of this step")
        assert "digest" in error and "roll back or pin" in error
    assert [v.version for v in storage.versions.list()] == [0] and storage.jobs.pending() == 0


def test_a_failed_attempt_waits_before_the_job_is_claimed_again(storage: Storage, subset) -> None:
    worker = Worker(storage, _config().model_copy(update={"retry_base_s": 30.0}), CPU, consumer="w")
    worker.ensure_initial_version()
    x, names = _samples(subset, [0], per_class=5)
    job = storage.jobs.submit(x, names, overrides={"epochs": 0})  # every attempt fails
    later = storage.jobs.submit(*_samples(subset, [1], per_class=5))
    assert worker.run(once=True) == 1
    status = storage.jobs.status(job)
    assert (status.state, status.attempts) == ("queued", 1) and "epochs" in (status.error or "")
    assert status.retry_at is not None
    assert status.retry_at.timestamp() >= status.submitted.timestamp() + 29.9
    # Not handed out again before then, to any worker, and nothing newer overtakes it.
    assert storage.jobs.claim("w", block_ms=0) is None
    assert storage.jobs.claim("standby", block_ms=0, min_idle_ms=0) is None
    assert storage.jobs.status(later).state == "queued"


def test_retry_delay_doubles_up_to_its_cap() -> None:
    config = WorkerConfig(base_model=None, retry_base_s=2.0, retry_max_s=10.0)
    assert [retry_delay(config, a) for a in (1, 2, 3, 4, 100)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_job_over_the_step_limit_fails_before_training(storage: Storage, subset) -> None:
    # 40 samples in batches of 32, one epoch: 2 optimizer steps.
    worker = Worker(storage, _config().model_copy(update={"max_job_steps": 1}), CPU, "w")
    worker.ensure_initial_version()
    job = storage.jobs.submit(*_samples(subset, [0, 1], per_class=20))
    assert worker.run(once=True) == 1
    status = storage.jobs.status(job)
    assert (status.state, status.attempts, status.progress) == ("failed", 1, None)
    assert "budget of 2 optimizer steps" in (status.error or "")
    assert "exceeds the operator's limit of 1" in (status.error or "")
    assert [v.version for v in storage.versions.list()] == [0]


def test_a_job_over_the_time_limit_is_stopped(storage: Storage, subset) -> None:
    # A millisecond: passed by the end of the first epoch on any machine.
    config = _config(epochs=3).model_copy(update={"max_job_seconds": 0.001})
    worker = Worker(storage, config, CPU, consumer="w")
    worker.ensure_initial_version()
    job = storage.jobs.submit(*_samples(subset, [0, 1], per_class=20))
    assert worker.run(once=True) == 1
    status = storage.jobs.status(job)
    assert (status.state, status.attempts) == ("failed", 1)
    error = status.error or ""
    assert error.startswith("JobLimitError: stopped after epoch 1/3") and "0.001 s" in error
    assert [v.version for v in storage.versions.list()] == [0]


# -- operators' decisions while a step trains ---------------------------------------------------


def test_a_rollback_during_training_stands(storage: Storage, subset) -> None:
    versions = storage.versions
    Worker(storage, _config(), CPU, consumer="w").ensure_initial_version()
    storage.jobs.submit(*_samples(subset, [0, 1], per_class=10))
    assert Worker(storage, _config(), CPU, consumer="w").run(once=True) == 1
    assert versions.current() == 1

    job = storage.jobs.submit(*_samples(subset, [2], per_class=10))
    operator = _ActsAtFirstEpoch(storage, _config(), CPU, consumer="w", act=versions.rollback)
    assert operator.run(once=True) == 1
    status = storage.jobs.status(job)
    assert (status.state, status.version, status.built_on, status.pointer_moved) == (
        "done",
        2,
        1,
        False,
    )
    assert "built on version 1" in (status.note or "")
    assert "moved to version 0" in (status.note or "")
    assert versions.current() == 0 and versions.exists(2)

    # Learning goes on from the version the operator chose.
    nxt = storage.jobs.submit(*_samples(subset, [3], per_class=10))
    assert Worker(storage, _config(), CPU, consumer="w").run(once=True) == 1
    status = storage.jobs.status(nxt)
    assert (status.version, status.built_on, status.pointer_moved, status.note) == (
        3,
        0,
        True,
        None,
    )
    assert versions.current() == 3 and versions.metadata(3)["parent_version"] == 0


def test_a_pin_during_training_keeps_serving_the_pinned_version(storage: Storage, subset) -> None:
    versions = storage.versions
    Worker(storage, _config(), CPU, consumer="w").ensure_initial_version()
    job = storage.jobs.submit(*_samples(subset, [0, 1], per_class=10))
    operator = _ActsAtFirstEpoch(storage, _config(), CPU, consumer="w", act=lambda: versions.pin(0))
    assert operator.run(once=True) == 1
    status = storage.jobs.status(job)
    assert (status.state, status.version, status.built_on, status.pointer_moved) == (
        "done",
        1,
        0,
        False,
    )
    assert "pinned to version 0" in (status.note or "")
    assert versions.current() == 0 and versions.pinned() == 0
    assert versions.unpin() == 1  # the newest, as had there been no pin
