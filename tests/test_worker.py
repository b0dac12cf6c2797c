"""The learner worker against real Redis and a real BentoML model store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import learner.worker as worker_module
from learner.core.config import MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.gate import GateConfig
from learner.core.overrides import JobOverrides, apply_overrides, train_seconds_for
from learner.core.versioning import load_version
from learner.data import load_dataset
from learner.worker import Worker, WorkerConfig
from storage import Storage, connect
from tests.test_storage_support import TEST_REDIS_URL, drop_prefix, require_redis

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def subset():
    return load_dataset("cifar10-subset")


def _samples(subset, classes: list[int], per_class: int = 40) -> tuple[np.ndarray, list[str]]:
    xs, names = [], []
    for c in classes:
        idx = (subset.train.labels == c).nonzero().squeeze(1)[:per_class]
        xs.append(subset.train.images[idx].numpy())
        names += [subset.train.class_names[c]] * len(idx)
    return np.concatenate(xs), names


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    r = require_redis(TEST_REDIS_URL)
    prefix = f"bsce-test-worker-{uuid.uuid4().hex[:10]}"
    values = {
        "REDIS_URL": TEST_REDIS_URL,
        "BSCE_PREFIX": prefix,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    yield values
    drop_prefix(r, prefix)
    r.close()


def _storage(env: dict[str, str]) -> Storage:
    return Storage(connect(env["REDIS_URL"]), env["BSCE_PREFIX"], bentoml_home=env["BENTOML_HOME"])


def _config(epochs: int = 1) -> WorkerConfig:
    step = StepConfig(
        model=ModelConfig(backbone="resnet8"),
        optim=OptimConfig(epochs=epochs, min_steps=0, batch_size=32),
        memory=MemoryConfig(mode="fixed_total", size=40),
    )
    # Retries after 0.05 s (then 0.1 s): a failing job's 3 attempts take no time.
    return WorkerConfig(
        step=step,
        seed=5,
        claim_timeout_s=2.0,
        poll_ms=100,
        base_model=None,
        retry_base_s=0.05,
        store_retry_base_s=0.05,
        store_retry_max_s=0.5,
        # These tests count what a step trains on; the gate's tests turn it on
        # (tests/test_gate_worker.py).
        gate=GateConfig(enabled=False),
        # They count versions too: the fast path's interims have their own tests
        # (tests/test_fast_path.py).
        fast_path=False,
    )


@pytest.mark.integration
def test_two_steps_posted_as_jobs_become_two_versions(env, subset):
    storage = _storage(env)
    worker = Worker(storage, _config(), CPU, consumer="w1")
    worker.ensure_initial_version()
    first = storage.jobs.submit(*_samples(subset, [0, 1]))
    second = storage.jobs.submit(*_samples(subset, [2, 3]))
    assert worker.run(once=True) == 1
    assert worker.run(once=True) == 1

    assert [v.version for v in storage.versions.list()] == [0, 1, 2]
    assert storage.versions.current() == 2
    assert storage.jobs.status(first).state == "done" and storage.jobs.status(first).version == 1
    assert storage.jobs.status(first).progress == 1.0
    assert storage.jobs.status(second).version == 2
    tensors, meta = storage.versions.load(2)
    loaded = load_version(tensors, meta)
    assert loaded.class_names == tuple(subset.train.class_names[:4])
    assert meta["parent_version"] == 1 and meta["step"] == 2
    # Step 2 trained on 40 new images per class and the 20 exemplars each old class kept
    # (2,000-style fixed total of 40 over 2 classes); then every class shrinks to 40 // 4.
    assert meta["counts"] == [20, 20, 40, 40]
    # The new memory is version 2's generation in Redis; the version's files hold weights,
    # class means and the random stream only.
    assert meta["memory_generation"] == 2
    assert storage.versions.memory_info(2).counts == {0: 10, 1: 10, 2: 10, 3: 10}
    assert not any(k.startswith("memory.") for k in tensors) and "rng.state" in tensors
    assert storage.labels.names() == list(subset.train.class_names[:4])


@pytest.mark.integration
def test_the_next_step_trains_on_the_memory_in_redis(env, subset):
    """Redis is the one source of the exemplar memory: edit the generation of version 1 and
    step 2 trains on (and keeps) the edited memory."""
    storage = _storage(env)
    worker = Worker(storage, _config(), CPU, consumer="w1")
    worker.ensure_initial_version()
    storage.jobs.submit(*_samples(subset, [0, 1]))
    assert worker.run(once=True) == 1
    memory = storage.versions.memory(1)
    assert {c: len(x) for c, x in memory.items()} == {0: 20, 1: 20}

    # Class 0 keeps 3 exemplars, each one inverted; class 1 is left as it was.
    edited = {0: 255 - memory[0][:3], 1: memory[1]}
    storage.exemplars.write(1, edited)
    storage.jobs.submit(*_samples(subset, [2, 3]))
    assert worker.run(once=True) == 1
    meta = storage.versions.metadata(2)
    assert meta["counts"] == [3, 20, 40, 40]  # 20 without the edit (see the test above)
    assert meta["report"]["counts"] == [3, 20, 40, 40]
    after = storage.versions.memory(2)
    # Class 0 is under its new quota (40 // 4 = 10): it keeps the edited images themselves.
    assert np.array_equal(after[0], edited[0])
    assert np.array_equal(after[1], memory[1][:10])


@pytest.mark.integration
def test_a_step_on_a_version_without_its_memory_fails_clearly(env, subset):
    storage = _storage(env)
    worker = Worker(storage, _config(), CPU, consumer="w1")
    worker.ensure_initial_version()
    storage.exemplars.delete(0)  # as if garbage-collected
    job = storage.jobs.submit(*_samples(subset, [0], per_class=5))
    worker.run(once=True)
    status = storage.jobs.status(job)
    # A memory that is gone does not come back: the first attempt fails the job.
    assert status.state == "failed" and status.attempts == 1
    assert "ParentUnloadableError" in (status.error or "")
    assert "MemoryGenerationError" in (status.error or "")
    assert "generation 0" in (status.error or "") and "garbage-collected" in (status.error or "")
    assert [v.version for v in storage.versions.list()] == [0]


def test_overrides_are_validated():
    base = _config().step
    assert apply_overrides(base, {"epochs": 3, "method": "ce"}).optim.epochs == 3
    assert apply_overrides(base, {"distill": False}).distill.enabled is False
    assert train_seconds_for(50.0, None) == 50.0
    assert train_seconds_for(50.0, {"train_seconds": 0}) == 0.0
    for bad in (
        {"epochs": 0},
        {"method": "sgd"},
        {"unknown": 1},
        {"lr": -1},
        {"train_seconds": -1},
    ):
        with pytest.raises(ValueError):
            JobOverrides.model_validate(bad)


@pytest.mark.integration
@pytest.mark.parametrize(("share", "epochs"), [(0.0, 1), (0.5, 2)])
def test_a_jobs_time_bound_trims_what_the_step_minimum_added(env, subset, share, epochs):
    """A bound no machine can meet (a microsecond) keeps the configured epochs, or the
    operator's share of the planned ones; the version's report says what was planned. No
    figure here depends on this machine's speed."""
    storage = _storage(env)
    config = _config().model_copy(update={"train_min_share": share})
    worker = Worker(storage, config, CPU, consumer="w1")
    worker.ensure_initial_version()
    job = storage.jobs.submit(*_samples(subset, [0, 1]), {"min_steps": 12, "train_seconds": 1e-6})
    assert worker.run(once=True) == 1
    report = storage.versions.metadata(storage.jobs.status(job).version)["report"]
    # 80 images, batch 32: 3 batches an epoch; 12 steps planned (4 epochs).
    assert (report["planned_steps"], report["epochs"]) == (12, epochs)
    assert report["optimizer_steps"] == 3 * epochs and report["time_budget_seconds"] == 1e-6


def _start_worker(env: dict[str, str], consumer: str, epochs: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "learner.worker",
        "--gate",
        "off",
        "--base-model",
        "none",
        "--min-steps",
        "0",
        "--backbone",
        "resnet8",
        "--epochs",
        str(epochs),
        "--memory",
        "40",
        "--claim-timeout",
        "2",
        "--consumer",
        consumer,
        "--device",
        "cpu",
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
def test_killed_worker_job_is_claimed_again_and_its_version_appears_once(env, subset):
    storage = _storage(env)
    job = storage.jobs.submit(*_samples(subset, [0, 1], per_class=100))
    # 200 epochs: however fast the machine, the victim is still training when it is
    # killed after its first; the rescuer's own recipe trains 1 epoch.
    victim = _start_worker(env, "victim", epochs=200)
    try:
        _wait(lambda: (storage.jobs.status(job).progress or 0) > 0, 120, "the first epoch")
        # Which epoch it shows depends on the machine's speed; its budget does not.
        note = storage.jobs.status(job).progress_note or ""
        # (The time bound never cuts below --epochs, so 200 it stays.)
        assert re.match(
            r"epoch \d+/200 \(at least 0 optimizer steps, or what fits in 50 s, "
            r"not under 50% of them\)",
            note,
        ), note
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert storage.jobs.status(job).state == "running"  # nobody finished it
    assert [v.version for v in storage.versions.list()] == [0]

    rescuer = Worker(storage, _config(), CPU, consumer="rescuer")
    assert rescuer.run(once=True) == 1
    status = storage.jobs.status(job)
    assert status.state == "done" and status.version == 1
    assert status.attempts == 2
    assert [v.version for v in storage.versions.list()] == [0, 1]
    assert storage.versions.version_for_job(job) == 1
    assert storage.jobs.pending() == 0


@pytest.mark.integration
def test_sigterm_finishes_the_step_then_exits(env, subset):
    storage = _storage(env)
    job = storage.jobs.submit(*_samples(subset, [0, 1]))
    proc = _start_worker(env, "graceful", epochs=3)
    try:
        _wait(lambda: storage.jobs.status(job).state == "running", 120, "the job to start")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert storage.jobs.status(job).state == "done"
    assert storage.versions.current() == 1


@pytest.mark.integration
def test_failing_job_is_marked_failed_and_stays_inspectable(env, subset):
    storage = _storage(env)
    worker = Worker(storage, _config(), CPU, consumer="w")
    worker.ensure_initial_version()
    x, names = _samples(subset, [0], per_class=5)
    job = storage.jobs.submit(x, names, overrides={"epochs": 0})  # refused by the worker
    for _ in range(3):
        worker.run(once=True)
    status = storage.jobs.status(job)
    assert status.state == "failed"
    assert "epochs" in (status.error or "")
    assert [v.version for v in storage.versions.list()] == [0]


def _worker_config(*argv: str) -> WorkerConfig:
    return worker_module.config_from_args(worker_module.build_parser().parse_args(list(argv)))


def test_worker_flags_give_the_offline_runners_config(subset) -> None:
    """The flags scripts/replay_vs_offline.sh passes make learner.bench's config for the
    protocol, field for field: the condition for the replay to reproduce it."""
    from learner.bench import step_config_for
    from learner.protocols import get_protocol

    config = _worker_config("--epochs", "3", "--memory", "2000", "--seed", "1993")
    offline = step_config_for(get_protocol("cifar10-b0-s5"), subset)
    offline = offline.model_copy(update={"optim": offline.optim.model_copy(update={"epochs": 3})})
    assert config.step == offline and config.seed == 1993

    fmnist = _worker_config("--dataset", "fashion-mnist", "--memory", "0").step
    assert fmnist.model.in_channels == 1 and fmnist.augment.crop == 28
    assert fmnist.augment.mean == (0.2860,) and fmnist.memory.mode == "none"
    imagenet = _worker_config("--dataset", "imagenet-subset", "--backbone", "resnet18").step
    assert imagenet.model.backbone == "resnet18" and imagenet.augment.crop == 224


def test_operator_limits_come_from_flags_or_the_environment(monkeypatch) -> None:
    defaults = _worker_config()
    assert (defaults.max_job_steps, defaults.max_job_seconds) == (20_000, 3600.0)
    assert _worker_config("--max-job-steps", "500").max_job_steps == 500
    monkeypatch.setenv("BSCE_MAX_JOB_SECONDS", "90")
    monkeypatch.setenv("BSCE_RETRY_BASE_S", "0.5")
    config = _worker_config()
    assert (config.max_job_seconds, config.retry_base_s) == (90.0, 0.5)
    # The latency bound on a job's training loop: 50 s unless set, 0 turns it off.
    assert defaults.train_seconds == 50.0
    assert _worker_config("--train-seconds", "0").train_seconds == 0.0
    monkeypatch.setenv("BSCE_TRAIN_SECONDS", "20")
    assert _worker_config().train_seconds == 20.0
    assert defaults.train_min_share == 0.5
    assert _worker_config("--train-min-share", "0.25").train_min_share == 0.25
