"""Upload sessions (storage/sessions.py, the /sessions routes) and the learn transform of
images of any size (learner.core.images.to_training_input).

Storage tests run against the machine's Redis (db 13) and the embedded one, with the Redis
store and the directory store (tmp_path); the HTTP test runs a real ``bentoml serve`` (one
API worker) and the real learner worker (resnet8, one epoch) on Redis database 12.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests

from learner.core.images import decode_image, to_training_input, training_side
from storage import (
    JobValidationError,
    SessionConflictError,
    SessionSettings,
    SessionStateError,
    SessionTooLargeError,
    Storage,
    UnknownSessionError,
)
from tests.test_server_support import b64, class_images, random_image, stack_env
from tests.test_storage_support import images, prefix_keys

# -- the learn transform (no Redis) ----------------------------------------------------------


def test_training_side_is_the_loaders_rule() -> None:
    assert training_side(32, 4) == 32  # CIFAR: random crops inside the padding
    assert training_side(28, 4) == 28
    assert training_side(224, 0) == 256  # ImageNet: 224 crops of a stored 256


def test_any_size_is_resized_and_centre_cropped_and_exact_size_is_untouched() -> None:
    other = random_image(3, w=64, h=48)
    out = to_training_input(other, 32, 4)
    assert out.shape == (3, 32, 32)
    assert np.array_equal(out, decode_image(other, size=32))
    exact = random_image(4)
    assert np.array_equal(to_training_input(exact, 32, 4), decode_image(exact))
    assert to_training_input(other, 224, 0).shape == (3, 256, 256)


# -- the session store -----------------------------------------------------------------------


def _storage(r: redis.Redis, prefix: str, tmp_path: Path, store: str, **kw: Any) -> Storage:
    settings = SessionSettings(
        store="redis" if store == "redis" else str(tmp_path / "samples"), chunk_bytes=1024, **kw
    )
    return Storage(r, prefix, bentoml_home=tmp_path / "bentoml", sessions=settings)


def _session_keys(r: redis.Redis, prefix: str) -> list[bytes]:
    return [k for k in prefix_keys(r, prefix) if b":session:" in k]


@pytest.fixture(name="store_kind", params=["redis", "dir"])
def fixture_store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.integration
def test_open_append_commit_is_an_ordinary_job_read_chunk_by_chunk(
    r: redis.Redis, prefix: str, tmp_path: Path, store_kind: str
) -> None:
    st = _storage(r, prefix, tmp_path, store_kind)
    info = st.sessions.open(["cat", "dog"], {"epochs": 2})
    assert (info.state, info.num_samples, info.store) == ("open", 0, store_kind)
    a, b = images(5, 1), images(3, 2)  # 192 bytes a sample: 5 per 1 KiB chunk
    st.sessions.append(info.id, a, ["cat", "dog", "cat", "cat", "dog"])
    info = st.sessions.append(info.id, b, ["dog"] * 3, expected_samples=5)
    assert (info.num_samples, info.counts, info.num_chunks) == (8, [3, 5], 2)
    assert info.sample_shape == [3, 8, 8] and 0 < (info.expires_in_s or 0) <= 3600
    if store_kind == "dir":
        assert len(list((tmp_path / "samples" / prefix / "sessions" / info.id).glob("*.u8"))) == 2

    job = st.sessions.commit(info.id)
    assert (job.classes, job.new_classes, job.replayed) == (["cat", "dog"], ["cat", "dog"], False)
    assert st.sessions.commit(info.id).job_id == job.job_id  # a retried commit: the same job
    assert st.sessions.commit(info.id).replayed
    status = st.jobs.status(job.job_id)
    assert (status.state, status.num_samples, status.overrides) == ("queued", 8, {"epochs": 2})
    assert r.ttl(st.sessions.keys.job_samples(job.job_id)) == -1  # no longer the session's expiry
    assert not r.exists(st.sessions.keys.session_chunks(info.id))
    with pytest.raises(SessionStateError):
        st.sessions.append(info.id, a, ["cat"] * 5)

    claimed = st.jobs.claim("w1")
    assert claimed is not None and claimed.id == job.job_id
    assert np.array_equal(claimed.samples, np.concatenate([a, b]))
    assert claimed.labels == ["cat", "dog", "cat", "cat", "dog", "dog", "dog", "dog"]
    assert claimed.class_indices == {"cat": 0, "dog": 1}
    st.jobs.complete(job.job_id, 1)
    assert not r.exists(st.sessions.keys.job_samples(job.job_id))
    if store_kind == "dir":
        assert st.sessions.sweep(grace_s=0) == 1  # its job is done: the folder goes
        assert not list((tmp_path / "samples" / prefix / "sessions").iterdir())


@pytest.mark.integration
def test_learn_jobs_are_stored_in_chunks_too(r: redis.Redis, prefix: str, tmp_path: Path) -> None:
    st = _storage(r, prefix, tmp_path, "redis")
    samples = images(12, 3)
    jid = st.jobs.submit(samples, ["a"] * 12)
    assert int(r.hget(st.sessions.keys.job_samples(jid), "chunks")) == 3
    job = st.jobs.claim("w1")
    assert job is not None and np.array_equal(job.samples, samples)


@pytest.mark.integration
def test_refused_appends_change_nothing(
    r: redis.Redis, prefix: str, tmp_path: Path, store_kind: str
) -> None:
    st = _storage(r, prefix, tmp_path, store_kind, max_samples=10, max_bytes=10 * 192)
    sid = st.sessions.open(["cat", "dog"]).id
    before = st.sessions.append(sid, images(4, 1), ["cat"] * 4)
    chunks = r.hgetall(st.sessions.keys.session_chunks(sid))
    refusals: list[tuple[type[Exception], Any]] = [
        (JobValidationError, lambda: st.sessions.append(sid, images(2, 2), ["cat", "bird"])),
        (JobValidationError, lambda: st.sessions.append(sid, images(2, 2, (3, 4, 4)), ["cat"] * 2)),
        (JobValidationError, lambda: st.sessions.append(sid, images(2, 2), ["cat"])),
        (SessionTooLargeError, lambda: st.sessions.append(sid, images(7, 2), ["cat"] * 7)),
        (SessionConflictError, lambda: st.sessions.append(sid, images(1, 2), ["cat"], 3)),
        (UnknownSessionError, lambda: st.sessions.append(uuid.uuid4().hex, images(1, 2), ["cat"])),
        (UnknownSessionError, lambda: st.sessions.info("../../etc")),
        (JobValidationError, lambda: st.sessions.commit(sid)),  # dog has no samples
    ]
    for error, call in refusals:
        with pytest.raises(error):
            call()
    after = st.sessions.info(sid)
    assert after.model_dump(exclude={"expires_in_s"}) == before.model_dump(exclude={"expires_in_s"})
    assert r.hgetall(st.sessions.keys.session_chunks(sid)) == chunks
    assert not st.labels.names() and st.jobs.list() == []
    if store_kind == "dir":  # the refused appends' files are gone
        assert len(list((tmp_path / "samples" / prefix / "sessions" / sid).glob("*.u8"))) == 1
    empty = st.sessions.open(["cat"]).id
    with pytest.raises(JobValidationError, match="no samples"):
        st.sessions.commit(empty)
    with pytest.raises(JobValidationError):
        st.sessions.open(["cat", "cat"])


@pytest.mark.integration
def test_abort_and_expiry_leave_nothing(
    r: redis.Redis, prefix: str, tmp_path: Path, store_kind: str
) -> None:
    st = _storage(r, prefix, tmp_path, store_kind, ttl_s=1)
    aborted = st.sessions.open(["cat"]).id
    st.sessions.append(aborted, images(7, 1), ["cat"] * 7)
    st.sessions.abort(aborted)
    with pytest.raises(UnknownSessionError):
        st.sessions.info(aborted)
    expired = st.sessions.open(["cat"]).id
    st.sessions.append(expired, images(7, 1), ["cat"] * 7)
    time.sleep(2.2)
    assert _session_keys(r, prefix) == []
    with pytest.raises(UnknownSessionError):
        st.sessions.commit(expired)
    if store_kind == "dir":
        root = tmp_path / "samples" / prefix / "sessions"
        assert not (root / aborted).exists()
        st.sessions.sweep(grace_s=0)
        assert list(root.iterdir()) == []
    assert not st.labels.names() and st.jobs.list() == []


# -- through HTTP ------------------------------------------------------------------------------

ADMIN = "admin-token-for-session-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(name="http", scope="module")
def fixture_http(
    server_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Storage]]:
    from loadtest.stack import StackError, local_stack
    from tests.test_storage_support import drop_prefix, free_port

    prefix = f"bsce-srvtest-{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("sessions")
    home = tmp / "bentoml"
    env = stack_env(
        prefix, home, ADMIN, 1, BSCE_MAX_LEARN_IMAGES="64", BSCE_SESSION_CHUNK_BYTES="4096"
    )
    worker_args = ["--gate", "off", "--fast-path", "off", "--base-model", "none"]
    worker_args += ["--min-steps", "0", "--backbone", "resnet8", "--epochs", "1"]
    worker_args += ["--memory", "40", "--claim-timeout", "60"]
    try:
        with local_stack(env, free_port(), worker_args, log_dir=tmp) as stack:
            yield stack.url, Storage(server_redis, prefix, bentoml_home=home)
    except StackError as e:
        pytest.fail(str(e))
    finally:
        drop_prefix(server_redis, prefix)


@pytest.mark.integration
def test_sessions_over_http(http: tuple[str, Storage]) -> None:
    url, st = http

    def post(path: str, **kw: Any) -> requests.Response:
        return requests.post(url + path, headers=AUTH, timeout=120, **kw)

    r = post("/sessions", json={"classes": ["red", "blue"], "overrides": {"epochs": 1}})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    red, blue = class_images(6, (220, 30, 30), 1), class_images(6, (30, 30, 220), 2)
    other_size = random_image(7, w=64, h=48)  # resized and centre-cropped, not refused
    r = post(f"/sessions/{sid}/batches", json={"images": [b64(i) for i in [*red, other_size]],
                                                "labels": ["red"] * 7, "expected_samples": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["num_samples"] == 7 and r.json()["sample_shape"] == [3, 32, 32]
    files = [("files", (f"{i}.png", b)) for i, b in enumerate(blue)]
    r = post(f"/sessions/{sid}/batches", files=files, data={"labels": json.dumps(["blue"] * 6)})
    assert r.status_code == 200, r.text
    assert r.json()["counts"] == [7, 6] and r.json()["num_chunks"] >= 2

    # Refusals: clear 4xx, nothing changed.
    before = requests.get(f"{url}/sessions/{sid}", headers=AUTH, timeout=30).json()
    refusals = [
        (f"/sessions/{sid}/batches", {"json": {"images": [b64(red[0])], "labels": ["green"]}}, 400),
        (f"/sessions/{sid}/batches", {"json": {"images": ["abc"], "labels": ["red"]}}, 400),
        (f"/sessions/{sid}/batches", {"json": {"images": [b64(red[0])] * 65, "labels": ["red"] * 65}}, 413),
        (f"/sessions/{sid}/batches", {"json": {"images": [b64(red[0])], "labels": ["red"], "expected_samples": 1}}, 409),
        (f"/sessions/{sid}/batches", {"data": b"{nope", "headers": {"Content-Type": "application/json"}}, 400),
        (f"/sessions/{'0' * 32}/batches", {"json": {"images": [b64(red[0])], "labels": ["red"]}}, 404),
        (f"/sessions/{'0' * 32}/commit", {}, 404),
        ("/sessions", {"json": {"classes": []}}, 400),
        ("/sessions", {"json": {"classes": ["a", "a"]}}, 400),
    ]  # fmt: skip
    for path, kw, status in refusals:
        headers = {**AUTH, **kw.pop("headers", {})}
        got = requests.post(url + path, headers=headers, timeout=60, **kw)
        assert got.status_code == status and "error" in got.json(), (path, got.text)
    assert requests.post(f"{url}/sessions/{sid}/commit", timeout=30).status_code == 401
    after = requests.get(f"{url}/sessions/{sid}", headers=AUTH, timeout=30).json()
    assert {**after, "expires_in_s": 0} == {**before, "expires_in_s": 0}

    # An aborted session leaves no keys.
    gone = post("/sessions", json={"classes": ["x"]}).json()["session_id"]
    assert post(f"/sessions/{gone}/batches", json={"images": [b64(red[0])], "labels": ["x"]}).ok
    assert requests.delete(f"{url}/sessions/{gone}", headers=AUTH, timeout=30).status_code == 200
    assert requests.get(f"{url}/sessions/{gone}", headers=AUTH, timeout=30).status_code == 404
    assert not [k for k in prefix_keys(st.r, st.prefix) if gone.encode() in k]

    r = post(f"/sessions/{sid}/commit")
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert (accepted["num_samples"], accepted["classes"]) == (13, ["red", "blue"])
    again = post(f"/sessions/{sid}/commit")
    assert again.status_code == 200 and again.json()["job_id"] == accepted["job_id"]
    deadline = time.monotonic() + 300
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = requests.get(url + accepted["status_url"], timeout=30).json()
        if status["state"] in ("done", "failed", "rejected"):
            break
        time.sleep(1)
    assert status["state"] == "done", status
    assert status["version"] is not None and status["num_samples"] == 13
