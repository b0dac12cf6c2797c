"""The server against faults and hostile requests, end to end: a real ``bentoml serve`` with
one API worker (so that every request of a test meets the same worker's limits) on a Redis
of its own (AOF; killed and restarted by the store-outage test), without a learner worker:
jobs stay queued, which is all these tests need.

The stack starts with the pointer on a version whose weights file lost its tail, as a
server restarted after a bad disk would find it. Every refusal must be a 4xx/503 JSON body
naming the problem, never a 500, and must change nothing in the store. No assertion
depends on speed: waits poll for a state, and their deadlines only bound a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from storage import Storage, connect
from tests.test_server_support import (
    b64,
    class_images,
    random_image,
    save_version,
    serve_only,
    stack_env,
    truncate_weights,
    wait_until,
    weights_file,
)
from tests.test_storage_support import REDIS_SERVER, RedisProcess, free_port

pytestmark = pytest.mark.integration

ADMIN = "admin-token-for-hostile-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MAX_BODY = 1_500_000  # over 1 MiB: a text part over Starlette's 1 MiB limit fits in a body
MAX_INFLIGHT = 2_500_000  # one held body of MAX_BODY leaves room for a small one, not two


@dataclass
class Hostile:
    url: str
    storage: Storage
    redis: RedisProcess
    log: Path
    broken_weights: bytes  # the original bytes of version 2's truncated file

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=120, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(name="hostile", scope="module")
def fixture_hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    if not Path(REDIS_SERVER).exists():
        pytest.fail("these tests start their own redis-server, which is not installed")
    tmp = tmp_path_factory.mktemp("hostile")
    rp = RedisProcess(tmp)
    rp.start()
    prefix = f"bsce-hostile-{uuid.uuid4().hex[:12]}"
    storage = Storage(connect(rp.url), prefix, bentoml_home=tmp / "bentoml")
    try:
        save_version(storage, 0, [])
        save_version(storage, 1, ["a", "b"])
        save_version(storage, 2, ["a", "b", "c"])  # the pointer's version, parent 1
        original = truncate_weights(storage, 2)
        env = stack_env(
            prefix,
            tmp / "bentoml",
            ADMIN,
            1,
            REDIS_URL=rp.url,
            BSCE_MAX_BODY_BYTES=str(MAX_BODY),
            BSCE_MAX_INFLIGHT_BYTES=str(MAX_INFLIGHT),
            BSCE_POLL_INTERVAL_S="0.2",
        )
        with serve_only(env, free_port(), tmp / "server.log") as url:
            yield Hostile(url, storage, rp, tmp / "server.log", original)
    finally:
        rp.kill()


def snapshot(h: Hostile) -> tuple[Any, ...]:
    """What no refusal may change: jobs, label map, versions, pointer."""
    s = h.storage
    return (
        s.r.xlen(s.jobs.keys.jobs_stream),
        s.labels.names(),
        [v.version for v in s.versions.list()],
        s.versions.pointer(),
    )


def assert_refused(r: requests.Response, status: int, text: str) -> None:
    assert r.status_code == status, f"{r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert text.lower() in r.json()["error"].lower(), r.json()


def predict_image(h: Hostile) -> requests.Response:
    return h.post("/predict", json={"images": [b64(random_image(7))]})


# -- tests (in this order: the last two stop Redis and kill the API worker) -----------------


def test_a_restart_with_an_unloadable_version_serves_its_parent_degraded(hostile: Hostile) -> None:
    h = hostile
    assert h.get("/readyz").status_code == 200
    health = h.get("/health").json()
    assert health["ready"] and (health["version"], health["pointer"]) == (1, 2), health
    assert health["degraded"]["wanted"] == 2 and health["degraded"]["served"] == 1
    assert "version 2" in health["degraded"]["error"] and "instead of version 2" in health["detail"]
    assert predict_image(h).json()["version"] == 1
    assert 'bsce_degraded{pid="' in h.get("/metrics").text
    assert _metric(h, "bsce_degraded") == [1.0]

    # Retried on every poll: once the file is whole again, the pointer's version serves.
    weights_file(h.storage, 2).write_bytes(h.broken_weights)
    wait_until(lambda: h.get("/health").json()["version"] == 2, 120, "version 2 to load")
    health = h.get("/health").json()
    assert health["degraded"] is None and health["detail"] is None
    assert predict_image(h).json()["version"] == 2 and _metric(h, "bsce_degraded") == [0.0]


def test_a_rejected_version_is_served_only_once_promoted(hostile: Hostile) -> None:
    h = hostile
    report = {"verdict": "rejected", "reasons": ["old classes' held-out accuracy fell"]}
    save_version(h.storage, 3, ["a", "b", "c", "d"], serve=False, gate=report)
    assert h.get("/versions/3").json()["gate"]["verdict"] == "rejected"
    listed = {v["version"]: v["gate"] for v in h.get("/versions").json()["versions"]}
    assert listed[3] == "rejected" and _metric(h, 'bsce_gate_versions{verdict="rejected"}') == [1.0]
    before = snapshot(h)
    assert_refused(h.post("/versions/pin", json={"version": 3}, headers=AUTH), 409, "promote")
    assert h.post("/versions/3/promote").status_code == 401
    assert_refused(h.post("/versions/2/promote", headers=AUTH), 409, "not rejected")
    assert_refused(h.post("/versions/9/promote", headers=AUTH), 404, "9")
    assert snapshot(h) == before and predict_image(h).json()["version"] == 2

    moved = h.post("/versions/3/promote", headers=AUTH)
    assert moved.status_code == 200 and moved.json() == {
        "current": 3,
        "pinned": None,
        "previous": 2,
    }
    wait_until(lambda: predict_image(h).json()["version"] == 3, 120, "version 3 to serve")
    assert h.get("/versions/3").json()["info"]["gate"] == "promoted by operator"
    assert h.post("/versions/rollback", headers=AUTH).json()["current"] == 2
    wait_until(lambda: predict_image(h).json()["version"] == 2, 120, "version 2 to serve")


def _metric(h: Hostile, name: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1])
        for line in h.get("/metrics").text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]


def test_multipart_bodies_the_parser_refuses_are_4xx_json_without_a_traceback(
    hostile: Hostile,
) -> None:
    h = hostile
    image = ("files", ("a.png", random_image(1), "image/png"))
    before, logged = snapshot(h), len(h.log_text())
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("no boundary", {"data": b"abc", "headers": {"Content-Type": "multipart/form-data"}}, 400, "boundary"),
        ("text field over 1 MiB", {"files": [image], "data": {"top_k": "1" * (1024 * 1024 + 1)}}, 413, "text field"),
        ("1001 files", {"files": [("files", (f"{i}.png", b"x")) for i in range(1001)]}, 413, "1000 files"),
        ("1001 fields", {"files": [image], "data": {"x": ["1"] * 1001}}, 413, "1000 text fields"),
        ("malformed", {"data": b"junk", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}, 400, "malformed"),
        ("bodiless multipart", {"headers": {"Content-Type": "multipart/form-data"}}, 400, "boundary"),
    ]  # fmt: skip
    for path in ("/predict/upload", "/learn/upload"):
        for what, kwargs, status, text in cases:
            kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **AUTH}}
            r = h.post(path, **kwargs)
            assert r.status_code == status, f"{path} {what}: {r.status_code} {r.text[:200]}"
            assert_refused(r, status, text)
    # A bodiless request typed multipart to a JSON route would meet the same parser.
    r = h.post("/versions/unpin", headers={"Content-Type": "multipart/form-data", **AUTH})
    assert_refused(r, 415, "multipart")
    new_log = h.log_text()[logged:]
    assert "Traceback" not in new_log and "[ERROR]" not in new_log, new_log[-3000:]
    assert snapshot(h) == before


class _Listener:
    """A local HTTP server that counts the requests it gets."""

    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(random_image(3))

            def log_message(self, *args: object) -> None:
                pass

        self.hits = hits
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/x.png"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_text_files_part_is_refused_and_never_fetched(hostile: Hostile) -> None:
    h = hostile
    before = snapshot(h)
    with _Listener() as listener:
        for path, data in [
            ("/predict/upload", {"files": listener.url}),
            ("/learn/upload", {"files": listener.url, "labels": '["a"]'}),
        ]:
            r = h.post(path, data=data, files={"other": ("a.png", b"x")}, headers=AUTH)
            assert_refused(r, 400, "must be file uploads")
            # With a real file beside it, the text part is still refused.
            files = [("files", ("a.png", random_image(2))), ("files", (None, listener.url))]
            r = h.post(path, data={"labels": '["a", "a"]'}, files=files, headers=AUTH)
            assert_refused(r, 400, "must be file uploads")
        assert listener.hits == []
    assert snapshot(h) == before


def _hold_open(h: Hostile, length: int) -> socket.socket:
    """A POST /predict that declares `length` body bytes and sends only a few."""
    host, port = h.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"images": [')
    return sock


def _padded_predict(size: int) -> bytes:
    body = json.dumps({"images": [b64(random_image(5))], "top_k": 1}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_inflight_bytes_are_capped_per_worker(hostile: Hostile) -> None:
    h = hostile
    big = _padded_predict(1_200_000)

    def post_big() -> requests.Response:
        return h.post("/predict", data=big, headers={"Content-Type": "application/json"})

    assert post_big().status_code == 200  # alone, it fits
    held = _hold_open(h, MAX_BODY)
    try:
        # The held body is charged once the worker has read its headers: poll until it is.
        # (A list: a 503 Response is falsy.)
        (r,) = wait_until(
            lambda: [r] if (r := post_big()).status_code == 503 else None,
            60,
            "the held body to count against the worker's budget",
        )
        assert r.headers["retry-after"] == "1" and "in flight" in r.json()["error"]
        assert predict_image(h).status_code == 200  # a small body still fits beside it
    finally:
        held.close()
    # The held request's bytes are given back when it ends (here: its client went away).
    wait_until(lambda: post_big().status_code == 200, 60, "the budget to be given back")


def test_learn_with_an_idempotency_key_makes_one_job(hostile: Hostile) -> None:
    h = hostile
    images = class_images(2, (200, 40, 40), 4)
    body = {"images": [b64(i) for i in images], "labels": ["red", "red"]}
    key = {"Idempotency-Key": f"hostile-{uuid.uuid4().hex}", **AUTH}
    jobs = h.storage.r.xlen(h.storage.jobs.keys.jobs_stream)

    first = h.post("/learn", json=body, headers=key)
    assert first.status_code == 202 and first.json()["replayed"] is False, first.text
    again = h.post("/learn", json=body, headers=key)
    assert again.status_code == 200, again.text
    assert again.json()["job_id"] == first.json()["job_id"] and again.json()["replayed"]
    # The same images as files: the same request (the digest is over the decoded pixels).
    files = [("files", (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]
    upload = h.post("/learn/upload", files=files, data={"labels": '["red", "red"]'}, headers=key)
    assert upload.status_code == 200 and upload.json()["job_id"] == first.json()["job_id"]
    assert h.storage.r.xlen(h.storage.jobs.keys.jobs_stream) == jobs + 1

    before = snapshot(h)
    other = {**body, "labels": ["red", "blue"]}
    assert_refused(h.post("/learn", json=other, headers=key), 409, "different request")
    for bad in ("has space", "x" * 201, "caf\u00e9"):
        r = h.post("/learn", json=body, headers={"Idempotency-Key": bad.encode(), **AUTH})
        assert_refused(r, 400, "Idempotency-Key")
    assert snapshot(h) == before


def test_learn_with_a_validation_set_queues_it_and_refuses_a_bad_one(hostile: Hostile) -> None:
    h = hostile
    red, green = class_images(3, (200, 40, 40), 5), class_images(2, (40, 200, 40), 6)
    body = {
        "images": [b64(i) for i in red],
        "labels": ["red"] * 3,
        "validation_images": [b64(i) for i in green[:1]],
        "validation_labels": ["red"],
    }
    r = h.post("/learn", json=body, headers=AUTH)
    assert r.status_code == 202 and r.json()["validation"] == 1, r.text
    assert r.json()["num_samples"] == 4 and r.json()["classes"] == ["red"]
    status = h.get(f"/jobs/{r.json()['job_id']}", headers=AUTH).json()
    assert status["validation"] == 1 and status["num_samples"] == 4
    files = [("files", (f"{i}.png", img, "image/png")) for i, img in enumerate(red)]
    files.append(("validation_files", ("v.png", green[0], "image/png")))
    data = {"labels": '["red", "red", "red"]', "validation_labels": '["red"]'}
    r = h.post("/learn/upload", files=files, data=data, headers=AUTH)
    assert r.status_code == 202 and r.json()["validation"] == 1, r.text

    before = snapshot(h)
    stray = {**body, "validation_labels": ["green"]}
    assert_refused(h.post("/learn", json=stray, headers=AUTH), 400, "no training images of")
    short = {**body, "validation_labels": []}
    assert_refused(h.post("/learn", json=short, headers=AUTH), 400, "validation labels")
    unlabelled = {k: v for k, v in body.items() if k != "validation_labels"}
    assert_refused(h.post("/learn", json=unlabelled, headers=AUTH), 400, "validation labels")
    assert snapshot(h) == before


def test_route_misses_bad_limits_and_loose_types_are_4xx_json(hostile: Hostile) -> None:
    h = hostile
    before = snapshot(h)
    assert_refused(h.get("/nope"), 404, "no route")
    assert_refused(h.post("/nope", json={}), 404, "no route")
    r = requests.delete(h.url + "/versions", timeout=60)
    assert_refused(r, 405, "not allowed")
    for limit in ("-5", "0", "501", "abc", "1.5"):
        assert_refused(h.get(f"/jobs?limit={limit}"), 400, "limit")
    assert h.get("/jobs?limit=500").status_code == 200
    good = b64(random_image(0))
    js = {"Content-Type": "application/json", **AUTH}
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/predict", {"images": [good], "top_k": True}, 400, "top_k"),
        ("/predict", {"images": [good], "top_k": "3"}, 400, "top_k"),
        (
            "/learn",
            {"images": [good], "labels": ["a"], "overrides": {"epochs": "3"}},
            400,
            "epochs",
        ),
        (
            "/learn",
            {"images": [good], "labels": ["a"], "overrides": {"distill": 1}},
            400,
            "distill",
        ),
        ("/versions/pin", {"version": "0"}, 400, "version"),
        ("/versions/pin", {"version": True}, 400, "version"),
    ]
    for path, payload, status, text in cases:
        assert_refused(h.post(path, data=json.dumps(payload), headers=js), status, text)
    assert snapshot(h) == before


def test_pointer_moves_and_learn_while_the_store_is_down_answer_503(hostile: Hostile) -> None:
    h = hostile
    body = {"images": [b64(random_image(0))], "labels": ["a"]}
    h.redis.kill()
    try:
        for path, payload in [
            ("/versions/rollback", None),
            ("/versions/pin", {"version": 1}),
            ("/versions/unpin", None),
            ("/learn", body),
        ]:
            assert_refused(h.post(path, json=payload, headers=AUTH), 503, "unavailable")
        assert_refused(h.get("/versions"), 503, "unavailable")
        assert predict_image(h).status_code == 200  # the loaded model keeps answering
    finally:
        h.redis.start()  # same port and AOF: the same data
    wait_until(lambda: h.get("/readyz").status_code == 200, 120, "the server to see Redis again")


def test_a_killed_api_worker_leaves_no_metrics_row(hostile: Hostile) -> None:
    h = hostile
    old = h.get("/health").json()["worker_pid"]
    os.kill(old, signal.SIGKILL)  # the worker BentoML started for this test's server

    def new_worker() -> int | None:
        try:
            r = h.get("/health")
        except requests.RequestException:
            return None
        pid = r.json().get("worker_pid") if r.status_code == 200 else None
        return pid if pid not in (None, old) else None

    pid = wait_until(new_worker, 240, "BentoML to start a new API worker")
    served = h.get("/health").json()["version"]
    rows = [x for x in h.get("/metrics").text.splitlines() if x.startswith("bsce_served_version{")]
    assert rows == [f'bsce_served_version{{pid="{pid}"}} {float(served)}'], rows
