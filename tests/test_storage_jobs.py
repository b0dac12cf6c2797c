"""Update jobs on a Redis Stream (with the label registration of a submission), and the
transaction that ends a learning step (with its memory generations)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from storage import (
    ExemplarStore,
    IdempotencyConflictError,
    JobQueue,
    JobStateError,
    JobTooLargeError,
    JobValidationError,
    LabelMap,
    LabelValidationError,
    MemoryGenerationError,
    Storage,
    StorageError,
    StoreUnavailableError,
    UnknownJobError,
    next_announcement,
    open_storage,
)
from storage.keys import JOB_GROUP
from tests.test_storage_support import TEST_REDIS_URL, images, prefix_keys

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec"),
]


def _stream_len(q: JobQueue) -> int:
    return int(q.r.xlen(q.keys.jobs_stream))


def test_submit_claim_complete(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    t0 = time.time()
    jid = q.submit(images(3, 1), ["cat", "dog", "cat"], {"epochs": 2})
    st = q.status(jid)
    assert (st.state, st.num_samples, st.classes, st.attempts, st.overrides) == (
        "queued",
        3,
        ["cat", "dog"],
        0,
        {"epochs": 2},
    )
    assert st.submitted.timestamp() >= t0 - 1 and st.started is None and st.version is None

    job = q.claim("w1", block_ms=0)
    assert job is not None and job.id == jid and job.attempts == 1
    assert np.array_equal(job.samples, images(3, 1)) and job.labels == ["cat", "dog", "cat"]
    # The names were registered when the job was queued; the job carries their indices.
    assert job.class_indices == {"cat": 0, "dog": 1} and job.indices == [0, 1, 0]
    assert LabelMap(r, prefix).names() == ["cat", "dog"]
    q.mark_running(jid)
    assert q.status(jid).state == "running" and q.status(jid).started is not None
    assert q.pending() == 1
    q.complete(jid, version=4)
    st = q.status(jid)
    assert (st.state, st.version, st.error) == ("done", 4, None) and st.finished >= st.started
    assert q.pending() == 0 and q.claim("w1", block_ms=0) is None
    assert not r.exists(q.keys.job_samples(jid))  # samples go once the job is done
    q.complete(jid, version=4)  # idempotent
    with pytest.raises(JobStateError):
        q.complete(jid, version=5)
    assert q.counts_by_state() == {"queued": 0, "running": 0, "done": 1, "failed": 0, "rejected": 0}
    assert [s.id for s in q.list(10)] == [jid]


def test_concurrent_submissions_none_lost_in_order(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    posted: list[tuple[int, int, str]] = []

    def producer(p: int) -> None:
        own = JobQueue(r, prefix)
        for seq in range(8):
            jid = own.submit(images(1, p * 100 + seq), [f"c{p}"], {"producer": p, "seq": seq})
            posted.append((p, seq, jid))

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    claimed: list[str] = []
    while (job := q.claim("w1", block_ms=0)) is not None:
        claimed.append(job.id)
        q.complete(job.id, version=len(claimed))
    assert sorted(claimed) == sorted(jid for _, _, jid in posted)  # none lost, none twice
    # Claimed in the order the submissions committed (the stream's order) ...
    stream_order = [json.loads(r.hget(q.keys.job(j), "overrides")) for j in claimed]
    entries = [e[1][b"job_id"].decode() for e in r.xrange(q.keys.jobs_stream)]
    assert claimed == entries
    # ... hence each producer's jobs in the order it posted them.
    for p in range(4):
        assert [o["seq"] for o in stream_order if o["producer"] == p] == list(range(8))


def test_submit_registers_labels_with_the_job_in_one_transaction(
    r: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = JobQueue(r, prefix)
    labels = LabelMap(r, prefix)
    labels.get_or_add(["cat"])
    # `classes` fixes the order in which new names get their indices.
    job = q.submit_job(images(3, 1), ["dog", "bird", "cat"], classes=["bird", "cat", "dog"])
    assert job.classes == ["bird", "cat", "dog"] and job.new_classes == ["bird", "dog"]
    assert job.class_indices == {"bird": 1, "cat": 0, "dog": 2}
    assert labels.names() == ["cat", "bird", "dog"]
    assert q.status(job.job_id).classes == ["bird", "cat", "dog"]
    claimed = q.claim("w", block_ms=0)
    assert claimed is not None and claimed.indices == [2, 1, 0]

    # Refused or failed submissions leave no name and no job.
    before = prefix_keys(r, prefix), labels.names()
    for samples, names, classes, error in [
        (images(1, 2), ["fish"], ["fish", "cow"], JobValidationError),
        (images(1, 2), ["fish"], ["fish", "fish"], JobValidationError),
        (images(1, 2), [" fish"], None, LabelValidationError),
        (images(600, 2), ["fish"] * 600, None, JobTooLargeError),
    ]:
        with pytest.raises(error):
            JobQueue(r, prefix, max_job_bytes=100_000).submit(samples, names, classes=classes)
        assert (prefix_keys(r, prefix), labels.names()) == before

    def lost(*_: object) -> None:  # the connection drops before EXEC
        raise StoreUnavailableError("the store (Redis) is unreachable: simulated")

    monkeypatch.setattr(q, "_stage_submit", lost)
    with pytest.raises(StoreUnavailableError):
        q.submit(images(1, 3), ["fish"])
    assert (prefix_keys(r, prefix), labels.names()) == before


def test_concurrent_submissions_agree_on_label_indices(r: redis.Redis, prefix: str) -> None:
    names = [f"class-{i}" for i in range(12)]
    jobs: list[dict[str, int]] = []

    def producer(seed: int) -> None:
        own = JobQueue(r, prefix)
        order = list(np.random.default_rng(seed).permutation(names))
        for i in range(0, len(order), 3):
            chunk = [str(n) for n in order[i : i + 3]]
            jobs.append(own.submit_job(images(len(chunk), seed), chunk).class_indices)

    threads = [threading.Thread(target=producer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = {n: i for i, n in enumerate(LabelMap(r, prefix).names())}
    assert sorted(final.values()) == list(range(12))  # one index per name, no gaps
    assert len(jobs) == 16 and all(final[n] == i for job in jobs for n, i in job.items())


def test_dead_worker_job_is_reclaimed_and_completes_once(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    a = q.submit(images(2, 1), ["a", "a"])
    b = q.submit(images(2, 2), ["b", "b"])
    job = q.claim("w1", block_ms=0, min_idle_ms=300)
    assert job is not None and job.id == a
    q.mark_running(a)  # ... and w1 dies here, never acknowledging

    # While w1 might still be alive, nobody else gets a job: not a, and not the newer b.
    # (A minute of silence is what makes w1 dead here, so a slow machine cannot.)
    t = time.monotonic()
    assert q.claim("w2", block_ms=100, min_idle_ms=60_000) is None
    assert time.monotonic() - t >= 0.09
    job2 = q.claim("w2", block_ms=30_000, min_idle_ms=300)
    assert job2 is not None and job2.id == a and job2.attempts == 2
    assert q.status(a).attempts == 2
    q.complete(a, version=1)
    with pytest.raises(JobStateError):  # the zombie's late result is refused
        q.complete(a, version=2)
    assert q.status(a).version == 1

    nxt = q.claim("w2", block_ms=0, min_idle_ms=300)
    assert nxt is not None and nxt.id == b  # then the next one, in order
    q.complete(b, version=2)
    assert q.claim("w1", block_ms=0, min_idle_ms=0) is None  # a is never handed out again
    assert q.counts_by_state()["done"] == 2


def test_heartbeat_keeps_a_long_job(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    q.submit(images(1, 1), ["x"])
    job = q.claim("w1", min_idle_ms=300)
    assert job is not None
    for _ in range(5):  # a step longer than min_idle_ms, with heartbeats
        time.sleep(0.1)
        q.heartbeat(job, "w1")
        assert q.claim("w2", block_ms=0, min_idle_ms=300) is None
    taken = q.claim("w2", block_ms=2000, min_idle_ms=300)  # w1 went quiet
    assert taken is not None and taken.id == job.id and taken.attempts == 2
    with pytest.raises(JobStateError, match="taken over"):
        q.heartbeat(job, "w1")  # w1 learns it lost the job
    q.complete(job.id, 1)
    with pytest.raises(JobStateError, match="no longer pending"):
        q.heartbeat(taken, "w2")


def test_three_failures_mark_failed_and_stay_inspectable(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    jid = q.submit(images(1, 1), ["x"])
    other = q.submit(images(1, 2), ["y"])
    for attempt in (1, 2, 3):
        job = q.claim("w1", block_ms=0)
        assert job is not None and job.id == jid and job.attempts == attempt  # retried first
        q.mark_running(jid)
        state = q.fail(jid, f"boom {attempt}")
        assert state == ("failed" if attempt == 3 else "queued")
    st = q.status(jid)
    assert (st.state, st.attempts, st.error) == ("failed", 3, "boom 3") and st.finished is not None
    assert 0 < r.ttl(q.keys.job_samples(jid)) <= 7 * 24 * 3600  # kept a while for inspection
    with pytest.raises(JobStateError):
        q.fail(jid, "again")
    with pytest.raises(JobStateError):
        q.complete(jid, 3)
    job = q.claim("w1", block_ms=0)
    assert job is not None and job.id == other
    # "other" is claimed but not marked running: still queued.
    assert q.counts_by_state() == {"queued": 1, "running": 0, "done": 0, "failed": 1, "rejected": 0}


def test_job_whose_worker_dies_three_times_is_failed(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    jid = q.submit(images(1, 1), ["x"])
    for w in ("w1", "w2", "w3"):
        job = q.claim(w, block_ms=0, min_idle_ms=0)
        assert job is not None and job.id == jid
    assert q.claim("w4", block_ms=0, min_idle_ms=0) is None
    st = q.status(jid)
    assert st.state == "failed" and "3 attempts" in (st.error or "") and q.pending() == 0


def test_release_hands_the_job_on_without_spending_an_attempt(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    jid = q.submit(images(1, 1), ["x"])
    assert q.claim("w1", block_ms=0, min_idle_ms=60_000) is not None
    q.mark_running(jid)
    q.release(jid)  # e.g. SIGTERM before the step finished
    assert q.status(jid).state == "queued"
    job = q.claim("w2", block_ms=0, min_idle_ms=60_000)  # at once, despite the long timeout
    assert job is not None and job.id == jid and job.attempts == 1


def test_a_failed_attempt_waits_for_its_retry_and_nothing_overtakes_it(
    r: redis.Redis, prefix: str
) -> None:
    q = JobQueue(r, prefix)
    jid = q.submit(images(1, 1), ["x"])
    q.submit(images(1, 2), ["y"])
    assert q.claim("w1", block_ms=0) is not None
    q.mark_running(jid)
    t = time.time()
    assert q.fail(jid, "boom", retry_after_s=3600) == "queued"
    st = q.status(jid)
    assert st.state == "queued" and st.error == "boom" and st.retry_at is not None
    assert st.retry_at.timestamp() >= t + 3599
    # Neither its worker nor another gets it, nor the newer job, before the hour is out.
    assert q.claim("w1", block_ms=0) is None
    assert q.claim("w2", block_ms=0, min_idle_ms=0) is None
    assert q.claim("w2", block_ms=300, min_idle_ms=0) is None


def test_a_job_is_claimable_again_once_its_retry_delay_has_passed(
    r: redis.Redis, prefix: str
) -> None:
    q = JobQueue(r, prefix)
    jid = q.submit(images(1, 1), ["x"])
    assert q.claim("w1", block_ms=0) is not None
    assert q.fail(jid, "boom", retry_after_s=0.2) == "queued"
    job = q.claim("w2", block_ms=60_000, min_idle_ms=0)  # waits out the delay
    assert job is not None and job.id == jid and job.attempts == 2
    assert q.status(jid).retry_at is None and not r.hlen(q.keys.jobs_retry)


def test_a_permanent_failure_fails_the_job_at_once(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    jid = q.submit(images(1, 1), ["x"])
    assert q.claim("w1", block_ms=0) is not None
    assert q.fail(jid, "the parent cannot be loaded", permanent=True) == "failed"
    st = q.status(jid)
    assert (st.state, st.attempts, st.error) == ("failed", 1, "the parent cannot be loaded")
    assert q.pending() == 0 and q.claim("w1", block_ms=0) is None


def _idempotency_record(q: JobQueue, key: str) -> str:
    return q.keys.idempotency(hashlib.sha256(key.encode()).hexdigest())


def test_a_repeated_submission_with_its_idempotency_key_is_the_same_job(
    r: redis.Redis, prefix: str
) -> None:
    q = JobQueue(r, prefix)
    first = q.submit_job(images(2, 1), ["a", "b"], idempotency_key="retry-1")
    assert not first.replayed and first.new_classes == ["a", "b"]
    again = q.submit_job(images(2, 1), ["a", "b"], idempotency_key="retry-1")
    assert again.replayed and again.model_dump() == {**first.model_dump(), "replayed": True}
    assert _stream_len(q) == 1 and len(q.list()) == 1
    assert LabelMap(r, prefix).names() == ["a", "b"]
    assert 0 < r.ttl(_idempotency_record(q, "retry-1")) <= 24 * 3600

    # With the caller's digest of its request, that digest decides what "the same" is.
    one = q.submit_job(images(1, 3), ["c"], idempotency_key="retry-2", request_digest="d1")
    two = q.submit_job(images(1, 4), ["e"], idempotency_key="retry-2", request_digest="d1")
    assert two.replayed and two.job_id == one.job_id and two.classes == ["c"]
    assert _stream_len(q) == 2 and LabelMap(r, prefix).names() == ["a", "b", "c"]


def test_an_idempotency_key_used_for_another_request_is_a_conflict(
    r: redis.Redis, prefix: str
) -> None:
    q = JobQueue(r, prefix)
    first = q.submit_job(images(2, 1), ["a", "b"], idempotency_key="k")
    second = q.submit_job(images(1, 1), ["a"], idempotency_key="k2", request_digest="d1")
    before = prefix_keys(r, prefix), _stream_len(q)
    for earlier, call in (
        (first, lambda: q.submit_job(images(2, 2), ["a", "b"], idempotency_key="k")),
        (first, lambda: q.submit_job(images(2, 1), ["a", "c"], idempotency_key="k")),
        (
            second,
            lambda: q.submit_job(images(1, 1), ["a"], idempotency_key="k2", request_digest="d2"),
        ),
    ):
        with pytest.raises(IdempotencyConflictError, match="different request") as e:
            call()
        assert isinstance(e.value, StorageError) and earlier.job_id in str(e.value)
    assert (prefix_keys(r, prefix), _stream_len(q)) == before
    assert LabelMap(r, prefix).names() == ["a", "b"]
    for bad in ("", "with space", "x" * 256, "caf\u00e9"):
        with pytest.raises(JobValidationError, match="idempotency key"):
            q.submit_job(images(1, 1), ["z"], idempotency_key=bad)
    assert (prefix_keys(r, prefix), _stream_len(q)) == before


def test_concurrent_submissions_with_one_idempotency_key_make_one_job(
    r: redis.Redis, prefix: str
) -> None:
    results, errors = [], []

    def submit() -> None:
        try:
            q = JobQueue(r, prefix)
            results.append(q.submit_job(images(2, 1), ["a", "b"], idempotency_key="same"))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert len({s.job_id for s in results}) == 1
    assert sum(not s.replayed for s in results) == 1
    assert _stream_len(JobQueue(r, prefix)) == 1


def test_blocking_claim_wakes_on_submit(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    timer = threading.Timer(0.2, lambda: JobQueue(r, prefix).submit(images(1, 1), ["x"]))
    timer.start()
    job = q.claim("w1", block_ms=60_000)  # returns as soon as the job is queued
    timer.join()
    assert job is not None


def test_oversized_job_writes_nothing(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix, max_job_bytes=10_000)
    q.submit(images(10, 1), ["x"] * 10)  # 1,920 bytes: fine
    before = prefix_keys(r, prefix), _stream_len(q)
    with pytest.raises(JobTooLargeError, match="limit is 10000 bytes") as e:
        q.submit(images(60, 1), ["x"] * 60)
    assert isinstance(e.value, ValueError)
    assert (prefix_keys(r, prefix), _stream_len(q)) == before


@pytest.mark.parametrize(
    "samples, labels, overrides, fragment",
    [
        (images(2, 1).astype(np.int16), ["a", "b"], None, "dtype uint8"),
        (images(2, 1)[:, 0], ["a", "b"], None, "4 dimensions"),
        (images(2, 1, chw=(3, 9, 8)), ["a", "b"], None, r"\(3, 8, 8\)"),
        (np.zeros((0, 3, 8, 8), np.uint8), [], None, "empty"),
        (images(2, 1), ["a"], None, "one label per sample"),
        (images(2, 1), "ab", None, "sequence"),
        (images(2, 1), ["a", " b"], None, "whitespace"),
        (images(2, 1), ["a", "b"], {"lr": object()}, "JSON"),
        (images(2, 1), ["a", "b"], ["lr"], "dict"),
        (images(2, 1).tolist(), ["a", "b"], None, "numpy array"),
    ],
)
def test_bad_job_writes_nothing(
    r: redis.Redis, prefix: str, samples: object, labels: object, overrides: object, fragment: str
) -> None:
    q = JobQueue(r, prefix, sample_shape=(3, 8, 8))
    before = prefix_keys(r, prefix), _stream_len(q)
    with pytest.raises(ValueError, match=fragment):
        q.submit(samples, labels, overrides)  # type: ignore[arg-type]
    assert (prefix_keys(r, prefix), _stream_len(q)) == before


def test_unknown_job(r: redis.Redis, prefix: str) -> None:
    q = JobQueue(r, prefix)
    before = prefix_keys(r, prefix)
    for call in (
        lambda: q.status("nope"),
        lambda: q.mark_running("nope"),
        lambda: q.complete("nope", 1),
        lambda: q.fail("nope", "x"),
        lambda: q.release("nope"),
    ):
        with pytest.raises(UnknownJobError, match="no job with id 'nope'") as e:
            call()
        assert isinstance(e.value, KeyError)
    assert prefix_keys(r, prefix) == before
    with pytest.raises(JobValidationError):
        q.claim("")


# -- the end of a learning step -----------------------------------------------------------


@pytest.fixture
def storage(r: redis.Redis, prefix: str, tmp_path: Path) -> Storage:
    return Storage(r, prefix, bentoml_home=tmp_path / "bentoml")


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(seed))}


def test_commit_step_is_one_transaction(storage: Storage) -> None:
    st = storage
    st.versions.ensure_initial(lambda: (_weights(0), {}))
    sub = st.versions.subscribe()
    try:
        jid = st.jobs.submit(images(4, 1), ["a", "a", "b", "b"])
        job = st.jobs.claim("w1")
        assert job is not None
        st.jobs.mark_running(job.id)
        memory = {0: images(2, 5), 1: images(2, 6)}
        res = st.commit_step(job.id, st.versions.next_version(), _weights(1), {"step": 1}, memory)
        assert (res.version, res.tag, res.served) == (1, "bsce-classifier:v1", True)
        assert st.jobs.status(jid).state == "done" and st.jobs.status(jid).version == 1
        assert st.versions.info(1).memory_generation == 1
        assert st.exemplars.generations() == [0, 1] and st.exemplars.counts(1) == {0: 2, 1: 2}
        assert np.array_equal(st.versions.memory(1)[0], memory[0])
        assert st.versions.current() == 1 and st.versions.version_for_job(jid) == 1
        a = next_announcement(sub, 2.0)
        assert a is not None and (a.event, a.version, a.previous) == ("set", 1, 0)

        # Pinned: the version and memory are saved, the pointer stays.
        st.versions.pin(0)
        next_announcement(sub, 2.0)
        jid2 = st.jobs.submit(images(1, 2), ["c"])
        assert st.jobs.claim("w1") is not None
        res = st.commit_step(jid2, st.versions.next_version(), _weights(2), {}, {2: images(1, 7)})
        assert (res.version, res.served) == (2, False)
        assert st.versions.current() == 0 and st.exemplars.generations() == [0, 1, 2]
        assert next_announcement(sub, 0.2) is None
    finally:
        sub.close()


def test_commit_step_refuses_a_finished_job(storage: Storage) -> None:
    st = storage
    st.versions.ensure_initial(lambda: (_weights(0), {}))
    jid = st.jobs.submit(images(1, 1), ["a"])
    assert st.jobs.claim("w1", min_idle_ms=0) is not None
    # w1 stalls; w2 takes the job over and finishes it.
    assert st.jobs.claim("w2", min_idle_ms=0) is not None
    st.commit_step(jid, 1, _weights(1), {}, {0: images(1, 3)})
    # w1 wakes up: its version number is taken, and the job is done anyway.
    with pytest.raises((JobStateError, ValueError)):
        st.commit_step(jid, st.versions.next_version(), _weights(9), {}, {0: images(1, 9)})
    assert [i.version for i in st.versions.list()] == [0, 1]
    assert st.exemplars.generations() == [0, 1] and st.versions.current() == 1
    assert np.array_equal(st.versions.memory(1)[0], images(1, 3))
    assert len(st.versions.model_store.list("bsce-classifier")) == 2  # its files are gone


def _commit(st: Storage, memory: dict[int, np.ndarray]) -> int:
    jid = st.jobs.submit(images(1, 1), ["a"])
    job = st.jobs.claim("w1")
    assert job is not None and job.id == jid
    return st.commit_step(jid, st.versions.next_version(), _weights(9), {}, memory).version


def test_commit_collects_the_generations_no_version_needs(storage: Storage) -> None:
    st = storage
    st.versions.ensure_initial(lambda: (_weights(0), {}))
    for v in (1, 2, 3):
        assert _commit(st, {0: images(v, v)}) == v
    assert st.exemplars.generations() == [0, 1, 2, 3]  # all in the history or current
    assert st.versions.rollback() == 2 and st.versions.rollback() == 1
    # 2 and 3 are kept until the next commit: 3 is the newest, and 2 could be pinned again.
    assert st.exemplars.generations() == [0, 1, 2, 3]
    assert _commit(st, {0: images(4, 4)}) == 4
    # Current 4, history [1, 0], newest 4: the memories of 2 and 3 are gone.
    assert st.exemplars.generations() == [0, 1, 4]
    assert np.array_equal(st.versions.memory(1)[0], images(1, 1))  # a rollback finds it
    for gone in (2, 3):
        with pytest.raises(MemoryGenerationError, match="garbage-collected"):
            st.versions.memory(gone)
    assert st.versions.memory_info(2) is None

    # Pinned: the pinned version keeps its memory; versions saved behind the pin keep
    # theirs while they are the newest.
    st.versions.pin(1)
    assert _commit(st, {0: images(5, 5)}) == 5
    assert _commit(st, {0: images(6, 6)}) == 6
    assert st.exemplars.generations() == [0, 1, 4, 6]  # 5: neither newest, pinned nor history
    st.versions.unpin()
    assert st.versions.current() == 6 and st.versions.collect_memory() == []


def test_commit_moves_the_pointer_only_from_the_steps_parent(storage: Storage) -> None:
    st = storage
    st.versions.ensure_initial(lambda: (_weights(0), {}))

    def commit(parent: int) -> tuple[str, bool, str | None]:
        jid = st.jobs.submit(images(1, 1), ["a"])
        assert st.jobs.claim("w1") is not None
        res = st.commit_step(
            jid, st.versions.next_version(), _weights(9), {"parent_version": parent}, {}
        )
        status = st.jobs.status(jid)
        assert (status.state, status.version, status.built_on) == ("done", res.version, parent)
        assert (status.pointer_moved, status.note) == (res.served, res.note)
        assert res.built_on == parent
        return jid, res.served, res.note

    assert commit(0)[1:] == (True, None)  # the pointer still named its parent
    assert st.versions.current() == 1

    # Rolled back while version 2 (built on 1) trained: saved, not served.
    assert st.versions.rollback() == 0
    _, served, note = commit(1)
    assert not served and st.versions.current() == 0 and st.versions.exists(2)
    assert "built on version 1" in (note or "") and "moved to version 0" in (note or "")

    # An operator's set to another version stands the same way.
    assert st.versions.set_current(2)
    assert commit(1)[1] is False and st.versions.current() == 2

    # Pinned: saved behind the pin; unpin serves the newest.
    st.versions.pin(2)
    _, served, note = commit(2)
    assert not served and "pinned to version 2" in (note or "")
    assert (st.versions.current(), st.versions.pinned()) == (2, 2)
    assert st.versions.unpin() == 4


_KILLED_WORKER = textwrap.dedent(
    """
    import sys, time, torch
    from storage import Storage, connect
    st = Storage(connect(sys.argv[1], None), sys.argv[2], bentoml_home=sys.argv[3])
    job = st.jobs.claim("doomed", block_ms=5000, min_idle_ms=500)
    st.jobs.mark_running(job.id)
    # Half a step: the version's files are written, nothing is committed.
    st.versions.write(st.versions.next_version(), {"w": torch.zeros(3)}, {"job_id": job.id})
    print("written", flush=True)
    time.sleep(60)
    """
)


def test_worker_killed_mid_job(machine_redis: redis.Redis, tmp_path: Path) -> None:
    prefix = f"bsce-test-kill-{os.getpid()}"
    home = tmp_path / "bentoml"
    st = Storage(machine_redis, prefix, bentoml_home=home)
    try:
        st.versions.ensure_initial(lambda: (_weights(0), {}))
        jid = st.jobs.submit(images(2, 1), ["a", "b"])
        repo = Path(__file__).resolve().parents[1]
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WORKER, TEST_REDIS_URL, prefix, str(home)],
            cwd=repo,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"written"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert st.jobs.status(jid).state == "running" and st.versions.next_version() == 1

        job = st.jobs.claim("survivor", block_ms=5000, min_idle_ms=500)
        assert job is not None and job.id == jid and job.attempts == 2
        # The dead writer's save lock on version 1 is taken over by the job's next attempt.
        assert machine_redis.exists(st.versions.keys.version_lock(1))
        res = st.commit_step(job.id, st.versions.next_version(), _weights(1), {}, {0: images(1, 1)})
        assert res.version == 1
        assert [i.version for i in st.versions.list()] == [0, 1]  # exactly once
        assert torch.equal(st.versions.load(1)[0]["w"], _weights(1)["w"])
        assert r_pending(machine_redis, st) == 0 and st.jobs.status(jid).state == "done"
    finally:
        for k in prefix_keys(machine_redis, prefix):
            machine_redis.delete(k)


def r_pending(r: redis.Redis, st: Storage) -> int:
    return int(r.xpending(st.jobs.keys.jobs_stream, JOB_GROUP)["pending"])


def test_exemplar_store_and_jobs_share_nothing_across_prefixes(r: redis.Redis, prefix: str) -> None:
    ExemplarStore(r, prefix).write(1, {0: images(1, 1)})
    q = JobQueue(r, prefix)
    q.submit(images(1, 1), ["a"])
    other = prefix + "-other"
    try:
        assert ExemplarStore(r, other).generations() == []
        assert JobQueue(r, other).claim("w", block_ms=0) is None
    finally:
        for k in prefix_keys(r, other):
            r.delete(k)


def test_job_size_limit_from_the_environment(
    r: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("BSCE_MAX_JOB_BYTES", "5000")
    q = open_storage(prefix=prefix).jobs
    assert q.max_job_bytes == 5000
    before = prefix_keys(r, prefix)
    with pytest.raises(JobTooLargeError, match="limit is 5000 bytes"):
        q.submit(images(60, 1), ["x"] * 60)
    assert prefix_keys(r, prefix) == before
    for bad in ("lots", "0", "-3"):
        monkeypatch.setenv("BSCE_MAX_JOB_BYTES", bad)
        with pytest.raises(ValueError, match="BSCE_MAX_JOB_BYTES"):
            open_storage(prefix=prefix)
    monkeypatch.delenv("BSCE_MAX_JOB_BYTES")
    assert open_storage(prefix=prefix).jobs.max_job_bytes == 64 * 1024 * 1024


def test_only_the_recent_pointer_history_keeps_its_memory(storage: Storage, monkeypatch) -> None:
    import storage.versions as versions_module

    monkeypatch.setattr(versions_module, "MEMORY_HISTORY", 2)
    st = storage
    st.versions.ensure_initial(lambda: (_weights(0), {}))
    for v in (1, 2, 3, 4):
        assert _commit(st, {0: images(v, v)}) == v
    # Current 4, history [3, 2, 1, 0]: only 3 and 2 of it keep a memory to build on.
    assert st.exemplars.generations() == [2, 3, 4]
    assert st.versions.rollback() == 3 and st.versions.rollback() == 2
    assert np.array_equal(st.versions.memory(2)[0], images(2, 2))
    with pytest.raises(MemoryGenerationError, match="garbage-collected"):
        st.versions.memory(1)
