"""The promotion gate in the learner worker, against real Redis and a real model store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.core.config import MemoryConfig
from learner.core.gate import GateConfig
from learner.worker import Worker
from storage import RejectedVersionError, Storage, connect
from tests.test_storage_support import drop_prefix
from tests.test_worker import CPU, _config, _samples, _storage, env, subset  # noqa: F401, F811

GATED = GateConfig()


def _gated(epochs: int = 6):
    """Enough training (and memory) for a step on 100 images a class to keep the old
    classes and learn the new ones, which the gate checks."""
    config = _config(epochs=epochs)
    step = config.step.model_copy(update={"memory": MemoryConfig(size=200)})
    return config.model_copy(update={"gate": GATED, "step": step})


def _two_steps(storage, data, worker: Worker, second_overrides: dict | None):
    worker.ensure_initial_version()
    storage.jobs.submit(*_samples(data, [0, 1], 100))
    assert worker.run(once=True) == 1
    second = storage.jobs.submit(*_samples(data, [2, 3], 100), overrides=second_overrides)
    assert worker.run(once=True) == 1
    return second


@pytest.mark.integration
def test_a_normal_job_is_promoted_and_holds_out_a_tenth(env, subset):  # noqa: F811
    storage = _storage(env)
    worker = Worker(storage, _gated(), CPU, consumer="w")
    second = _two_steps(storage, subset, worker, None)
    status = storage.jobs.status(second)
    assert status.state == "done" and status.gate["verdict"] == "promoted"
    assert storage.versions.current() == 2 and storage.versions.info(2).gate == "promoted"
    meta = storage.versions.metadata(2)
    # 100 posted a class, 10 held out; the chunks of both jobs are version 2's lineage.
    assert meta["counts"][2:] == [90, 90] and meta["heldout_chunks"] == [1, 2]
    held = storage.holdout.read(meta["heldout_chunks"])
    assert {c: len(x) for c, x in held.items()} == {0: 10, 1: 10, 2: 10, 3: 10}
    assert meta["gate"]["heldout_images"] == 40 and meta["gate"]["parent_version"] == 1
    assert storage.versions.info(2).metrics["heldout_balance"] >= GATED.min_balance


@pytest.mark.integration
def test_a_diverged_job_is_rejected_and_the_pointer_stays(env, subset):  # noqa: F811
    storage = _storage(env)
    worker = Worker(storage, _gated(), CPU, consumer="w")
    second = _two_steps(storage, subset, worker, {"lr": 10.0})
    status = storage.jobs.status(second)
    assert status.state == "rejected" and status.version == 2
    assert status.gate["verdict"] == "rejected" and status.gate["reasons"]
    assert "promotion gate rejected" in status.note and status.pointer_moved is False
    assert storage.versions.current() == 1 and storage.versions.info(2).gate == "rejected"
    # Never served unless promoted: a pin is refused, unpin serves the newest servable one.
    with pytest.raises(RejectedVersionError):
        storage.versions.pin(2)
    assert storage.versions.unpin() == 1
    # The next job builds on version 1, not on the rejected one.
    third = storage.jobs.submit(*_samples(subset, [4], 100))
    assert worker.run(once=True) == 1
    assert storage.versions.metadata(3)["parent_version"] == 1
    assert storage.jobs.status(third).state in ("done", "rejected")
    storage.versions.promote(2)
    assert storage.versions.current() == 2
    assert storage.versions.info(2).gate == "promoted by operator"


class _DiesWhileJudging(Worker):
    """Dies (as a SIGKILL would: no cleanup of the claim) after the gate has evaluated."""

    def _judge(self, *args, **kwargs):
        report = super()._judge(*args, **kwargs)
        raise _Killed(report)


class _Killed(BaseException):
    def __init__(self, report) -> None:
        self.report = report


@pytest.mark.integration
def test_a_crash_during_the_gate_gives_the_same_decision_once(env, subset):  # noqa: F811
    storage = _storage(env)
    config = _gated()
    Worker(storage, config, CPU, consumer="w1").ensure_initial_version()
    job = storage.jobs.submit(*_samples(subset, [0, 1], 100))
    with pytest.raises(_Killed) as killed:
        _DiesWhileJudging(storage, config, CPU, consumer="w1").run(once=True)
    assert storage.versions.list()[-1].version == 0  # nothing committed
    # The claim times out (2 s) and another worker runs the job again, from the same parent
    # and random stream: the same verdict, one version.
    other = Worker(storage, config, CPU, consumer="w2")
    while other.run(once=True) == 0:
        pass
    status = storage.jobs.status(job)
    assert status.version == 1 and [v.version for v in storage.versions.list()] == [0, 1]
    assert status.gate["verdict"] == killed.value.report.verdict
    assert status.gate["classes"] == [c.model_dump() for c in killed.value.report.classes]
    torch.testing.assert_close(
        torch.tensor(status.gate["old_accuracy"] or 0.0),
        torch.tensor(killed.value.report.old_accuracy or 0.0),
    )


@pytest.mark.integration
def test_an_explicit_validation_set_is_what_the_gate_holds_out(env, subset):  # noqa: F811
    storage = _storage(env)
    worker = Worker(storage, _gated(epochs=1), CPU, consumer="w")
    worker.ensure_initial_version()
    x, names = _samples(subset, [0, 1], 100)
    # 15 test images of class 0 as its validation set; class 1 is split as usual.
    idx = (subset.test.labels == 0).nonzero().squeeze(1)[:15]
    val = subset.test.images[idx].numpy()
    job = storage.jobs.submit(np.concatenate([x, val]), names + [names[0]] * 15, validation=15)
    assert storage.jobs.status(job).validation == 15
    assert worker.run(once=True) == 1
    meta = storage.versions.metadata(1)
    # Class 0 trains on all 100 posted images, class 1 on 90; nothing trains on the 15.
    assert meta["counts"] == [100, 90]
    held = storage.holdout.read(meta["heldout_chunks"])
    assert {c: len(a) for c, a in held.items()} == {0: 15, 1: 10}
    np.testing.assert_array_equal(held[0], val)
    assert meta["gate"]["heldout_images"] == 25


@pytest.mark.integration
def test_a_validation_set_of_a_class_the_job_does_not_train_is_refused(env, subset):  # noqa: F811
    from storage import JobValidationError

    storage = _storage(env)
    x, names = _samples(subset, [0, 1], 10)
    other, other_names = _samples(subset, [2], 5)
    before = storage.jobs.list()
    with pytest.raises(JobValidationError, match="validation images of"):
        storage.jobs.submit(np.concatenate([x, other]), names + other_names, validation=5)
    with pytest.raises(JobValidationError, match="training samples besides"):
        storage.jobs.submit(x, names, validation=len(names))
    assert storage.jobs.list() == before and storage.labels.names() == []


class _RejectsOnce(Worker):
    """Rejects the first version it judges that builds on version 1 (the second job of
    `_two_steps`): the gate's thresholds have their own tests; here what counts is what the
    worker does after a rejection."""

    rejected = False

    def _judge(self, model, parent, *args, **kwargs):
        report = super()._judge(model, parent, *args, **kwargs)
        if self.rejected or parent.version != 1:
            return report
        self.rejected = True
        return report.model_copy(update={"verdict": "rejected", "reasons": ["by the test"]})


# The second job: 180 posted images (90 trained a class) and 40 exemplars, batch 32, give 7
# batches an epoch; it asks for 28 steps (4 epochs) where the recipe has 1.
_SECOND = {"min_steps": 28}


@pytest.mark.integration
def test_a_cut_version_the_gate_rejects_is_trained_again_without_the_bound(
    env,  # noqa: F811
    subset,  # noqa: F811
    tmp_path,
):
    config = _config(epochs=1).model_copy(update={"gate": GATED, "train_min_share": 0.0})
    storage = _storage(env)
    worker = _RejectsOnce(storage, config, CPU, consumer="w")
    second = _two_steps(storage, subset, worker, {**_SECOND, "train_seconds": 1e-6})
    meta = storage.versions.metadata(2)
    cut, report = meta["rejected_when_cut"], meta["report"]
    # A microsecond keeps the recipe's one epoch; the second try trains the whole budget.
    assert (cut["optimizer_steps"], cut["planned_steps"]) == (7, 28)
    assert cut["gate_reasons"] == ["by the test"]
    assert report["optimizer_steps"] == report["planned_steps"] == 28
    assert report["time_budget_seconds"] is None
    # Its verdict is the real gate's on the second try.
    assert storage.jobs.status(second).gate["reasons"] != ["by the test"]
    # Bit for bit what a worker without the bound makes of the same jobs: the second try
    # starts from the parent's random stream as the first did.
    free_prefix = env["BSCE_PREFIX"] + "-free"
    free = Storage(
        connect(env["REDIS_URL"]), free_prefix, bentoml_home=str(tmp_path / "free-bentoml")
    )
    try:
        plain = Worker(free, config.model_copy(update={"train_seconds": 0.0}), CPU, consumer="w")
        _two_steps(free, subset, plain, _SECOND)
        a, b = storage.versions.load(2)[0], free.versions.load(2)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert "rejected_when_cut" not in free.versions.metadata(2)
    finally:
        drop_prefix(free.r, free_prefix)


@pytest.mark.integration
def test_a_rejected_version_the_bound_did_not_cut_is_not_trained_again(env, subset):  # noqa: F811
    storage = _storage(env)
    config = _config(epochs=1).model_copy(update={"gate": GATED})
    worker = _RejectsOnce(storage, config, CPU, consumer="w")
    # A bound of a day: set, and never reached however slow the machine.
    second = _two_steps(storage, subset, worker, {**_SECOND, "train_seconds": 86_400})
    status = storage.jobs.status(second)
    assert status.state == "rejected" and status.gate["reasons"] == ["by the test"]
    meta = storage.versions.metadata(2)
    assert "rejected_when_cut" not in meta and meta["report"]["optimizer_steps"] == 28
