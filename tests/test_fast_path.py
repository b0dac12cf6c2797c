"""The fast path: an interim version before the full step (learner/fast_path.py, the worker,
Storage.commit_interim).

Unit tests: the head fit on synthetic features, and the pointer rule of the commits. The
worker tests (resnet8 on the bundled subset, real Redis and model store, as
tests/test_worker.py): job 1 builds on the untrained version 0 (no interim: nothing to keep
frozen), so job 2 is the one with an interim, version 2, and its full version is 3.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from learner.core.config import ModelConfig
from learner.core.gate import GateConfig
from learner.core.model import IncrementalNet
from learner.fast_path import ExemplarFeatures, Features, fit_interim, interim_generator
from learner.worker import JobLimitError, Worker
from storage import PointerState, Storage
from storage.jobs import InterimRecord
from storage.store import _decide
from tests.test_storage_support import TEST_REDIS_URL, drop_prefix, require_redis
from tests.test_worker import CPU, _config, _samples, _storage, env, subset  # noqa: F401

# A gate that passes any version with finite outputs that differ between images: the
# tests below break one stage on purpose (constant outputs) and need the other to pass.
LENIENT = GateConfig(max_old_drop=100.0, min_balance=0.0, max_overall_drop=100.0)


def _fast(gate: GateConfig = LENIENT, epochs: int = 1):
    return _config(epochs).model_copy(update={"fast_path": True, "gate": gate})


# -- the fit, on synthetic features ------------------------------------------------------------


def _features(classes: list[int], n: int, d: int, g: torch.Generator) -> Features:
    centres = torch.randn(max(classes) + 1, d, generator=g) * 3
    y = torch.tensor(classes).repeat_interleave(n)
    return Features(centres[y] + torch.randn(len(y), d, generator=g), y)


def test_the_fit_learns_the_job_rows_and_keeps_the_rest_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    parent = IncrementalNet.create(ModelConfig(backbone="resnet8"), g, num_classes=3)
    before = {k: v.clone() for k, v in parent.to_tensors().items()}
    data = _features([0, 1, 2, 3], 40, parent.feature_dim, torch.Generator().manual_seed(1))
    job, memory = Features(data.x[120:], data.y[120:]), Features(data.x[:120], data.y[:120])

    fit = fit_interim(parent, job, memory, interim_generator(5, "job-a"))
    again = fit_interim(parent, job, memory, interim_generator(5, "job-a"))

    assert all(torch.equal(v, parent.to_tensors()[k]) for k, v in before.items())
    head = fit.model.head
    assert head.weight.shape[0] == 4 and fit.counts.tolist() == [40, 40, 40, 40]
    assert torch.equal(head.weight[:3], before["head.weight"])
    assert torch.equal(head.bias[:3], before["head.bias"])
    after = fit.model.to_tensors()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert fit.report["fit_rows"] == [3] and fit.report["loss_after"] < fit.report["loss_before"]
    # The new class is told apart from the old ones on its own features.
    assert (fit.model.logits(job.x).argmax(1) == 3).float().mean() > 0.9
    assert torch.equal(head.weight, again.model.head.weight)  # deterministic
    assert fit.class_means.shape == (4, parent.feature_dim) and not fit.class_means.isnan().any()


def test_the_interim_generator_is_the_jobs_own():
    a, b = interim_generator(5, "job-a"), interim_generator(5, "job-b")
    assert torch.equal(a.get_state(), interim_generator(5, "job-a").get_state())
    assert not torch.equal(a.get_state(), b.get_state())


def test_the_feature_cache_keeps_the_newest_versions():
    cache = ExemplarFeatures(keep=2)
    f = Features(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))
    for v in (1, 2, 3):
        cache.put(v, f)
    assert 1 not in cache and cache.get(2) is f and 3 in cache


# -- the pointer rule of the commits -----------------------------------------------------------


def _ptr(current: int, pinned: int | None = None) -> PointerState:
    return PointerState(current=current, pinned=pinned, history=[])


def _full(before: PointerState, interim: InterimRecord | None, rejected: bool = False):
    gate = {"verdict": "rejected" if rejected else "promoted", "reasons": ["r"]}
    return _decide(before, 3, rejected=rejected, gate=gate, built_on=1, interim=interim)


def test_the_interim_moves_the_pointer_only_from_its_parent():
    ok = _decide(_ptr(1), 2, rejected=False, gate=None, built_on=1, interim=None)
    assert ok.target == 2 and ok.push and ok.note is None
    moved = _decide(_ptr(0), 2, rejected=False, gate=None, built_on=1, interim=None)
    assert moved.target is None and "pointer moved to version 0" in moved.note
    rejected = _decide(_ptr(1), 2, rejected=True, gate={"reasons": []}, built_on=1, interim=None)
    assert rejected.target is None and "promotion gate rejected" in rejected.note


def test_the_full_version_replaces_its_served_interim_and_a_rollback_stands():
    served = InterimRecord(version=2, served=True)
    replace = _full(_ptr(2), served)
    assert replace.target == 3 and not replace.push  # the interim leaves the rollback stack
    # Rolled back from the interim to the parent while the full step trained: it stands.
    rollback = _full(_ptr(1), served)
    assert rollback.target is None and "interim version 2 stood for it" in rollback.note
    assert _full(_ptr(2, pinned=2), served).target is None
    # An interim that was not served (rejected, pinned, moved): the parent is what counts.
    unserved = InterimRecord(version=2, served=False)
    assert _full(_ptr(1), unserved).target == 3 and _full(_ptr(2), unserved).target is None


def test_a_rejected_full_version_withdraws_its_served_interim():
    withdraw = _full(_ptr(2), InterimRecord(version=2, served=True), rejected=True)
    assert withdraw.target == 1 and withdraw.withdrawn and not withdraw.push
    assert "withdrawn" in withdraw.note
    # Not when an operator moved the pointer meanwhile, nor without a served interim.
    assert _full(_ptr(0), InterimRecord(version=2, served=True), rejected=True).target is None
    assert _full(_ptr(1), None, rejected=True).target is None


# -- the worker --------------------------------------------------------------------------------


def _first_job(storage: Storage, worker: Worker, subset) -> None:  # noqa: F811
    worker.ensure_initial_version()
    storage.jobs.submit(*_samples(subset, [0, 1], 40))
    assert worker.run(once=True) == 1


def _announcements(storage: Storage, sub) -> list[tuple[int | None, int | None]]:
    out = []
    while (a := sub.next(0.5)) is not None:
        out.append((a.previous, a.version))
    return out


@pytest.mark.integration
def test_the_interim_is_served_before_the_full_version(env, subset):  # noqa: F811
    storage = _storage(env)
    worker = Worker(storage, _fast(), CPU, consumer="w")
    _first_job(storage, worker, subset)
    assert [v.version for v in storage.versions.list()] == [0, 1]  # no interim on version 0
    worker._warm_features()  # what the idle worker does: version 1's exemplar features
    sub = storage.versions.subscribe()
    job = storage.jobs.submit(*_samples(subset, [2, 3], 40))
    assert worker.run(once=True) == 1

    # Served in that order: the interim from its parent, then the full version from it.
    assert _announcements(storage, sub) == [(1, 2), (2, 3)]
    status = storage.jobs.status(job)
    assert (status.state, status.interim_version, status.version) == ("done", 2, 3)
    assert status.interim_served and status.pointer_moved and status.interim_gate == "promoted"
    assert 0 < status.interim_seconds < status.full_seconds and not status.interim_withdrawn
    infos = {v.version: v for v in storage.versions.list()}
    assert infos[2].interim and not infos[3].interim and infos[2].gate == "promoted"
    assert storage.versions.version_for_job(job) == 3
    assert storage.versions.interim_for_job(job) == 2
    meta = storage.versions.metadata(2)
    assert meta["interim"] is True and meta["parent_version"] == 1
    assert meta["report"]["exemplar_features_cached"] is True
    assert meta["counts"] == [20, 20, 36, 36]  # 40 posted a class, 4 held out; 20 exemplars
    # Its memory generation (the parent's memory again) went with it when the full version
    # replaced it: nothing builds on it any more.
    assert meta["memory_generation"] == 2 and storage.versions.memory_info(2) is None
    assert storage.versions.metadata(3)["parent_version"] == 1
    # The interim left the rollback stack: a rollback goes back to the parent.
    assert storage.versions.pointer().history[0] == 1
    assert storage.versions.rollback() == 1


@pytest.fixture
def two_envs() -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    r = require_redis(TEST_REDIS_URL)
    envs = []
    for name in ("on", "off"):
        prefix = f"bsce-test-fast-{name}-{uuid.uuid4().hex[:10]}"
        envs.append({"REDIS_URL": TEST_REDIS_URL, "BSCE_PREFIX": prefix, "BENTOML_HOME": ""})
    yield envs[0], envs[1]
    for e in envs:
        drop_prefix(r, e["BSCE_PREFIX"])
    r.close()


@pytest.mark.integration
def test_the_full_version_is_the_one_made_without_the_fast_path(two_envs, tmp_path, subset):  # noqa: F811
    """Same seed, jobs and recipe (gate on), fast path on and off: the full versions are the
    same computation, bit for bit (weights, class means, random stream, memory)."""
    stores = []
    for e, fast in zip(two_envs, (True, False), strict=True):
        e["BENTOML_HOME"] = str(tmp_path / e["BSCE_PREFIX"])
        storage = _storage(e)
        config = _fast(GateConfig()).model_copy(update={"fast_path": fast})
        worker = Worker(storage, config, CPU, consumer="w")
        _first_job(storage, worker, subset)
        storage.jobs.submit(*_samples(subset, [2, 3], 40))
        assert worker.run(once=True) == 1
        stores.append(storage)
    on, off = stores
    assert [v.interim for v in on.versions.list()] == [False, False, True, False]
    assert [v.version for v in off.versions.list()] == [0, 1, 2]
    (t_on, m_on), (t_off, m_off) = on.versions.load(3), off.versions.load(2)
    assert t_on.keys() == t_off.keys() and "rng.state" in t_on
    for k in t_on:
        assert torch.equal(t_on[k], t_off[k]), k
    same = ("parent_version", "step", "counts", "class_names", "active_classes", "rng", "config")
    assert {k: m_on[k] for k in same} == {k: m_off[k] for k in same}
    assert m_on["report"]["loss_per_epoch"] == m_off["report"]["loss_per_epoch"]
    assert m_on["gate"]["classes"] == m_off["gate"]["classes"]
    assert m_on["heldout_chunks"][:-1] == m_off["heldout_chunks"][:-1]
    mem_on, mem_off = on.versions.memory(3), off.versions.memory(2)
    assert mem_on.keys() == mem_off.keys()
    assert all(np.array_equal(mem_on[c], mem_off[c]) for c in mem_on)


class _ConstantInterim(Worker):
    """An interim whose outputs are the same for every image: the gate must reject it."""

    def _fit_interim(self, *args, **kwargs):
        fit = super()._fit_interim(*args, **kwargs)
        with torch.no_grad():
            fit.model.head.weight.zero_()
            fit.model.head.bias.zero_()
        return fit


class _ConstantFull(Worker):
    """A full step whose outputs are the same for every image: the gate must reject it."""

    def _train(self, *args, **kwargs):
        result = super()._train(*args, **kwargs)
        with torch.no_grad():
            result.model.head.weight.zero_()
            result.model.head.bias.zero_()
        return result


@pytest.mark.integration
def test_a_rejected_interim_is_never_served(env, subset):  # noqa: F811
    storage = _storage(env)
    worker = _ConstantInterim(storage, _fast(), CPU, consumer="w")
    _first_job(storage, worker, subset)
    sub = storage.versions.subscribe()
    job = storage.jobs.submit(*_samples(subset, [2, 3], 40))
    assert worker.run(once=True) == 1
    # The pointer went from the parent straight to the full version.
    assert _announcements(storage, sub) == [(1, 3)]
    status = storage.jobs.status(job)
    assert status.interim_version == 2 and status.interim_gate == "rejected"
    assert status.interim_served is False and "promotion gate rejected" in status.interim_note
    assert storage.versions.info(2).gate == "rejected" and storage.versions.info(2).interim
    assert status.state == "done" and status.version == 3 and storage.versions.current() == 3


class _ConstantBoth(_ConstantInterim, _ConstantFull):
    pass


@pytest.mark.integration
def test_both_stages_rejected_keep_the_parent_served(env, subset):  # noqa: F811
    storage = _storage(env)
    _first_job(storage, Worker(storage, _fast(), CPU, consumer="w"), subset)
    worker = _ConstantBoth(storage, _fast(), CPU, consumer="w")
    sub = storage.versions.subscribe()
    job = storage.jobs.submit(*_samples(subset, [2, 3], 40))
    assert worker.run(once=True) == 1
    assert _announcements(storage, sub) == []
    status = storage.jobs.status(job)
    assert (status.interim_gate, status.interim_served) == ("rejected", False)
    assert status.state == "rejected" and status.version == 3 and not status.interim_withdrawn
    assert storage.versions.current() == 1


@pytest.mark.integration
def test_a_rejected_full_version_withdraws_the_served_interim(env, subset):  # noqa: F811
    storage = _storage(env)
    worker = _ConstantFull(storage, _fast(), CPU, consumer="w")
    plain = Worker(storage, _fast(), CPU, consumer="w")
    _first_job(storage, plain, subset)
    sub = storage.versions.subscribe()
    job = storage.jobs.submit(*_samples(subset, [2, 3], 40))
    assert worker.run(once=True) == 1
    # Served, then withdrawn: the lineage is the one a job without the fast path leaves.
    assert _announcements(storage, sub) == [(1, 2), (2, 1)]
    status = storage.jobs.status(job)
    assert status.state == "rejected" and status.interim_withdrawn
    assert "interim version 2 is withdrawn" in status.note
    assert storage.versions.current() == 1
    # The next job builds on the parent, not on the withdrawn interim.
    storage.jobs.submit(*_samples(subset, [4], 40))
    assert plain.run(once=True) == 1
    assert storage.versions.metadata(5)["parent_version"] == 1


class _RollsBackThenTrains(Worker):
    def _train(self, *args, **kwargs):
        assert self.storage.versions.current() == 2  # the interim is served
        self.storage.versions.rollback()
        return super()._train(*args, **kwargs)


@pytest.mark.integration
def test_a_rollback_from_the_interim_during_the_full_step_stands(env, subset):  # noqa: F811
    storage = _storage(env)
    _first_job(storage, Worker(storage, _fast(), CPU, consumer="w"), subset)
    job = storage.jobs.submit(*_samples(subset, [2, 3], 40))
    assert _RollsBackThenTrains(storage, _fast(), CPU, consumer="w").run(once=True) == 1
    status = storage.jobs.status(job)
    assert status.state == "done" and status.version == 3 and status.pointer_moved is False
    assert "interim version 2 stood for it" in status.note
    assert storage.versions.current() == 1


class _FailsAfterTheInterim(Worker):
    def _train(self, *args, **kwargs):
        raise JobLimitError("over the limit")


@pytest.mark.integration
def test_a_job_that_fails_for_good_withdraws_its_interim(env, subset):  # noqa: F811
    storage = _storage(env)
    _first_job(storage, Worker(storage, _fast(), CPU, consumer="w"), subset)
    job = storage.jobs.submit(*_samples(subset, [2, 3], 40))
    assert _FailsAfterTheInterim(storage, _fast(), CPU, consumer="w").run(once=True) == 1
    status = storage.jobs.status(job)
    assert status.state == "failed" and status.interim_version == 2 and status.interim_withdrawn
    assert storage.versions.current() == 1


class _Killed(BaseException):
    pass


class _DiesAfterTheInterim(Worker):
    """Dies (as a SIGKILL would: no cleanup of the claim) once the interim is committed."""

    def _train(self, *args, **kwargs):
        raise _Killed


@pytest.mark.integration
def test_a_crash_between_the_commits_gives_one_interim_and_one_full_version(env, subset):  # noqa: F811
    storage = _storage(env)
    config = _fast()
    _first_job(storage, Worker(storage, config, CPU, consumer="w1"), subset)
    job = storage.jobs.submit(*_samples(subset, [2, 3], 40))
    with pytest.raises(_Killed):
        _DiesAfterTheInterim(storage, config, CPU, consumer="w1").run(once=True)
    assert [v.version for v in storage.versions.list()] == [0, 1, 2]
    assert storage.versions.current() == 2 and storage.jobs.status(job).state == "running"
    # The served interim's memory is its parent's, written again as its own generation.
    memory1, memory2 = storage.versions.memory(1), storage.versions.memory(2)
    assert all(np.array_equal(memory1[c], memory2[c]) for c in memory1)
    # The claim times out (2 s); another worker finds the interim, builds on its parent.
    other = Worker(storage, config, CPU, consumer="w2")
    while other.run(once=True) == 0:
        pass
    status = storage.jobs.status(job)
    assert status.attempts == 2 and (status.interim_version, status.version) == (2, 3)
    assert [v.version for v in storage.versions.list()] == [0, 1, 2, 3]
    assert [v.interim for v in storage.versions.list()] == [False, False, True, False]
    meta = storage.versions.metadata(3)
    assert meta["parent_version"] == 1 and meta["rng"] == "parent"
    assert status.state == "done" and storage.versions.current() == 3
