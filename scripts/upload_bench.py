"""A large learning step through an upload session: memory while uploading, time to serve.

    .venv/bin/python scripts/upload_bench.py [--classes airplane,automobile,bird,ship,truck]
        [--per-class 5000] [--batch 2000] [--session-store redis|DIR]
        [--worker-args "..."] [--out results/upload]

It starts a fresh local stack on the defaults (embedded Redis, one learner worker building
on the committed base model, ``bentoml serve`` with 2 API workers), opens a session for
the classes, posts the first ``--per-class`` CIFAR-10 training images of each (from
../shared/data; PNG, base64 JSON, ``--batch`` images a request, classes interleaved as the
data set orders them), commits it and waits until the job's version is served. Why: one
/learn request is capped by the body and job size limits (64 MiB of decoded samples); a
session stores each batch in bounded chunks as it arrives, so an API worker should never
hold more than one batch, whatever the session's size. The figures say whether that holds:

- the API workers' peak RSS (each, sampled every 0.1 s from /proc through psutil) while
  uploading, against their RSS before the first batch;
- the store's memory (Redis ``used_memory``, and its peak) before, after the upload and
  after the commit; with ``--session-store DIR`` the samples are files, and the folder's size;
- seconds to upload, and from the commit's POST to the job's end and to the first moment
  /versions/current says a worker serves the new version.

Five classes at 5,000 images (all their training images) is the issue's 25,000-image step
(the default); ``--per-class 200`` is a quick check. Figures go to
``OUT/upload_<date>.json`` with the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.core.machine import describe_machine  # noqa: E402
from learner.data import load_dataset  # noqa: E402
from loadtest.client import png_b64  # noqa: E402
from loadtest.stack import local_stack  # noqa: E402
from storage import close, connect  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RssSampler(threading.Thread):
    """Peak RSS of each API worker (the serve process's children), sampled in a thread."""

    def __init__(self, server_pid: int, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(server_pid)
        self.every_s = every_s
        self.peak: dict[int, int] = {}
        self.stop = threading.Event()

    def current(self) -> dict[int, int]:
        out = {}
        for p in self.root.children(recursive=True):
            try:
                if "server.service" in " ".join(p.cmdline()) or "bentoml" in p.name():
                    out[p.pid] = p.memory_info().rss
            except psutil.Error:
                continue
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, rss in self.current().items():
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            self.stop.wait(self.every_s)


def redis_memory(r: Any) -> dict[str, int]:
    info = r.info("memory")
    return {"used_memory": int(info["used_memory"]), "peak": int(info["used_memory_peak"])}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = load_dataset("cifar10")
    names = data.train.class_names
    wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
    picked: list[int] = []
    per = dict.fromkeys(wanted, 0)
    for i, y in enumerate(data.train.labels.tolist()):
        name = names[y]
        if name in per and per[name] < args.per_class:
            per[name] += 1
            picked.append(i)
    print(f"{len(picked)} images of {per}; encoding PNGs", flush=True)
    encoded = [png_b64(data.train.images[i].numpy()) for i in picked]
    labels = [names[int(data.train.labels[i])] for i in picked]
    body_bytes = sum(len(e) for e in encoded)
    test = [i for i, y in enumerate(data.test.labels.tolist()) if names[y] in per]
    probes = (
        [png_b64(data.test.images[i].numpy()) for i in test],
        [names[int(data.test.labels[i])] for i in test],
    )

    with tempfile.TemporaryDirectory(prefix="bsce-upload-") as tmp:
        env = {
            **os.environ,
            "BSCE_DATA_HOME": f"{tmp}/state",
            "BENTOML_HOME": f"{tmp}/bentoml",
            "BSCE_SESSION_STORE": args.session_store,
        }
        for var in ("REDIS_URL", "BSCE_API_TOKEN", "BSCE_PREFIX"):
            env.pop(var, None)
        with local_stack(env, free_port(), args.worker_args.split(), log_dir=Path(tmp)) as stack:
            url = stack.url
            r = connect(None, Path(tmp) / "state")
            try:
                result = measure(args, stack, url, r, encoded, labels, wanted, body_bytes)
                result["test_accuracy"] = accuracy(url, *probes)
                return result
            finally:
                close(r)


def accuracy(url: str, images: list[str], labels: list[str]) -> dict[str, Any]:
    """The served version's accuracy on the classes' CIFAR-10 test images, per class: that the
    step was learned, not only stored."""
    right: dict[str, list[int]] = {}
    for start in range(0, len(images), 200):
        answer = requests.post(
            f"{url}/predict", json={"images": images[start : start + 200]}, timeout=600
        )
        answer.raise_for_status()
        for p, want in zip(answer.json()["predictions"], labels[start : start + 200], strict=True):
            right.setdefault(want, []).append(int(p["labels"][0]["label"] == want))
    per_class = {c: round(100.0 * sum(v) / len(v), 1) for c, v in right.items()}
    return {"per_class": per_class, "mean": round(sum(per_class.values()) / len(per_class), 1)}


def measure(
    args: argparse.Namespace,
    stack: Any,
    url: str,
    r: Any,
    encoded: list[str],
    labels: list[str],
    classes: list[str],
    body_bytes: int,
) -> dict[str, Any]:
    http = requests.Session()
    sampler = RssSampler(stack.procs["server"].pid)
    rss_before = sampler.current()
    redis_before = redis_memory(r)
    sampler.start()
    t0 = time.monotonic()
    sid = http.post(f"{url}/sessions", json={"classes": classes}, timeout=60).json()["session_id"]
    for start in range(0, len(encoded), args.batch):
        batch = {
            "images": encoded[start : start + args.batch],
            "labels": labels[start : start + args.batch],
            "expected_samples": start,
        }
        answer = http.post(f"{url}/sessions/{sid}/batches", json=batch, timeout=600)
        if answer.status_code != 200:
            raise RuntimeError(f"batch at {start}: {answer.status_code} {answer.text}")
        print(f"  {answer.json()['num_samples']} samples stored", flush=True)
    upload_s = time.monotonic() - t0
    sampler.stop.set()
    sampler.join()
    session = http.get(f"{url}/sessions/{sid}", timeout=60).json()
    redis_uploaded = redis_memory(r)
    store_dir = None if args.session_store == "redis" else Path(args.session_store)
    dir_bytes = None if store_dir is None else folder_bytes(store_dir)

    t_commit = time.monotonic()
    accepted = http.post(f"{url}/sessions/{sid}/commit", timeout=120)
    if accepted.status_code != 202:
        raise RuntimeError(f"commit: {accepted.status_code} {accepted.text}")
    job_id = accepted.json()["job_id"]
    commit_s = time.monotonic() - t_commit
    redis_committed = redis_memory(r)
    status: dict[str, Any] = {}
    done_s = served_s = None
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        status = http.get(f"{url}/jobs/{job_id}", timeout=60).json()
        if status["state"] == "failed":
            raise RuntimeError(f"job failed: {status.get('error')}")
        if status["state"] in ("done", "rejected"):
            done_s = done_s or time.monotonic() - t_commit
            want = status["version"] if status.get("pointer_moved") else None
            current = http.get(f"{url}/versions/current", timeout=60).json()
            if want is None or current["worker"]["version"] == want:
                served_s = time.monotonic() - t_commit if want is not None else None
                break
        time.sleep(0.2)
    else:
        raise TimeoutError(f"job {job_id} not served after {args.timeout_s} s: {status}")

    return {
        "images": len(encoded),
        "classes": classes,
        "per_class": args.per_class,
        "batch": args.batch,
        "session_store": args.session_store,
        "request_body_mib_total": mib(body_bytes),
        "session": {k: session[k] for k in ("num_samples", "num_chunks", "bytes", "store")},
        "upload_s": round(upload_s, 2),
        "api_rss_mib_before": {str(k): mib(v) for k, v in rss_before.items()},
        "api_rss_mib_peak_during_upload": {str(k): mib(v) for k, v in sampler.peak.items()},
        "redis_mib": {
            "before": mib(redis_before["used_memory"]),
            "after_upload": mib(redis_uploaded["used_memory"]),
            "after_commit": mib(redis_committed["used_memory"]),
            "peak": mib(redis_committed["peak"]),
        },
        "session_dir_mib": None if dir_bytes is None else mib(dir_bytes),
        "commit_request_s": round(commit_s, 3),
        "commit_to_job_end_s": None if done_s is None else round(done_s, 2),
        "commit_to_served_s": None if served_s is None else round(served_s, 2),
        "job": {k: status.get(k) for k in ("state", "version", "pointer_moved", "num_samples")},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="airplane,automobile,bird,ship,truck")
    p.add_argument("--per-class", type=int, default=5000)
    p.add_argument("--batch", type=int, default=2000, help="images a batch request")
    p.add_argument("--session-store", default="redis", help='"redis" or a shared directory')
    p.add_argument("--worker-args", default="", help="extra learner worker arguments")
    p.add_argument("--timeout-s", type=float, default=4 * 3600)
    p.add_argument("--out", type=Path, default=REPO / "results" / "upload")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    result = run(args)
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    result["machine"] = describe_machine(torch.device("cpu"))
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"upload_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
