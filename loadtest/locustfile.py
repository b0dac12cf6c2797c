"""Locust scenarios for bsce-serve: prediction traffic while new classes land.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --headless -u 8 -r 4 -t 60s \\
        SinglePredictUser BatchPredictUser [UpdaterUser] [--bsce-updates 5 ...]

(``python -m loadtest.run`` runs this headless and writes a summary.)

- ``SinglePredictUser``: one image per POST /predict (the server's adaptive batching path).
- ``BatchPredictUser``: ``--bsce-batch-size`` images per POST /predict (one forward pass).
- ``UpdaterUser`` (exactly one when listed): posts a new class (``--bsce-update-images``
  images of one CIFAR-10 class under a new name) to POST /learn, follows its job to the new
  version, pauses ``--bsce-update-interval`` s, and so on until ``--bsce-updates`` versions
  have landed; with ``--bsce-stop-after`` it then ends the whole run that many seconds later.

Images are real: the bundled ``cifar10-subset`` archives (``data/``; test split for
predictions, train split for updates), posted as the 32x32 JPEG files they hold. Every request is recorded (start time, latency,
the model version that answered, the worker pid) and written as JSON lines to
``--bsce-records`` when Locust quits; the updater's jobs go there too.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

log = logging.getLogger("bsce.locust")
DATA = Path(__file__).resolve().parent.parent / "data"

_POOL: dict[str, Any] = {}
_POOL_LOCK = threading.Lock()
RECORDS: list[dict[str, Any]] = []
JOBS: list[dict[str, Any]] = []


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("bsce-serve")
    g.add_argument("--bsce-batch-size", type=int, default=16, help="images per batched predict")
    g.add_argument("--bsce-top-k", type=int, default=5)
    g.add_argument("--bsce-wait", type=float, default=0.0, help="think time per user (s)")
    g.add_argument("--bsce-token", default="", help="bearer token for /learn (and predict)")
    g.add_argument("--bsce-updates", type=int, default=0, help="new classes the updater posts")
    g.add_argument("--bsce-update-images", type=int, default=20, help="images per new class")
    g.add_argument("--bsce-update-epochs", type=int, default=1, help="epochs override (0: none)")
    g.add_argument("--bsce-update-interval", type=float, default=5.0, help="pause after a landing")
    g.add_argument("--bsce-first-update-after", type=float, default=5.0, help="s before 1st post")
    g.add_argument("--bsce-job-timeout", type=float, default=600.0)
    g.add_argument(
        "--bsce-stop-after",
        type=float,
        default=-1.0,
        help="end the run this many s after the last update landed (<0: run to --run-time)",
    )
    g.add_argument(
        "--bsce-bad-update",
        type=int,
        default=-1,
        help="post this update (0-based) with lr 10, a diverging job the promotion gate must "
        "reject (-1: none)",
    )
    g.add_argument(
        "--bsce-update-classes",
        default="",
        help="comma-separated subset classes the updates post, in turn (default: all), e.g. "
        "the ones a base model does not know",
    )
    g.add_argument("--bsce-tag", default="", help="tag in the new class names (default: random)")
    g.add_argument("--bsce-records", default="", help="JSON-lines file for every request")


def _read_archive(path: Path, split: str) -> dict[str, list[bytes]]:
    """{class: [JPEG bytes, ...]} (files in name order) from a ``<split>/<class>/<file>`` tar."""
    found: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[0] == split:
                handle = tar.extractfile(member)
                if handle is not None:
                    found.setdefault(parts[1], {})[parts[2]] = handle.read()
    return {c: [files[f] for f in sorted(files)] for c, files in sorted(found.items())}


def _pool() -> dict[str, Any]:
    """Test images (predictions) and per-class train images (updates), base64.

    The bundled cifar10-subset archives hold 32x32 JPEG files: they are posted as they are
    (no torch, no re-encoding in the load generator, which shares the CPUs with the server).
    """
    with _POOL_LOCK:
        if not _POOL:
            test = _read_archive(DATA / "cifar10-subset-test.tar.gz", "test")
            train = _read_archive(DATA / "cifar10-subset-train.tar.gz", "train")
            images = [b for c in sorted(test) for b in test[c]]
            rng = random.Random(0)
            _POOL["predict"] = [
                base64.b64encode(b).decode() for b in rng.sample(images, min(200, len(images)))
            ]
            _POOL["classes"] = sorted(train)
            _POOL["train"] = {
                i: [base64.b64encode(b).decode() for b in train[c]]
                for i, c in enumerate(_POOL["classes"])
            }
    return _POOL


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    # Before the run starts (and its --run-time clock): loading and encoding take seconds.
    _pool()


@events.request.add_listener
def _record(
    request_type: str,
    name: str,
    response_time: float,
    exception: Any = None,
    context: dict[str, Any] | None = None,
    start_time: float | None = None,
    **_: Any,
) -> None:
    ctx = context or {}
    RECORDS.append(
        {
            "t": start_time,
            "ms": response_time,
            "name": f"{request_type} {name}",
            "ok": exception is None,
            "version": ctx.get("version"),
            "pid": ctx.get("pid"),
            "error": None if exception is None else str(exception)[:200],
        }
    )


def _write_records(environment: Any) -> None:
    path = (
        getattr(environment.parsed_options, "bsce_records", "")
        if environment.parsed_options
        else ""
    )
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in RECORDS:
            f.write(json.dumps(r) + "\n")
        for j in JOBS:
            f.write(json.dumps({"job": j}) + "\n")


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    _write_records(environment)


@events.quitting.add_listener
def _on_quit(environment: Any, **_: Any) -> None:
    _write_records(environment)


def _headers(user: FastHttpUser) -> dict[str, str]:
    token = user.environment.parsed_options.bsce_token
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check_predict(resp: Any, n: int) -> None:
    """Fail anything but a 200 with one prediction per image; keep the answering version."""
    if resp.status_code != 200:
        resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
        return
    try:
        body = resp.json()
        version, pid = int(body["version"]), int(body["worker_pid"])
        ok = len(body["predictions"]) == n
    except (ValueError, KeyError, TypeError) as e:
        resp.failure(f"bad predict answer: {e}")
        return
    resp.request_meta["context"] = {**resp.request_meta["context"], "version": version, "pid": pid}
    if ok:
        resp.success()
    else:
        resp.failure(f"{len(body['predictions'])} predictions for {n} images")


class _PredictUser(FastHttpUser):
    abstract = True

    def wait_time(self) -> float:
        return float(self.environment.parsed_options.bsce_wait)

    def on_start(self) -> None:
        self.images = _pool()["predict"]

    def _predict(self, n: int, name: str) -> None:
        o = self.environment.parsed_options
        body = {"images": random.sample(self.images, n), "top_k": o.bsce_top_k}
        with self.client.post(
            "/predict", json=body, headers=_headers(self), name=name, catch_response=True
        ) as resp:
            _check_predict(resp, n)


class SinglePredictUser(_PredictUser):
    weight = 3

    @task
    def predict_one(self) -> None:
        self._predict(1, "/predict [1 image]")


class BatchPredictUser(_PredictUser):
    weight = 1

    @task
    def predict_batch(self) -> None:
        n = min(self.environment.parsed_options.bsce_batch_size, len(self.images))
        self._predict(n, f"/predict [{n} images]")


class UpdaterUser(FastHttpUser):
    """Posts new classes now and then (bounded by --bsce-updates); exactly one instance."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.tag = o.bsce_tag or uuid.uuid4().hex[:6]
        self.posted = 0
        self.landed_at: float | None = None
        gevent.sleep(o.bsce_first_update_after)

    @task
    def update(self) -> None:
        o = self.environment.parsed_options
        if self.posted >= o.bsce_updates:
            if o.bsce_stop_after >= 0 and self.landed_at is not None:
                gevent.sleep(max(0.0, self.landed_at + o.bsce_stop_after - time.time()))
                log.info("updates done; ending the run")
                # From a greenlet of its own: quit() kills every user greenlet, this one too.
                gevent.spawn(self.environment.runner.quit)
                raise StopUser()
            gevent.sleep(1.0)
            return
        pool = _pool()
        n = self.posted
        chosen = [c for c in o.bsce_update_classes.split(",") if c] or pool["classes"]
        cls = pool["classes"].index(chosen[n % len(chosen)])
        images = pool["train"][cls][: o.bsce_update_images]
        name = f"lt-{self.tag}-{n:03d}-{pool['classes'][cls]}"
        body: dict[str, Any] = {"images": images, "labels": [name] * len(images)}
        if o.bsce_update_epochs > 0:
            body["overrides"] = {"epochs": o.bsce_update_epochs}
        bad = n == o.bsce_bad_update
        if bad:
            body["overrides"] = {**body.get("overrides", {}), "lr": 10.0}
        self.posted += 1
        job: dict[str, Any] = {
            "n": n,
            "class": name,
            "posted": time.time(),
            "images": len(images),
            "bad": bad,
        }
        JOBS.append(job)
        with self.client.post(
            "/learn", json=body, headers=_headers(self), name="/learn", catch_response=True
        ) as resp:
            if resp.status_code != 202:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                job["error"] = f"HTTP {resp.status_code}"
                return
            job["id"] = resp.json()["job_id"]
        deadline = time.time() + o.bsce_job_timeout
        while time.time() < deadline:
            gevent.sleep(0.25)
            with self.client.get(
                f"/jobs/{job['id']}", headers=_headers(self), name="/jobs/[id]", catch_response=True
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                    continue
                status = resp.json()
            # Rejected: the promotion gate kept its version from being served.
            if status["state"] in ("done", "failed", "rejected"):
                job.update(
                    {
                        k: status.get(k)
                        for k in ("state", "version", "submitted", "started", "finished", "error")
                    }
                )
                job["seen_done"] = time.time()
                self.landed_at = time.time()
                break
        else:
            job["error"] = "timeout"
        gevent.sleep(o.bsce_update_interval)
