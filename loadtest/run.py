"""Run the Locust scenarios headless and summarise them.

    python -m loadtest.run --url http://127.0.0.1:3000 --users 8 --spawn-rate 4 --duration 60 \\
        [--updates 3] [--token T] [--batch-size 16] [--out results/loadtest]

Locust runs as a subprocess (``locust -f loadtest/locustfile.py --headless --csv ...``) and
writes its CSVs (``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``,
``locust_exceptions.csv``) into ``--out``; every request is also recorded as a JSON line
(``requests.jsonl``: start, latency, answering version, worker pid). ``summary.json``:

- ``requests``, ``failures``, ``rps``, ``p50_ms``, ``p95_ms``, ``p99_ms``, ``mean_ms``,
  ``max_ms``: prediction traffic (POST /predict, single and batched), percentiles computed
  exactly from the recorded latencies; ``images_per_second``.
- ``all_failures``: failed requests of any kind (predictions, the updater's /learn and
  /jobs polls); ``by_name``: Locust's per-request-name rows.
- ``versions_seen``: model versions named by prediction answers; ``swaps``: how many times
  an answer named a version newer than every earlier answer (each landed version counts
  once); ``version_flips``: changes between consecutive answers (with several API workers a
  swap can flip back and forth for a moment while the workers load the version).
- ``users``, ``spawn_rate``, ``duration_s`` (asked), ``measured_s``, ``workers`` (the
  server's API worker processes, from /metrics), ``machine``, ``date``, ``updater`` (jobs).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO = LOCUSTFILE.parent.parent
SUMMARY_FORMAT = "bsce-serve/loadtest-1"
PREDICT = "POST /predict"


def client_machine() -> dict[str, Any]:
    """Where the load generator ran (no torch import: it would cost seconds per run)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def percentiles(ms: list[float] | np.ndarray) -> dict[str, float | None]:
    a = np.asarray(ms, dtype=float)
    if a.size == 0:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
    }


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    requests_, jobs = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            (jobs.append(row["job"]) if "job" in row else requests_.append(row))
    requests_.sort(key=lambda r: r["t"] or 0.0)
    return requests_, jobs


def version_changes(predicts: list[dict[str, Any]]) -> tuple[list[int], int, int]:
    """(versions seen, swaps, flips) over prediction answers in order of completion."""
    answered = sorted(
        (r for r in predicts if r["ok"] and r["version"] is not None),
        key=lambda r: r["t"] + r["ms"] / 1000.0,
    )
    seen: set[int] = set()
    newest: int | None = None
    swaps = flips = 0
    prev: int | None = None
    for r in answered:
        v = int(r["version"])
        if prev is not None and v != prev:
            flips += 1
        if newest is not None and v > newest:
            swaps += 1
        newest = v if newest is None else max(newest, v)
        seen.add(v)
        prev = v
    return sorted(seen), swaps, flips


def image_count(name: str) -> int:
    # "POST /predict [16 images]" -> 16
    try:
        return int(name.split("[", 1)[1].split()[0])
    except (IndexError, ValueError):
        return 1


def _numbers(row: dict[str, str]) -> Any:
    def num(field: str) -> float | None:
        try:
            return float(row[field])
        except (KeyError, TypeError, ValueError):
            return None  # Locust writes "N/A" where it has no sample

    return num


def read_locust_stats(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    with path.open() as f:
        for row in csv.DictReader(f):
            key = f"{row['Type']} {row['Name']}".strip()
            num = _numbers(row)
            rows[key] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": num("Requests/s"),
                "median_ms": num("Median Response Time"),
                "p95_ms": num("95%"),
                "p99_ms": num("99%"),
                "max_ms": num("Max Response Time"),
            }
    return rows


def summarise(records: Path, stats_csv: Path, meta: dict[str, Any]) -> dict[str, Any]:
    reqs, jobs = read_records(records)
    predicts = [r for r in reqs if r["name"].startswith(PREDICT)]
    ok_ms = [r["ms"] for r in predicts if r["ok"]]
    if reqs:
        t0 = min(r["t"] for r in reqs)
        t1 = max(r["t"] + r["ms"] / 1000.0 for r in reqs)
        measured = max(t1 - t0, 1e-9)
    else:
        measured = 0.0
    versions, swaps, flips = version_changes(predicts)
    locust_rows = read_locust_stats(stats_csv)
    images = sum(image_count(r["name"]) for r in predicts if r["ok"])
    landed = [j for j in jobs if j.get("state") == "done"]
    rejected = [j for j in jobs if j.get("state") == "rejected"]
    return {
        "format": SUMMARY_FORMAT,
        **meta,
        "measured_s": measured,
        "requests": len(predicts),
        "failures": sum(not r["ok"] for r in predicts),
        "rps": len(predicts) / measured if measured else 0.0,
        "images_per_second": images / measured if measured else 0.0,
        **percentiles(ok_ms),
        "all_requests": len(reqs),
        "all_failures": sum(not r["ok"] for r in reqs),
        "failure_examples": sorted({r["error"] for r in reqs if not r["ok"]})[:10],
        "versions_seen": versions,
        "swaps": swaps,
        "version_flips": flips,
        "worker_pids_seen": sorted({r["pid"] for r in predicts if r.get("pid") is not None}),
        "by_name": locust_rows,
        "updater": {
            "posted": len(jobs),
            "landed": len(landed),
            "failed_jobs": [j for j in jobs if j.get("state") == "failed" or j.get("error")],
            "versions": [j.get("version") for j in landed],
            # Updates the promotion gate rejected: their versions must never be served.
            "rejected": len(rejected),
            "rejected_versions": [j.get("version") for j in rejected],
            "jobs": jobs,
        },
    }


@dataclass(frozen=True)
class LocustRun:
    """One headless Locust run: ``run_locust``'s arguments, and the command they make."""

    url: str
    users: int
    spawn_rate: float
    duration_s: float
    out: Path
    updates: int = 0
    token: str | None = None
    batch_size: int = 16
    single: bool = True
    batched: bool = True
    update_images: int = 20
    update_epochs: int = 1
    update_interval_s: float = 5.0
    first_update_after_s: float = 5.0
    stop_after_updates_s: float | None = None
    wait_s: float = 0.0
    stop_timeout_s: float = 30.0
    ready_timeout_s: float = 180.0
    extra_args: list[str] | None = None

    @property
    def records(self) -> Path:
        return self.out / "requests.jsonl"

    def user_classes(self) -> list[str]:
        """The locustfile's user classes to run; refuses a run with none, or an updater
        without a user left to predict."""
        on = (("SinglePredictUser", self.single), ("BatchPredictUser", self.batched))
        classes = [c for c, enabled in on if enabled]
        if self.updates > 0:
            classes.append("UpdaterUser")
        if not classes:
            raise ValueError("no user class selected")
        if self.updates > 0 and self.users < 2:
            raise ValueError("with --updates, --users must be at least 2 (one is the updater)")
        return classes

    def command(self, classes: list[str]) -> list[str]:
        stop_after = -1 if self.stop_after_updates_s is None else self.stop_after_updates_s
        return [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", self.url, "-u", str(self.users), "-r", str(self.spawn_rate),
            "-t", f"{int(round(self.duration_s))}s",
            "--csv", str(self.out / "locust"), "--only-summary",
            "--stop-timeout", f"{int(round(self.stop_timeout_s))}s",
            "--exit-code-on-error", "0", "--loglevel", "WARNING",
            "--bsce-batch-size", str(self.batch_size), "--bsce-records", str(self.records),
            "--bsce-updates", str(self.updates), "--bsce-update-images", str(self.update_images),
            "--bsce-update-epochs", str(self.update_epochs),
            "--bsce-update-interval", str(self.update_interval_s),
            "--bsce-first-update-after", str(self.first_update_after_s),
            "--bsce-wait", str(self.wait_s), "--bsce-stop-after", str(stop_after),
            "--bsce-tag", uuid.uuid4().hex[:6],
            *(["--bsce-token", self.token] if self.token else []),
            *(self.extra_args or []),
            *classes,
        ]  # fmt: skip

    def meta(
        self, started: dt.datetime, workers: int | None, classes: list[str], cmd: list[str]
    ) -> dict[str, Any]:
        """The summary's description of the run (``summarise``'s `meta`)."""
        return {
            "url": self.url,
            "date": started.isoformat(timespec="seconds"),
            "machine": client_machine(),
            "users": self.users,
            "spawn_rate": self.spawn_rate,
            "duration_s": self.duration_s,
            "workers": workers,
            "locust_processes": 1,
            "user_classes": classes,
            "batch_size": self.batch_size,
            "wait_s": self.wait_s,
            "updates_requested": self.updates,
            "command": cmd,
            "csv_prefix": str(self.out / "locust"),
            "records_file": str(self.records),
        }


def server_workers(url: str, token: str | None, ready_timeout_s: float | None = None) -> int | None:
    """The server's live API worker processes (after waiting until it is ready, if asked)."""
    from loadtest.client import Client

    with Client(url, token) as client:
        if ready_timeout_s is not None:
            client.wait_ready(ready_timeout_s)
        return client.server_workers()


def run_headless(cmd: list[str], log_path: Path, timeout_s: float) -> int:
    """Run `cmd` in its own process group, output to `log_path`; its exit code. Stopped
    (SIGTERM, then SIGKILL) after `timeout_s`; killed at once if we are interrupted."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def run_locust(
    url: str,
    users: int,
    spawn_rate: float,
    duration_s: float,
    out: Path,
    *,
    updates: int = 0,
    token: str | None = None,
    batch_size: int = 16,
    single: bool = True,
    batched: bool = True,
    update_images: int = 20,
    update_epochs: int = 1,
    update_interval_s: float = 5.0,
    first_update_after_s: float = 5.0,
    stop_after_updates_s: float | None = None,
    wait_s: float = 0.0,
    stop_timeout_s: float = 30.0,
    ready_timeout_s: float = 180.0,
    extra_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run Locust headless against `url`; the summary (also written to out/summary.json)."""
    run = LocustRun(
        url=url, users=users, spawn_rate=spawn_rate, duration_s=duration_s, out=out,
        updates=updates, token=token, batch_size=batch_size, single=single, batched=batched,
        update_images=update_images, update_epochs=update_epochs,
        update_interval_s=update_interval_s, first_update_after_s=first_update_after_s,
        stop_after_updates_s=stop_after_updates_s, wait_s=wait_s,
        stop_timeout_s=stop_timeout_s, ready_timeout_s=ready_timeout_s, extra_args=extra_args,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    classes = run.user_classes()
    cmd = run.command(classes)
    workers = server_workers(url, token, ready_timeout_s)
    started = dt.datetime.now(dt.UTC)
    log_path = out / "locust.log"
    rc = run_headless(cmd, log_path, timeout_s=duration_s + stop_timeout_s + 120)
    # Counted again: a worker still starting at the beginning was missed there.
    workers = max(workers or 0, server_workers(url, token) or 0) or None
    if rc != 0 or not run.records.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"locust exited with {rc}; see {log_path}:\n{tail}")
    summary = summarise(
        run.records, out / "locust_stats.csv", run.meta(started, workers, classes, cmd)
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (
        f"{s['requests']} predictions ({s['failures']} failed; {s['all_failures']} failures in "
        f"all {s['all_requests']} requests) in {s['measured_s']:.0f} s: {s['rps']:.1f} req/s, "
        f"{s['images_per_second']:.0f} images/s; latency p50 {ms(s['p50_ms'])} ms, p95 "
        f"{ms(s['p95_ms'])} ms, p99 {ms(s['p99_ms'])} ms; {s['users']} users, "
        f"{s['workers'] or '?'} server workers; versions {s['versions_seen']}, {s['swaps']} swaps"
    )


def locust_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run_locust`` keyword arguments from ``add_common``'s options and ``--updates``."""
    return {
        "updates": args.updates,
        "token": args.token,
        "batch_size": args.batch_size,
        "single": not args.no_single,
        "batched": not args.no_batch,
        "update_images": args.update_images,
        "update_epochs": args.update_epochs,
        "update_interval_s": args.update_interval,
        "first_update_after_s": args.first_update_after,
        "wait_s": args.wait,
    }


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4.0)
    p.add_argument("--token", default=None, help="bearer token (BSCE_API_TOKEN) for /learn")
    p.add_argument("--batch-size", type=int, default=16, help="images per batched predict")
    p.add_argument("--no-single", action="store_true", help="no single-image users")
    p.add_argument("--no-batch", action="store_true", help="no batched users")
    p.add_argument("--wait", type=float, default=0.0, help="think time per user request (s)")
    p.add_argument("--update-images", type=int, default=20)
    p.add_argument("--update-epochs", type=int, default=1, help="per-job epochs (0: server's)")
    p.add_argument("--update-interval", type=float, default=5.0)
    p.add_argument("--first-update-after", type=float, default=5.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument("--duration", type=float, required=True, help="seconds")
    p.add_argument("--updates", type=int, default=0, help="new classes posted during the run")
    p.add_argument("--out", type=Path, default=None, help="default results/loadtest/<time>")
    args = p.parse_args(argv)
    out = args.out or Path("results") / "loadtest" / time.strftime("%Y%m%d-%H%M%S")
    summary = run_locust(
        args.url, args.users, args.spawn_rate, args.duration, out, **locust_options(args)
    )
    print(format_summary(summary))
    print(f"wrote {out / 'summary.json'} and Locust's CSVs under {out}")
    return summary


if __name__ == "__main__":
    main()
