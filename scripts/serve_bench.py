"""Serving figures on this machine: HTTP predict throughput against the bare model, latency,
learning latency, and failed requests while versions swap under traffic.

    .venv/bin/python scripts/serve_bench.py [--epochs 4] [--seconds 20] [--out results/serve_bench.json]

Starts its own embedded Redis, learner worker and ``bentoml serve`` (2 API workers) in a
temporary directory on a free port, posts two classes of the bundled CIFAR-10 subset, then:

1. bare model: ``learner.core.evaluate.infer`` on the served version, batches of 64, no HTTP:
   the better of one process with all cores and one single-thread process per core;
2. HTTP: batched ``/predict`` (64 images a request) from 4 client threads for ``--seconds``;
3. single-image ``/predict`` latency at low load: one client, requests one after another;
4. learning latency: from posting a new class to the first prediction that can return it;
5. swaps under steady traffic: 2 client threads predict while a job lands and the version is
   rolled back and pinned; every non-200 answer counts as failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.client import png_b64  # noqa: E402
from loadtest.stack import local_stack  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, OSError):
        return 0, {}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _wait_job(url: str, job_id: str) -> dict:
    while True:
        st = _get(f"{url}/jobs/{job_id}")
        if st["state"] in ("done", "failed"):
            return st
        time.sleep(0.2)


def _learn(url: str, subset, classes: list[int]) -> tuple[str, float]:
    idx = [i for i, y in enumerate(subset.train.labels.tolist()) if y in classes]
    body = {
        "images": [png_b64(subset.train.images[i].numpy()) for i in idx],
        "labels": [subset.train.class_names[int(subset.train.labels[i])] for i in idx],
    }
    t0 = time.monotonic()
    status, job = _post(url + "/learn", json.dumps(body).encode())
    if status != 202:
        raise SystemExit(f"/learn answered {status}")
    return job["job_id"], t0


def _traffic(
    url: str, body: bytes, stop: threading.Event, out: list, threads: int
) -> list[threading.Thread]:
    def loop() -> None:
        while not stop.is_set():
            t = time.monotonic()
            status, reply = _post(url + "/predict", body)
            out.append((t, time.monotonic() - t, status, reply.get("version")))

    ts = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    return ts


def _bare(tensors, meta, images, threads: int, reps: int = 4) -> float:
    """Images/s of ``infer`` alone (no HTTP) on one version, batches of 64."""
    import torch

    from learner.core.evaluate import infer
    from learner.core.versioning import load_version

    torch.set_num_threads(threads)
    served = load_version(tensors, meta)
    cpu = torch.device("cpu")
    infer(served.model, images[:64], served.augment, device=cpu, batch_size=64)
    t = time.perf_counter()
    for _ in range(reps):
        infer(served.model, images, served.augment, device=cpu, batch_size=64)
    return reps * len(images) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=REPO / "results" / "serve_bench.json")
    args = p.parse_args()

    import torch

    from learner.core.machine import describe_machine
    from learner.data import load_dataset
    from storage import open_storage

    subset = load_dataset("cifar10-subset")
    tmp = Path(tempfile.mkdtemp(prefix="bsce-serve-bench-"))
    env = {
        **os.environ,
        "BSCE_DATA_HOME": str(tmp / "state"),
        "BENTOML_HOME": str(tmp / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "BSCE_WORKERS": "2",
    }
    env.pop("BSCE_API_TOKEN", None)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict = {
        "command": "scripts/serve_bench.py " + " ".join(sys.argv[1:]),
        "epochs": args.epochs,
        "api_workers": 2,
    }
    with local_stack(env, port, ["--epochs", str(args.epochs)], quiet=True, ready_timeout_s=240):
        job, _ = _learn(url, subset, [0, 1])
        first = _wait_job(url, job)
        print(f"version {first['version']} learned two classes", flush=True)

        # 1. bare model on the version the server serves: the better of one process with all
        # cores and one single-thread process per core (as the API workers run).
        os.environ.update({k: env[k] for k in ("BSCE_DATA_HOME", "BENTOML_HOME")})
        storage = open_storage()
        tensors, meta = storage.versions.load(first["version"])
        images = subset.test.images[:512].clone()
        one_process = _bare(tensors, meta, images, torch.get_num_threads())
        cores = os.cpu_count() or 1
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(cores) as pool:
            per_core = sum(pool.starmap(_bare, [(tensors, meta, images, 1)] * cores))
        bare = max(one_process, per_core)
        results.update(
            bare_one_process_images_per_second=one_process, bare_per_core_images_per_second=per_core
        )
        results["bare_images_per_second"] = bare
        print(
            f"bare model, batch 64: {one_process:.0f} images/s in one process ({torch.get_num_threads()} threads), "
            f"{per_core:.0f} images/s in {cores} single-thread processes",
            flush=True,
        )

        # 2. HTTP batched throughput.
        batch = json.dumps({"images": [png_b64(images[i].numpy()) for i in range(64)]}).encode()
        log: list = []
        stop = threading.Event()
        ts = _traffic(url, batch, stop, log, threads=4)
        time.sleep(2)  # warm-up
        log.clear()
        t = time.monotonic()
        time.sleep(args.seconds)
        stop.set()
        for th in ts:
            th.join()
        elapsed = time.monotonic() - t
        ok = [r for r in log if r[2] == 200]
        http = 64 * len(ok) / elapsed
        results.update(
            http_images_per_second=http, ratio=http / bare, http_batch_failures=len(log) - len(ok)
        )
        print(
            f"HTTP /predict, batches of 64, 4 clients: {http:.0f} images/s; ratio {http / bare:.2f} (target >= 0.6)",
            flush=True,
        )

        # 3. single-image latency at low load.
        single = json.dumps({"images": [png_b64(images[0].numpy())]}).encode()
        lat = []
        for _ in range(200):
            t = time.monotonic()
            status, _ = _post(url + "/predict", single)
            lat.append((time.monotonic() - t) * 1000)
            assert status == 200
        q = statistics.quantiles(lat, n=100)
        results.update(single_p50_ms=q[49], single_p99_ms=q[98])
        print(
            f"single-image /predict, one client: p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms", flush=True
        )

        # 4 + 5. learning latency, and swaps under steady traffic.
        log, stop = [], threading.Event()
        ts = _traffic(url, single, stop, log, threads=2)
        job, t0 = _learn(url, subset, [2])
        st = _wait_job(url, job)
        while True:
            status, reply = _post(url + "/predict", single)
            if reply.get("version") == st["version"]:
                break
        learn_s = time.monotonic() - t0
        results.update(learning_latency_s=learn_s, learning_images=100)
        print(
            f"learning latency (100 images of a new class, {args.epochs} epochs): {learn_s:.1f} s",
            flush=True,
        )
        _post(url + "/versions/rollback", b"{}")
        time.sleep(1.5)
        _post(url + "/versions/pin", json.dumps({"version": st["version"]}).encode())
        time.sleep(1.5)
        _post(url + "/versions/unpin", b"{}")
        job, _ = _learn(url, subset, [3])
        _wait_job(url, job)
        time.sleep(1.5)
        stop.set()
        for th in ts:
            th.join()
        versions = [r[3] for r in sorted(log) if r[2] == 200]
        swaps = sum(1 for a, b in zip(versions, versions[1:], strict=False) if a != b)
        failed = sum(1 for r in log if r[2] != 200)
        results.update(
            swap_requests=len(log),
            swap_failed=failed,
            swaps_observed=swaps,
            versions_seen=sorted(set(versions)),
        )
        print(
            f"under 2 predicting clients: {len(log)} requests, {failed} failed, {swaps} version changes seen {sorted(set(versions))}",
            flush=True,
        )
        results["machine"] = describe_machine(torch.device("cpu"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
