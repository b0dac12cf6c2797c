"""Fault drills: the stack under the faults an operator meets, each with its expected outcome.

    python -m loadtest.drills [--out results/drills] [--only NAME ...] [--keep]

Starts a stack of its own in a temporary directory: a ``redis-server`` on a free port (its
own directory, AOF with fsync always; never the machine's Redis), one learner worker
(resnet8, an untrained version 0, small steps) and ``bentoml serve`` with 2 API workers.
A setup job trains version 1 and times an optimizer step, so that the jobs a fault must hit
mid-step last about ``--train-seconds`` on any machine. Then, in order:

1. ``redis-idle``: Redis stopped while the worker is idle, then started again.
2. ``redis-training``: Redis stopped while the worker trains, then started again.
3. ``worker-sigkill``: the worker SIGKILLed mid-step, a new worker started.
4. ``unloadable-restart``: the server restarted while the newest version's weights file is
   truncated; then the file restored.
5. ``rollback-training``: an operator's rollback while a job trains.
6. ``corrupt-parent``: a job on a parent whose weights file is truncated; a rollback; a job.
7. ``api-worker-sigkill``: an API worker SIGKILLed while a thread sends predict requests.

Each drill prints one row (drill, expected, observed, verdict); the table is written to
``<out>/drills_<time>.json`` and ``.md`` with the machine and the command. Waits poll for
a state; their deadlines only bound a hang, no timing is asserted. The exit status is 0
when every drill passed. The working directory (logs, Redis files, model store) is removed
when every drill passed, unless ``--keep``; its path is printed otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests

from .client import Client, ServerError, encode_images
from .stack import REPO, stop_process

T = TypeVar("T")
API_WORKERS = 2
MODEL_NAME = "bsce-classifier"
PER_CLASS = 40  # images per posted class
JOB_TIMEOUT_S = 900.0  # bounds a hang; no drill expects a job to take near this long
READY_TIMEOUT_S = 300.0
# Redis stays down until the worker has logged this many backoff waits (0.1 s doubling).
HELD_RETRIES = 4


class DrillFailed(AssertionError):
    """A drill's observation differs from its expectation; the message is the observation."""


def require(condition: bool, observed: str) -> None:
    if not condition:
        raise DrillFailed(observed)


def wait_for(probe: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.2) -> T:
    """The first value of `probe()` other than None and False; DrillFailed naming `what`
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise DrillFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the processes ----------------------------------------------------------------------------


class RedisServer:
    """A redis-server of the drills' own: its port, its directory, every write in the AOF."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [self._binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--daemonize", "no", "--logfile", str(self.workdir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        wait_for(self._answers, 60, f"redis-server on port {self.port}", poll_s=0.05)

    def version(self) -> str:
        """`redis-server 7.0.15`, say."""
        out = subprocess.run([self._binary(), "--version"], capture_output=True, text=True)
        found = re.search(r"v=(\S+)", out.stdout)
        return f"redis-server {found.group(1) if found else '(version unknown)'}"

    @staticmethod
    def _binary() -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("the drills start their own redis-server, which is not on PATH")
        return binary

    def _answers(self) -> bool:
        """PONG to a PING (a server still reading its AOF answers LOADING). A plain socket:
        only the storage package talks to Redis through a client (tests/test_layout.py)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """As an operator stops it: SIGTERM; it syncs its files and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Lab:
    """The drills' stack: Redis, the learner worker (restartable) and `bentoml serve`."""

    workdir: Path
    redis: RedisServer
    env: dict[str, str]
    worker_args: list[str]
    port: int
    client: Client
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bentoml_home(self) -> Path:
        return Path(self.env["BENTOML_HOME"])

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}-{len(self.logs) + 1}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            # Its own process group, so that stopping it stops BentoML's children too.
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start_worker(self) -> None:
        """A learner worker; returns once it has opened the store (it logs its recipe then),
        so that a drill's fault meets a worker at work, not one still importing torch."""
        consumer = f"drills-worker-{len(self.logs) + 1}"
        cmd = [sys.executable, "-m", "learner.worker", *self.worker_args, "--consumer", consumer]
        self._spawn("worker", cmd)
        up = f"worker {consumer} on "
        wait_for(lambda: self.check_alive() or up in self.worker_log(), READY_TIMEOUT_S, up)

    def kill_worker(self) -> None:
        proc = self.procs["worker"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def start_server(self) -> None:
        bentoml = str(Path(sys.executable).parent / "bentoml")
        cmd = [bentoml, "serve", "server.service:BsceServe", "--host", "127.0.0.1",
               "--port", str(self.port)]  # fmt: skip
        self._spawn("server", cmd)
        self.wait_serving()

    def stop_server(self) -> None:
        stop_process(self.procs.pop("server"), timeout_s=60)

    def worker_log(self) -> str:
        """Every worker incarnation's log, in order."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if "worker" in p.name)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DrillFailed(f"the {name} exited with {proc.returncode}")

    def wait_serving(self, version: int | None = None, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Until every API worker is ready and serves `version` (any, if None); the version."""

        def probe() -> int | None:
            self.check_alive()
            by_pid = self.client.served_versions()
            served = set(by_pid.values())
            if len(by_pid) != API_WORKERS or len(served) != 1:
                return None
            (v,) = served
            ready = _status(self.client, "/readyz") == 200
            return v if ready and v >= 0 and version in (None, v) else None

        what = "every API worker ready" + ("" if version is None else f" on version {version}")
        return wait_for(probe, timeout_s, what, poll_s=0.3)

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop_process(proc)
        self.redis.stop()
        self.client.close()


def lab_env(workdir: Path, redis_url: str, token: str) -> dict[str, str]:
    """The stack's environment: our own Redis, model store and data home; no BSCE_ setting
    inherited from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BSCE_")}
    return {
        **env,
        "REDIS_URL": redis_url,
        "BSCE_PREFIX": "drills",
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BSCE_DATA_HOME": str(workdir / "state"),
        "BENTOML_DO_NOT_TRACK": "true",
        "BSCE_API_TOKEN": token,
        "BSCE_WORKERS": str(API_WORKERS),
        # One thread per process: 2 cores are shared by the worker and 2 API workers.
        "BSCE_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def worker_args(device: str) -> list[str]:
    """Small, fast steps; a dead worker's job is taken over after 10 s; store retries
    every 0.1 s up to 2 s, so a drill does not wait long for a reconnect. The promotion gate
    is off: these steps are too small to pass it, and each drill expects its version served
    (the gate has its own tests). The fast path is off: the drills name the versions their
    jobs make, one a job (its interims have their own tests, tests/test_fast_path.py). The
    time bound on training is off: a drill sizes its jobs in steps to last long enough to be
    interrupted (`Sizing`), which the bound would cut short."""
    return ["--gate", "off", "--fast-path", "off", "--train-seconds", "0", "--base-model", "none", "--min-steps", "0",
            "--backbone", "resnet8", "--epochs", "1", "--memory", "40", "--claim-timeout", "10", "--device", device,
            "--threads", "1", "--seed", "1993", "--retry-base-s", "1",
            "--store-retry-base-s", "0.1", "--store-retry-max-s", "2"]  # fmt: skip


# -- the API as an operator uses it ------------------------------------------------------------


def _status(client: Client, path: str) -> int:
    try:
        return client.request("GET", path, timeout=10).status_code
    except requests.RequestException:
        return 0


@dataclass(frozen=True)
class Images:
    """Bundled CIFAR-10 subset images as base64 PNG: PER_CLASS per class, and a probe."""

    by_class: dict[str, list[str]]
    probe: str

    @classmethod
    def load(cls) -> Images:
        from learner.data import load_dataset

        train = load_dataset("cifar10-subset").train
        labels = np.asarray(train.labels)
        by_class = {
            name: encode_images(np.asarray(train.images)[labels == c][:PER_CLASS])
            for c, name in enumerate(train.class_names)
        }
        return cls(by_class, encode_images(np.asarray(train.images)[-1:])[0])


def learn(
    lab: Lab, images: Images, classes: Sequence[str], overrides: dict[str, Any] | None = None
) -> str:
    """Post the classes as one job (202); its id."""
    imgs = [i for c in classes for i in images.by_class[c]]
    labels = [c for c in classes for _ in images.by_class[c]]
    accepted, _ = lab.client.learn(imgs, labels, overrides)
    return accepted["job_id"]


def job_status(lab: Lab, job_id: str) -> dict[str, Any]:
    return lab.client.job(job_id)


def wait_job(lab: Lab, job_id: str, states: Sequence[str] = ("done", "failed")) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        lab.check_alive()
        status = _try(lambda: job_status(lab, job_id))
        return status if status is not None and status["state"] in states else None

    return wait_for(probe, JOB_TIMEOUT_S, f"job {job_id} {'/'.join(states)}", poll_s=0.3)


def wait_training(lab: Lab, job_id: str) -> dict[str, Any]:
    """Until the job has trained its first epoch (its progress shows); its status."""

    def probe() -> dict[str, Any] | None:
        lab.check_alive()
        status = job_status(lab, job_id)
        require(status["state"] != "done", f"job {job_id} was done before the fault landed")
        return status if status["state"] == "running" and (status["progress"] or 0) > 0 else None

    return wait_for(probe, JOB_TIMEOUT_S, f"job {job_id} to train", poll_s=0.1)


def _try(call: Callable[[], T]) -> T | None:
    """`call()`, or None while the server answers 503 or not at all (it is restarting)."""
    try:
        return call()
    except requests.RequestException:
        return None
    except ServerError as e:
        if e.status == 503:
            return None
        raise


def version_list(lab: Lab) -> list[int]:
    return [v["version"] for v in lab.client.versions()["versions"]]


def pointer(lab: Lab) -> int:
    return int(lab.client.versions()["current"])


def weights_file(lab: Lab, version: int) -> Path:
    """The version's weights in the BentoML model store (its tag names the folder)."""
    tag = lab.client.version_info(version)["tag"]
    name, _, ver = tag.partition(":")
    return lab.bentoml_home / "models" / name / ver / "weights.safetensors"


def truncate(path: Path) -> bytes:
    """Cut the file in half (a disk that lost its tail); the original bytes."""
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    return original


def stored_models(lab: Lab) -> int:
    folder = lab.bentoml_home / "models" / MODEL_NAME
    return sum(1 for p in folder.iterdir() if p.is_dir() and not p.is_symlink())


def metric_by_pid(lab: Lab, name: str) -> dict[int, float]:
    text = lab.client.request("GET", "/metrics", timeout=30).text
    pattern = rf'^{name}\{{[^}}]*pid="(\d+)"[^}}]*\}}\s+(\S+)'
    return {int(pid): float(v) for pid, v in re.findall(pattern, text, re.M)}


def check_once(lab: Lab, job: dict[str, Any], before: list[int]) -> int:
    """The job's version is new, listed once, stored once; the version."""
    v = job["version"]
    after = version_list(lab)
    require(v is not None and v not in before, f"job {job['id']} made no new version: {job}")
    require(after.count(v) == 1, f"version {v} listed {after.count(v)} times: {after}")
    require(len(after) == len(before) + 1, f"versions {before} -> {after}: not one more")
    jobs = [j for j in lab.client.get_json("/jobs?limit=500")["jobs"] if j["version"] == v]
    require(len(jobs) == 1, f"{len(jobs)} jobs claim version {v}")
    require(stored_models(lab) == len(after), f"{stored_models(lab)} models stored, {after}")
    return v


def _waits(lab: Lab, mark: int, fragment: str) -> int:
    """Backoff waits the worker logged since `mark` (raises if it exited)."""
    lab.check_alive()
    return lab.worker_log()[mark:].count(fragment)


# -- one sized job ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """How many optimizer steps a job needs to train for about `train_s` seconds here."""

    seconds_per_step: float
    train_s: float

    def overrides(self) -> dict[str, int]:
        steps = math.ceil(self.train_s / max(self.seconds_per_step, 1e-4))
        # min_steps sets the budget: whole epochs until at least that many steps.
        return {"min_steps": max(50, min(steps, 15_000))}

    @classmethod
    def measure(cls, lab: Lab, version: int, train_s: float) -> Sizing:
        report = lab.client.get_json(f"/versions/{version}")["report"]
        return cls(report["train_seconds"] / max(1, report["optimizer_steps"]), train_s)


# -- the drills -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    images: Images
    sizing: Sizing


def drill_redis_idle(lab: Lab, ctx: Context) -> str:
    before, mark = version_list(lab), len(lab.worker_log())
    lab.redis.stop()
    noticed = "store unavailable while waiting for jobs"
    wait_for(lambda: _waits(lab, mark, noticed) >= HELD_RETRIES, 120, "the worker's backoff")
    lab.check_alive()  # the worker did not exit
    lab.redis.start()
    lab.wait_serving()
    job = wait_job(lab, learn(lab, ctx.images, ["bird"]))
    require(job["state"] == "done", f"after the restart the job {job['state']}: {job['error']}")
    v = check_once(lab, job, before)
    lab.wait_serving(v)
    log = lab.worker_log()[mark:]
    require("store reachable again" in log, "the worker never logged its reconnect")
    retries = log.count(noticed)
    return (
        f"worker stayed up ({retries} backoff waits logged); after the restart job -> "
        f"v{v}, attempts {job['attempts']}, served by {API_WORKERS}/{API_WORKERS} API workers"
    )


def drill_redis_training(lab: Lab, ctx: Context) -> str:
    before, mark = version_list(lab), len(lab.worker_log())
    job_id = learn(lab, ctx.images, ["cat"], ctx.sizing.overrides())
    progress = wait_training(lab, job_id)["progress"]
    lab.redis.stop()
    waiting = f"store unavailable while committing job {job_id}"
    wait_for(lambda: _waits(lab, mark, waiting) >= HELD_RETRIES, JOB_TIMEOUT_S,
             "the worker to finish training and wait to commit")  # fmt: skip
    lab.redis.start()
    job = wait_job(lab, job_id)
    require(job["state"] == "done", f"job {job['state']}: {job['error']}")
    require(job["attempts"] == 1, f"job took {job['attempts']} attempts")
    v = check_once(lab, job, before)
    lab.wait_serving(v)
    return (
        f"stopped at {progress:.0%} of the step; trained on, commit waited "
        f"({_waits(lab, mark, waiting)} backoff waits); v{v} listed and stored "
        f"once, attempts 1, served by {API_WORKERS}/{API_WORKERS}"
    )


def drill_worker_sigkill(lab: Lab, ctx: Context) -> str:
    before = version_list(lab)
    job_id = learn(lab, ctx.images, ["deer"], ctx.sizing.overrides())
    progress = wait_training(lab, job_id)["progress"]
    lab.kill_worker()
    orphan = job_status(lab, job_id)
    require(orphan["state"] == "running", f"after the kill the job is {orphan['state']}")
    require(version_list(lab) == before, "a version appeared from the killed step")
    lab.start_worker()
    job = wait_job(lab, job_id)
    require(job["state"] == "done", f"job {job['state']}: {job['error']}")
    require(job["attempts"] == 2, f"job took {job['attempts']} attempts, not 2")
    v = check_once(lab, job, before)
    lab.wait_serving(v)
    return (
        f"killed at {progress:.0%}; job stayed running, a new worker claimed it (attempt 2) "
        f"-> v{v}, listed and stored once, served by {API_WORKERS}/{API_WORKERS}"
    )


def drill_unloadable_restart(lab: Lab, ctx: Context) -> str:
    newest = pointer(lab)
    require(newest == max(version_list(lab)), f"the pointer ({newest}) is not the newest")
    parent = lab.client.get_json(f"/versions/{newest}")["parent_version"]
    path = weights_file(lab, newest)
    original = truncate(path)
    lab.stop_server()
    lab.start_server()
    served = lab.wait_serving(parent)
    answer = lab.client.predict([ctx.images.probe], top_k=1)
    require(answer["version"] == parent, f"predict answered from v{answer['version']}")
    health = lab.client.get_json("/health")
    degraded = health["degraded"] or {}
    require(
        (degraded.get("wanted"), degraded.get("served")) == (newest, parent),
        f"/health degraded is {health['degraded']}",
    )
    flags = metric_by_pid(lab, "bsce_degraded")
    require(list(flags.values()) == [1.0] * API_WORKERS, f"bsce_degraded {flags}")
    path.write_bytes(original)  # the operator's fix
    lab.wait_serving(newest)
    cleared = metric_by_pid(lab, "bsce_degraded")
    require(list(cleared.values()) == [0.0] * API_WORKERS, f"after restore bsce_degraded {cleared}")
    require(lab.client.get_json("/health")["degraded"] is None, "/health still degraded")
    return (
        f"v{newest} truncated, server restarted: predict 200 from v{served} (its parent), "
        f"/health degraded {{wanted {newest}, served {parent}}}, bsce_degraded 1 on "
        f"{API_WORKERS}/{API_WORKERS}; file restored: v{newest} served, degraded cleared"
    )


def drill_rollback_training(lab: Lab, ctx: Context) -> str:
    before, built_on = version_list(lab), pointer(lab)
    job_id = learn(lab, ctx.images, ["dog"], ctx.sizing.overrides())
    progress = wait_training(lab, job_id)["progress"]
    r = lab.client.request("POST", "/versions/rollback")
    require(r.status_code == 200, f"rollback answered {r.status_code}: {r.text[:200]}")
    target = r.json()["current"]
    require(job_status(lab, job_id)["state"] == "running", "the job ended before the rollback")
    job = wait_job(lab, job_id)
    require(job["state"] == "done", f"job {job['state']}: {job['error']}")
    v = check_once(lab, job, before)
    require(pointer(lab) == target, f"the pointer is on v{pointer(lab)}, not v{target}")
    require(job["pointer_moved"] is False, f"pointer_moved is {job['pointer_moved']}")
    require(job["built_on"] == built_on, f"built_on {job['built_on']}, not {built_on}")
    lab.wait_serving(target)
    return (
        f"rolled back v{built_on} -> v{target} at {progress:.0%}; v{v} saved (built on "
        f"v{built_on}), pointer stays v{target}, pointer_moved false"
    )


def drill_corrupt_parent(lab: Lab, ctx: Context) -> str:
    before, parent = version_list(lab), pointer(lab)
    truncate(weights_file(lab, parent))
    failed = wait_job(lab, learn(lab, ctx.images, ["frog"]))
    error = failed["error"] or ""
    require(failed["state"] == "failed", f"the job on the corrupt parent is {failed['state']}")
    require(failed["attempts"] == 1, f"{failed['attempts']} attempts, not 1")
    clear = f"ParentUnloadableError: model version {parent}, the parent of this step, cannot"
    require(error.startswith(clear), f"error: {error}")
    r = lab.client.request("POST", "/versions/rollback")
    require(r.status_code == 200, f"rollback answered {r.status_code}: {r.text[:200]}")
    good = r.json()["current"]
    job = wait_job(lab, learn(lab, ctx.images, ["horse"]))
    require(job["state"] == "done", f"the job on v{good} {job['state']}: {job['error']}")
    require(job["built_on"] == good, f"built on {job['built_on']}, not {good}")
    v = check_once(lab, job, before)
    lab.wait_serving(v)
    return (
        f'job on truncated v{parent}: failed after 1 attempt, "{error.split(" (")[0]}"; /learn '
        f"took the next job (202): rolled back to v{good}, job -> v{v}, served"
    )


@dataclass(frozen=True)
class Shot:
    """One predict request of the traffic thread: when it started and ended, its answer."""

    start: float
    end: float
    ok: bool
    pid: int | None  # the API worker that answered
    error: str | None  # an HTTP status and body, or the connection error

    def in_flight_at(self, t: float) -> bool:
        return self.start <= t <= self.end


class Traffic:
    """A thread sending /predict requests one after another, each on a new connection (so
    that both API workers get them), until stopped; every answer recorded."""

    def __init__(self, url: str, image: str) -> None:
        self.url, self.body = url, {"images": [image], "top_k": 1}
        self.shots: list[Shot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="drill-traffic")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.shots.append(self._shoot())

    def _shoot(self) -> Shot:
        t = time.time()
        try:
            r = requests.post(self.url + "/predict", json=self.body, timeout=60,
                              headers={"Connection": "close"})  # fmt: skip
        except requests.RequestException as e:
            return Shot(t, time.time(), False, None, _root_cause(e))
        pid = int(r.headers.get("X-Worker-Pid", 0)) or None
        error = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
        return Shot(t, time.time(), error is None, pid, error)

    def answered_by(self, pid: int, since: int = 0) -> int:
        return sum(1 for s in self.shots[since:] if s.ok and s.pid == pid)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's type and message (requests wraps urllib3's wrapping of
    the socket's error): `RemoteDisconnected: Remote end closed connection ...`."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return f"{type(exc).__name__}: {exc}"[:200]


def drill_api_worker_sigkill(lab: Lab, ctx: Context) -> str:
    version = lab.wait_serving()
    with Traffic(lab.url, ctx.images.probe) as traffic:
        pids = wait_for(lambda: _both_answered(traffic), 120, "traffic on both API workers")
        victim = traffic.shots[-1].pid or pids[0]
        killed_at, kill_t = len(traffic.shots), time.time()
        os.kill(victim, signal.SIGKILL)
        fresh = wait_for(lambda: _replacement(lab, victim), READY_TIMEOUT_S, "a new API worker")
        wait_for(lambda: traffic.answered_by(fresh, killed_at) >= 5, 120, "answers from it")
    lab.wait_serving(version)
    failed = [s for s in traffic.shots if not s.ok]
    # The one request the killed process held when it died has no process left to answer
    # it: its connection is reset. It is counted, not retried; any other failure fails.
    lost = [s for s in failed if s.pid is None and s.in_flight_at(kill_t)]
    others = sorted({s.error or "" for s in failed if s not in lost})
    require(not others, f"{len(failed)} of {len(traffic.shots)} requests failed: {others}")
    failures = "0 failed"
    if lost:
        kind = (lost[0].error or "").split(":")[0]
        failures = f"1 failed, the request in flight on it at the kill ({kind}); 0 other"
    return (
        f"killed API worker {victim} under {len(traffic.shots)} sequential predicts: "
        f"{failures}; new worker {fresh} answered, {API_WORKERS}/{API_WORKERS} serve v{version}"
    )


def _both_answered(traffic: Traffic) -> list[int] | None:
    pids = sorted({s.pid for s in traffic.shots if s.ok and s.pid})
    return pids if len(pids) >= API_WORKERS and len(traffic.shots) >= 20 else None


def _replacement(lab: Lab, victim: int) -> int | None:
    live = set(lab.client.served_versions())
    new = live - {victim}
    return max(new) if len(live) == API_WORKERS and victim not in live else None


@dataclass(frozen=True)
class Drill:
    name: str
    expected: str
    run: Callable[[Lab, Context], str]


DRILLS: tuple[Drill, ...] = (
    Drill("redis-idle", "worker stays up while Redis is down (idle); a job posted after the "
          "restart runs and its version is served", drill_redis_idle),
    Drill("redis-training", "Redis stopped mid-step, restarted: the step's version appears "
          "exactly once (attempt 1) and is served", drill_redis_training),
    Drill("worker-sigkill", "worker SIGKILLed mid-step, a new one started: the job is "
          "claimed again and its version appears once", drill_worker_sigkill),
    Drill("unloadable-restart", "server restarted with the newest version truncated: "
          "/predict 200 from its parent, /health degraded; restoring it clears that",
          drill_unloadable_restart),
    Drill("rollback-training", "rollback while a job trains: its version is saved, the "
          "pointer stays where the operator put it, pointer_moved false",
          drill_rollback_training),
    Drill("corrupt-parent", "job on a corrupt parent fails at once (1 attempt) with a clear "
          "error; /learn still accepts; a job on a good pointer runs", drill_corrupt_parent),
    Drill("api-worker-sigkill", "API worker SIGKILLed under predict traffic: no failed "
          "request but the one in flight on it, if any (no client retries); a new worker "
          "serves", drill_api_worker_sigkill),
)  # fmt: skip


# -- running and reporting --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    number: int
    drill: str
    expected: str
    observed: str
    passed: bool
    seconds: float

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


def run_drill(lab: Lab, ctx: Context, number: int, drill: Drill) -> Row:
    t = time.monotonic()
    try:
        observed, passed = drill.run(lab, ctx), True
    except DrillFailed as e:
        observed, passed = str(e), False
    except Exception as e:  # an error in a drill is its row's observation, not the run's end
        observed, passed = f"error: {type(e).__name__}: {e}"[:500], False
    row = Row(number, drill.name, drill.expected, observed, passed, time.monotonic() - t)
    print(f"[{row.verdict}] {number}. {drill.name} ({row.seconds:.0f} s): {observed}", flush=True)
    return row


def recover(lab: Lab) -> None:
    """After a failed drill: Redis, a worker and the server up again for the next one."""
    if not lab.redis.running:
        lab.redis.start()
    if lab.procs["worker"].poll() is not None:
        lab.start_worker()
    if "server" not in lab.procs or lab.procs["server"].poll() is not None:
        lab.procs.pop("server", None)
        lab.start_server()
    lab.wait_serving()


def setup(lab: Lab, train_s: float) -> Context:
    """The stack up, version 1 trained on two classes, an optimizer step timed."""
    images = Images.load()
    lab.redis.start()
    lab.start_worker()
    lab.start_server()
    job = wait_job(lab, learn(lab, images, ["airplane", "automobile"], {"min_steps": 30}))
    if job["state"] != "done":
        raise RuntimeError(f"the setup job failed: {job['error']}\n{lab.worker_log()[-3000:]}")
    lab.wait_serving(job["version"])
    return Context(images, Sizing.measure(lab, job["version"], train_s))


def run_drills(lab: Lab, ctx: Context, names: Sequence[str] | None = None) -> list[Row]:
    rows = []
    for number, drill in enumerate(DRILLS, 1):
        if names and drill.name not in names:
            continue
        rows.append(run_drill(lab, ctx, number, drill))
        if not rows[-1].passed:
            recover(lab)
    return rows


def open_lab(workdir: Path, device: str, token: str) -> Lab:
    rs = RedisServer(workdir)
    port = free_port()
    env = lab_env(workdir, rs.url, token)
    client = Client(f"http://127.0.0.1:{port}", token, timeout_s=120)
    return Lab(workdir, rs, env, worker_args(device), port, client)


def format_table(rows: Sequence[Row]) -> str:
    lines = ["| # | drill | expected | observed | verdict |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = [str(r.number), r.drill, r.expected, r.observed, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu']} ({machine['cpu_count']} cores), {machine['platform']}, "
        f"Python {machine['python']}, torch {machine['torch']}, device {machine['device']}"
    )


def write_results(out: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"drills_{time.strftime('%Y%m%d-%H%M%S')}"
    rows = [Row(**r) for r in result["rows"]]
    base.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    passed = sum(r.passed for r in rows)
    md = [
        f"# Fault drills, {result['machine']['date']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine_line(result['machine'])}  ",
        f"Stack: {result['stack']}  ",
        f"Result: {passed}/{len(rows)} passed in {result['seconds']:.0f} s "
        f"(setup {result['setup_seconds']:.0f} s).",
        "",
        format_table(rows),
        "",
    ]
    base.with_suffix(".md").write_text("\n".join(md))
    return base.with_suffix(".json"), base.with_suffix(".md")


def describe_stack(lab: Lab, ctx: Context) -> str:
    return (
        f"{lab.redis.version()} (own port and directory, AOF fsync always); "
        f"learner worker `{' '.join(lab.worker_args)}`; `bentoml serve` with {API_WORKERS} API "
        f"workers; mid-step jobs sized to ~{ctx.sizing.train_s:g} s "
        f"({ctx.sizing.overrides()['min_steps']} optimizer steps at "
        f"{ctx.sizing.seconds_per_step * 1000:.1f} ms)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.drills",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("results/drills"))
    p.add_argument("--only", nargs="+", choices=[d.name for d in DRILLS], help="these drills")
    p.add_argument("--device", default="cpu", help="the learner worker's device")
    p.add_argument("--train-seconds", type=float, default=20.0, help="a mid-step job's length")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    return p


def drive(args: argparse.Namespace, command: str, workdir: Path) -> dict[str, Any]:
    """Set up, run the drills, stop the stack; the result (rows, machine, command)."""
    import torch

    from learner.core.machine import describe_machine

    t0 = time.monotonic()
    with ExitStack() as stack:
        lab = open_lab(workdir, args.device, token=os.urandom(16).hex())
        stack.callback(lab.close)
        ctx = setup(lab, args.train_seconds)
        setup_s, stack_text = time.monotonic() - t0, describe_stack(lab, ctx)
        print(f"stack up, v1 trained ({setup_s:.0f} s); {stack_text}", flush=True)
        rows = run_drills(lab, ctx, args.only)
    return {
        "command": command,
        "machine": describe_machine(torch.device(args.device)),
        "stack": stack_text,
        "setup_seconds": setup_s,
        "seconds": time.monotonic() - t0,
        "passed": all(r.passed for r in rows),
        "rows": [asdict(r) for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m loadtest.drills", *map(shlex.quote, argv)])
    workdir = Path(tempfile.mkdtemp(prefix="bsce-drills-"))
    try:
        result = drive(args, command, workdir)
    except BaseException:
        print(f"the drills stopped; logs under {workdir}", file=sys.stderr)
        raise
    rows = [Row(**r) for r in result["rows"]]
    print("\n" + format_table(rows))
    paths = write_results(args.out, result)
    print(f"wrote {paths[0]} and {paths[1]}")
    if result["passed"] and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs, Redis files and model store under {workdir}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
