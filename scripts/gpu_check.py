"""The GPU path, measured: one prepared script for a machine with a CUDA GPU (issue 13).

    .venv/bin/python scripts/gpu_check.py [--device auto|cuda|cpu] [--quick] [--precision auto]
                                          [--budget-s 540] [--out-dir results/gpu]

Three checks, one after the other, within ``--budget-s`` seconds (the CUDA sizes are meant to
take well under ten minutes on one data-centre GPU), each recorded even when another fails:

1. speed: the learner's ``train_step`` against bare forward+backward of the same network, in
   the same precision (``learner.speed.measure``; target learner / bare >= 0.9 on a GPU);
2. a short protocol run: ``learner.bench`` on cifar10-b0-s5 with a small budget (CIFAR-10 from
   ``../shared/data``; where it is missing, and with ``--quick``, the bundled
   cifar10-subset-b0-s5 with tiny sizes): accuracy per step, old and new classes;
3. serving: an embedded Redis, a learner worker and ``bentoml serve`` on the device under the
   same precision setting (``BSCE_DEVICE``, ``BSCE_PRECISION``); one learned version (a swap:
   the model memory of both versions is read from /health and /metrics), then batched
   HTTP ``/predict`` throughput against the bare model (the served version's own forward,
   softmax included, in one process on the same device, batches of 64), and single-image
   latency.

``--device auto`` takes CUDA when torch sees one, else the CPU with ``--quick`` sizes;
``--quick`` forces the tiny sizes anywhere. Nothing is downloaded. Writes
``<out-dir>/gpu_check_<device>_<UTC time>.json`` and a short ``.md`` beside it; exits 1 when a
check failed (its error is in the file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from learner.core.machine import (  # noqa: E402
    describe_machine,
    precision_name,
    resolve_device,
    resolve_precision,
)

FORMAT = "bsce-serve/gpu-check-1"

# Sizes: "full" for a CUDA GPU (minutes), "quick" for the CPU fallback and smoke runs (about
# a minute on 2 cores, most of it starting the server).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "speed": {
            "backbone": "resnet32",
            "batch_size": 128,
            "batches": 80,
            "repeats": 3,
            "selection_images": 10_000,
        },
        "protocol": {
            "protocol": "cifar10-b0-s5",
            "epochs": 3,
            "min_steps": None,  # the config's default
            "backbone": None,  # the protocol's (ResNet-32)
            "max_train_per_class": None,
        },
        "serve": {
            "api_workers": 4,
            "clients": 8,
            "seconds": 20.0,
            "single_requests": 200,
            "learn_epochs": 2,
            "learn_min_steps": None,
            "bare_images": 2048,
            "bare_reps": 5,
        },
    },
    "quick": {
        "speed": {
            "backbone": "resnet8",
            "batch_size": 32,
            "batches": 4,
            "repeats": 2,
            "selection_images": 0,
            "default_layout": False,
        },
        "protocol": {
            "protocol": "cifar10-subset-b0-s5",
            "epochs": 1,
            "min_steps": 0,
            "backbone": "resnet8",
            "max_train_per_class": 20,
        },
        "serve": {
            "api_workers": 1,
            "clients": 2,
            "seconds": 3.0,
            "single_requests": 20,
            "learn_epochs": 1,
            "learn_min_steps": 0,
            "bare_images": 128,
            "bare_reps": 2,
        },
    },
}
SUBSET_PROTOCOL = "cifar10-subset-b0-s5"
BATCH = 64  # images per batched /predict request, and per bare forward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N, cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU fallback's)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--budget-s", type=float, default=540.0, help="time for all three checks")
    p.add_argument("--out-dir", type=Path, default=REPO / "results" / "gpu")
    p.add_argument("--data-root", type=Path, default=None, help="CIFAR-10 (../shared/data)")
    p.add_argument("--skip", action="append", default=[], choices=("speed", "protocol", "serve"))
    args = p.parse_args(argv)
    result = run(
        device=resolve_device(args.device),
        quick=args.quick,
        precision=args.precision,
        budget_s=args.budget_s,
        out_dir=args.out_dir,
        data_root=args.data_root,
        skip=set(args.skip),
    )
    return 0 if not result["errors"] else 1


def run(
    *,
    device: torch.device,
    quick: bool = False,
    precision: str = "auto",
    budget_s: float = 540.0,
    out_dir: Path = REPO / "results" / "gpu",
    data_root: Path | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Run the checks; write and return the result record."""
    start = time.monotonic()
    quick = quick or device.type != "cuda"
    sizes = SIZES["quick" if quick else "full"]
    amp = resolve_precision(precision, device)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gpu_check_{device.type}_{stamp}"
    machine = describe_machine(device)
    result: dict[str, Any] = {
        "format": FORMAT,
        "command": "scripts/gpu_check.py " + " ".join(sys.argv[1:]),
        "device": str(device),
        "gpu": machine.get("gpu"),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "precision_setting": precision,
        "precision": precision_name(amp),
        "sizes": "quick" if quick else "full",
        "budget_s": budget_s,
        "machine": machine,
        "errors": {},
        "phase_seconds": {},
    }
    print(
        f"gpu_check: {device} ({machine.get('gpu') or machine['cpu']}), precision "
        f"{result['precision']}, {result['sizes']} sizes, budget {budget_s:.0f} s",
        flush=True,
    )
    phases = (
        ("speed", lambda: _speed(device, precision, sizes["speed"])),
        (
            "protocol",
            lambda: _protocol(device, precision, sizes["protocol"], stem, data_root),
        ),
        (
            "serve",
            lambda: _serve(device, precision, sizes["serve"], start + budget_s),
        ),
    )
    for name, fn in phases:
        if name in skip:
            result[name] = None
            continue
        left = budget_s - (time.monotonic() - start)
        if left < 30:
            result[name] = None
            result["errors"][name] = f"skipped: {left:.0f} s of the budget left"
            continue
        t = time.monotonic()
        print(f"--- {name} ({left:.0f} s of the budget left)", flush=True)
        try:
            result[name] = fn()
        except Exception as e:  # record it and go on: the other checks still count
            traceback.print_exc()
            result[name] = None
            result["errors"][name] = f"{type(e).__name__}: {e}"
        result["phase_seconds"][name] = time.monotonic() - t
    result["wall_seconds"] = time.monotonic() - start
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(summary_markdown(result))
    print(summary_markdown(result))
    print(f"wrote {json_path} and {md_path.name}", flush=True)
    result["json_path"], result["md_path"] = str(json_path), str(md_path)
    return result


# -- 1. speed --------------------------------------------------------------------------------


def _speed(device: torch.device, precision: str, sizes: dict[str, Any]) -> dict[str, Any]:
    from learner.speed import measure, report_lines

    figures = measure(device, precision=precision, **sizes)
    figures.pop("machine")  # the record's own
    print("\n".join(report_lines(figures)), flush=True)
    return figures


# -- 2. a short protocol run -----------------------------------------------------------------


def _protocol(
    device: torch.device,
    precision: str,
    sizes: dict[str, Any],
    stem: Path,
    data_root: Path | None,
) -> dict[str, Any]:
    from learner import bench
    from learner.data import load_dataset
    from learner.protocols import get_protocol

    name, note = sizes["protocol"], None
    if name != SUBSET_PROTOCOL:
        try:  # decodes CIFAR-10 into the cache on first use; never downloads
            load_dataset(get_protocol(name).dataset, root=data_root)
        except (FileNotFoundError, ValueError, OSError) as e:
            note = f"{name}: its data set is not here ({e}); ran the bundled subset instead"
            name, sizes = SUBSET_PROTOCOL, SIZES["quick"]["protocol"]
            print(note, flush=True)
    argv = [
        "--protocol", name, "--device", str(device), "--precision", precision,
        "--epochs", str(sizes["epochs"]), "--out", str(stem) + "_protocol", "--no-progress",
    ]  # fmt: skip
    for flag, key in (
        ("--min-steps", "min_steps"),
        ("--backbone", "backbone"),
        ("--max-train-per-class", "max_train_per_class"),
    ):
        if sizes[key] is not None:
            argv += [flag, str(sizes[key])]
    if data_root is not None:
        argv += ["--data-root", str(data_root)]
    run = bench.main(argv)[0]
    cnn = run["cnn"]
    return {
        "protocol": run["protocol"],
        "note": note,
        "bench_args": argv,
        "backbone": run["config"]["model"]["backbone"],
        "epochs": run["config"]["optim"]["epochs"],
        "min_steps": run["config"]["optim"]["min_steps"],
        "precision_setting": run["config"]["optim"]["precision"],
        "memory": run["memory"],
        "max_train_per_class": run["max_train_per_class"],
        "accuracy_per_step": cnn["accuracy_per_step"],
        "old_accuracy_per_step": cnn["old_accuracy_per_step"],
        "new_accuracy_per_step": cnn["new_accuracy_per_step"],
        "avg_incremental_accuracy": run["metrics"]["avg_incremental_accuracy"],
        "last_accuracy": run["metrics"]["last_accuracy"],
        "train_images_per_second": run["train_images_per_second"],
        "wall_seconds": run["wall_seconds"],
        "result_dir": str(stem) + "_protocol",
    }


# -- 3. serving ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(set_: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*set_, *unset)}
    os.environ.update(set_)
    for k in unset:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve(
    device: torch.device, precision: str, sizes: dict[str, Any], deadline: float
) -> dict[str, Any]:
    from learner.data import load_dataset

    subset = load_dataset("cifar10-subset")
    tmp = Path(tempfile.mkdtemp(prefix="bsce-gpu-check-"))
    prefix = "bsce-gpu-check"
    workers = int(sizes["api_workers"])
    threads = max(1, (os.cpu_count() or 1) // (workers + 1))
    env = {
        **os.environ,
        "BSCE_DATA_HOME": str(tmp / "state"),
        "BENTOML_HOME": str(tmp / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "BSCE_PREFIX": prefix,
        "BSCE_WORKERS": str(workers),
        "BSCE_DEVICE": str(device),
        "BSCE_PRECISION": precision,
        "BSCE_TORCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }
    # The stack's own embedded Redis and store, open endpoints.
    for k in ("REDIS_URL", "BSCE_API_TOKEN", "BSCE_PREDICT_TOKEN", "BSCE_SESSION_STORE"):
        env.pop(k, None)
    worker_args = ["--epochs", str(sizes["learn_epochs"]), "--gate", "off", "--seed", "0"]
    if sizes["learn_min_steps"] is not None:
        worker_args += ["--min-steps", str(sizes["learn_min_steps"])]
    port = _free_port()
    out: dict[str, Any] = {"api_workers": workers, "torch_threads_per_process": threads}
    http = requests.Session()
    try:
        _serve_on_stack(http, env, port, worker_args, tmp, subset, sizes, deadline, out)
    except BaseException:
        print(f"serving check failed; the stack's logs and state are in {tmp}", flush=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _serve_on_stack(
    http: requests.Session,
    env: dict[str, str],
    port: int,
    worker_args: list[str],
    tmp: Path,
    subset: Any,
    sizes: dict[str, Any],
    deadline: float,
    out: dict[str, Any],
) -> None:
    from loadtest.client import png_b64
    from loadtest.stack import local_stack

    device, precision = torch.device(env["BSCE_DEVICE"]), env["BSCE_PRECISION"]
    prefix, workers = env["BSCE_PREFIX"], int(env["BSCE_WORKERS"])
    with local_stack(env, port, worker_args, log_dir=tmp, ready_timeout_s=240) as stack:
        url = stack.url
        base = http.get(url + "/health", timeout=30).json()
        out["model_memory_before_swap"] = base.get("model_memory")

        # One learned version: the learner trains on the device, every API worker swaps.
        classes = [0, 1]
        idx = [i for i, y in enumerate(subset.train.labels.tolist()) if y in classes]
        body = {
            "images": [png_b64(subset.train.images[i].numpy()) for i in idx],
            "labels": [subset.train.class_names[int(subset.train.labels[i])] for i in idx],
        }
        t0 = time.monotonic()
        r = http.post(url + "/learn", json=body, timeout=120)
        r.raise_for_status()
        job = _wait_job(http, url, r.json()["job_id"], deadline)
        if job["state"] != "done":
            raise RuntimeError(f"the learning job ended {job['state']}: {job.get('error')}")
        version = int(job["version"])
        one = {"images": [png_b64(subset.test.images[0].numpy())]}
        while http.post(url + "/predict", json=one, timeout=60).json().get("version") != version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {version} was not served before the deadline")
            time.sleep(0.1)
        out["learned_version"] = version
        out["learning_latency_s"] = time.monotonic() - t0
        out["learning_images"] = len(idx)
        # Every worker has swapped once the pointer's version answers from all of them.
        memories = _worker_memories(http, url, version, workers, deadline)
        out["model_memory"] = memories
        metrics = http.get(url + "/metrics", timeout=30).text
        out["metrics_lines"] = [
            line
            for line in metrics.splitlines()
            if line.startswith(("bsce_model_bytes", "bsce_cuda_memory_allocated_bytes"))
        ]

        # The bare model: the served version's forward (softmax included), batches of 64.
        n = int(sizes["bare_images"])
        images = subset.test.images[:n].numpy()
        images = np.concatenate([images] * max(1, -(-n // len(images))))[:n]
        with _environ(
            {"BSCE_DATA_HOME": env["BSCE_DATA_HOME"], "BENTOML_HOME": env["BENTOML_HOME"]},
            unset=("REDIS_URL",),
        ):
            out["bare"] = _bare(prefix, env, version, device, precision, images, sizes)
        bare = out["bare"]["images_per_second"]

        # Batched HTTP /predict from several clients.
        batch = {"images": [png_b64(images[i % n]) for i in range(BATCH)]}
        seconds = max(2.0, min(float(sizes["seconds"]), deadline - time.monotonic() - 30))
        log = _traffic(url, batch, int(sizes["clients"]), warmup_s=2.0, seconds=seconds)
        ok = [lat for status, lat in log["requests"] if status == 200]
        rate = BATCH * len(ok) / log["seconds"]
        out["http"] = {
            "images_per_request": BATCH,
            "clients": int(sizes["clients"]),
            "seconds": log["seconds"],
            "requests": len(log["requests"]),
            "failed": len(log["requests"]) - len(ok),
            "images_per_second": rate,
            "request_p50_ms": _q(ok, 50),
            "request_p99_ms": _q(ok, 99),
        }
        out["http_over_bare"] = rate / bare if bare else None
        print(
            f"HTTP /predict, batches of {BATCH}, {sizes['clients']} clients, {workers} API "
            f"workers: {rate:.0f} images/s; bare model {bare:.0f} images/s; ratio "
            f"{out['http_over_bare']:.3f}",
            flush=True,
        )

        # Single-image latency, one client (adaptive batching on the server's side).
        lat = []
        for _ in range(int(sizes["single_requests"])):
            t = time.monotonic()
            status = http.post(url + "/predict", json=one, timeout=60).status_code
            if status == 200:
                lat.append((time.monotonic() - t) * 1000)
        out["single"] = {
            "requests": int(sizes["single_requests"]),
            "ok": len(lat),
            "p50_ms": _q(lat, 50),
            "p99_ms": _q(lat, 99),
        }
        print(
            f"single-image /predict, one client: p50 {out['single']['p50_ms']:.1f} ms, "
            f"p99 {out['single']['p99_ms']:.1f} ms",
            flush=True,
        )


def _wait_job(http: requests.Session, url: str, job_id: str, deadline: float) -> dict[str, Any]:
    while True:
        st = http.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if st["state"] in ("done", "failed", "rejected"):
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {st['state']} at the deadline")
        time.sleep(0.2)


def _worker_memories(
    http: requests.Session, url: str, version: int, workers: int, deadline: float
) -> list[dict[str, Any]]:
    """/health's model memory of each API worker (by pid) once it serves ``version``."""
    seen: dict[int, dict[str, Any]] = {}
    tries = 0
    while len(seen) < workers and tries < 20 * workers and time.monotonic() < deadline:
        tries += 1
        h = http.get(url + "/health", timeout=30).json()
        mem = h.get("model_memory") or {}
        if h.get("version") == version and mem.get("served_version") == version:
            seen[h["worker_pid"]] = {"worker_pid": h["worker_pid"], **mem}
    return list(seen.values())


def _bare(
    prefix: str,
    env: dict[str, str],
    version: int,
    device: torch.device,
    precision: str,
    images: np.ndarray,
    sizes: dict[str, Any],
) -> dict[str, Any]:
    """Images/s of the served version's own forward pass (``ServedVersion.probabilities``, as
    an API worker runs it) in this process on ``device``, batches of 64."""
    from server.holder import load_served
    from storage import open_storage

    storage = open_storage(prefix=prefix, bentoml_home=env["BENTOML_HOME"])
    try:
        served = load_served(storage.versions, version, device, precision)
    finally:
        storage.close()
    batches = [images[i : i + BATCH] for i in range(0, len(images), BATCH)]
    # With the threads of one API worker: the HTTP side runs the same forward in each worker.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(env["BSCE_TORCH_THREADS"]))
    try:
        for b in batches[:2]:
            served.probabilities(b)
        runs = []
        for _ in range(int(sizes["bare_reps"])):
            t = time.perf_counter()
            for b in batches:
                served.probabilities(b)  # returns on the CPU: synchronised
            runs.append(len(images) / (time.perf_counter() - t))
        bare_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return {
        "images_per_second": statistics.median(runs),
        "runs": runs,
        "batch": BATCH,
        "images": len(images),
        "precision": precision_name(served.amp),
        "model_bytes": served.model_bytes,
        "threads": bare_threads,
    }


def _traffic(
    url: str, body: dict[str, Any], clients: int, *, warmup_s: float, seconds: float
) -> dict[str, Any]:
    data = json.dumps(body).encode()
    stop, measuring = threading.Event(), threading.Event()
    log: list[tuple[int, float]] = []

    def loop() -> None:
        s = requests.Session()
        while not stop.is_set():
            t = time.monotonic()
            try:
                status = s.post(
                    url + "/predict",
                    data=data,
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                ).status_code
            except requests.RequestException:
                status = 0
            if measuring.is_set() and not stop.is_set():
                log.append((status, (time.monotonic() - t) * 1000))

    ts = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for th in ts:
        th.start()
    time.sleep(warmup_s)
    measuring.set()
    t = time.monotonic()
    time.sleep(seconds)
    stop.set()
    elapsed = time.monotonic() - t
    for th in ts:
        th.join(60)
    return {"requests": log, "seconds": elapsed}


def _q(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


# -- the short summary -----------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# GPU check, {r['machine']['date']}",
        "",
        f"- device: {r['device']} ({r['gpu'] or r['machine']['cpu'] + ', no GPU'}); torch "
        f"{r['torch']}; CPU capability {r['cpu_capability']}; precision {r['precision']} "
        f"(setting {r['precision_setting']}); {r['sizes']} sizes; wall "
        f"{_fmt(r.get('wall_seconds'), '.0f')} s",
    ]
    s = r.get("speed")
    if s:
        lines += [
            f"- speed ({s['backbone']}, batch {s['batch_size']}, {s['images_per_measurement']} "
            f"images, distillation on): learner {s['learner_images_per_second']:.0f} images/s, "
            f"bare fwd+bwd {s['bare_images_per_second']:.0f} images/s, ratio "
            f"**{s['ratio']:.3f}** (target >= {s['ratio_target']})",
        ]
    p = r.get("protocol")
    if p:
        lines += [
            f"- protocol {p['protocol']} ({p['backbone']}, {p['epochs']} epochs, min steps "
            f"{p['min_steps']}): avg incremental {p['avg_incremental_accuracy']:.2f}, last "
            f"{p['last_accuracy']:.2f}; training {p['train_images_per_second']:.0f} images/s"
            + (f" ({p['note']})" if p.get("note") else ""),
            "",
            "| step | acc | old | new |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for t, (a, o, n) in enumerate(
            zip(
                p["accuracy_per_step"],
                p["old_accuracy_per_step"],
                p["new_accuracy_per_step"],
                strict=True,
            )
        ):
            lines.append(f"| {t + 1} | {a:.1f} | {_fmt(o, '.1f')} | {n:.1f} |")
        lines.append("")
    v = r.get("serve")
    if v:
        mem = (v.get("model_memory") or [{}])[0]
        lines += [
            f"- serving ({v['api_workers']} API workers): HTTP /predict "
            f"{v['http']['images_per_second']:.0f} images/s (batches of "
            f"{v['http']['images_per_request']}, {v['http']['clients']} clients, "
            f"{v['http']['failed']} failed) against the bare model "
            f"{v['bare']['images_per_second']:.0f} images/s: ratio "
            f"**{_fmt(v['http_over_bare'], '.3f')}**; single image p50 "
            f"{_fmt(v['single']['p50_ms'], '.1f')} ms, p99 {_fmt(v['single']['p99_ms'], '.1f')} ms",
            f"- model memory per API worker: served {_fmt(mem.get('served_bytes'), ',')} bytes, "
            f"two versions at the swap {_fmt(mem.get('swap_peak_bytes'), ',')} bytes, CUDA "
            f"allocated {_fmt(mem.get('cuda_allocated_bytes'), ',')} bytes",
        ]
    for name, err in r["errors"].items():
        lines.append(f"- {name}: **{err}**")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
