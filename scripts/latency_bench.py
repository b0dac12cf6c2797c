"""Learning latency, as a benchmark: how soon a posted class is predicted, by the fast path's
interim version and by the full version, and how well each predicts it.

    .venv/bin/python scripts/latency_bench.py [--n 20,100,1000] [--class airplane]
        [--worker-args "..."] [--out results/latency]

For each N it starts a fresh local stack on the defaults (embedded Redis, one learner worker:
version 0 is the committed six-animal base model with its 1,200 exemplars, fast path and gate
on; ``bentoml serve`` with 2 API workers), posts the first N CIFAR-10 training images of one
class the base model does not know (from the shared CIFAR-10 set, ../shared/data), and polls
/predict with one test image of that class until the job's versions are served. It records:

- the seconds from the start of the POST to the first /predict answer from the interim
  version, from the full version, and to the first answer that names the probe image's
  class correctly (whatever version gave it);
- the worker's own figures from the job status (seconds from claiming the job to each commit,
  the time the job waited in the queue, the gate's verdicts);
- the accuracy of the interim and of the full version on the class's 1,000 CIFAR-10 test
  images and on the base classes' 6,000, computed here from the versions' files in the
  stack's model store after the job ended (the network /predict runs, with the same masking
  of inactive classes; evaluating through HTTP while the full step trains would race its swap
  and slow it down).

The stack settles for ``--settle-s`` seconds before the POST: an idle worker computes the
exemplar features of the version it will build on (the fast path's cache) then. Figures go to
``OUT/latency_<date>.json`` with the machine and the load average before and after each N:
this is a shared 2-core machine, and figures taken under load say so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.core.evaluate import infer  # noqa: E402
from learner.core.machine import describe_machine  # noqa: E402
from learner.core.versioning import LoadedVersion, load_version  # noqa: E402
from learner.data import load_dataset  # noqa: E402
from loadtest.client import Client, encode_images  # noqa: E402
from loadtest.stack import local_stack  # noqa: E402

DEVICE = torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Watch:
    """What /predict answered for the probe image since the POST: when each version first
    answered, and when the probe was first named right."""

    def __init__(self, client: Client, probe: str, name: str, t0: float) -> None:
        self.client, self.probe, self.name, self.t0 = client, probe, name, t0
        self.first: dict[int, float] = {}
        self.correct: tuple[float, int] | None = None
        self.failed: list[str] = []  # polls without an answer (the stack's log says why)

    def poll(self) -> int | None:
        try:
            answer = self.client.predict([self.probe], top_k=1)
        except requests.RequestException as e:
            self.failed.append(f"{time.monotonic() - self.t0:.2f} s: {e}")
            if len(self.failed) > 20:
                raise
            return None
        now, version = time.monotonic() - self.t0, int(answer["version"])
        self.first.setdefault(version, now)
        labels = answer["predictions"][0]["labels"]
        if self.correct is None and labels and labels[0]["label"] == self.name:
            self.correct = (now, version)
        return version


def watch_job(client: Client, job_id: str, watch: Watch, timeout_s: float) -> dict[str, Any]:
    """Poll /predict (every 50 ms) and the job (every 0.25 s) until the job has ended and
    the version it leaves served answers; the job's last status."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {"state": "queued"}
    last_status = 0.0
    while time.monotonic() < deadline:
        served = watch.poll()
        if time.monotonic() - last_status > 0.25:
            status, last_status = client.job(job_id), time.monotonic()
            if status["state"] == "failed":
                raise RuntimeError(f"job {job_id} failed: {status.get('error')}")
            if status["state"] in ("done", "rejected") and served == _serving(client, status):
                return status
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not over after {timeout_s:.0f} s: {status}")


def _serving(client: Client, status: dict[str, Any]) -> int:
    """The version the job leaves served: its full version, or (not served) the pointer's."""
    if status.get("pointer_moved"):
        return int(status["version"])
    return int(client.get_json("/versions/current")["version"])


def load_stored(home: Path, version: int) -> LoadedVersion:
    """A version from the stack's model store (weights and state.json, as the server loads
    them)."""
    from safetensors.torch import load_file

    path = home / "models" / "bsce-classifier" / f"v{version}"
    return load_version(
        load_file(str(path / "weights.safetensors")), json.loads((path / "state.json").read_text())
    )


def accuracy(loaded: LoadedVersion, images: torch.Tensor, name: str) -> float:
    """Top-1 accuracy in percent of `images` of class `name`, predicted as the server does:
    raw logits, classes inactive in the version masked."""
    logits, _ = infer(loaded.model, images, loaded.augment, device=DEVICE)
    active = loaded.metadata.get("active_classes")
    if active:
        logits = logits.masked_fill(~torch.tensor(active, dtype=torch.bool), float("-inf"))
    return 100.0 * float((logits.argmax(1) == loaded.class_names.index(name)).float().mean())


def evaluate(home: Path, version: int | None, tests: dict[str, torch.Tensor], new: str) -> dict:
    if version is None:
        return {}
    loaded = load_stored(home, version)
    old = {n: accuracy(loaded, x, n) for n, x in tests.items() if n != new}
    return {
        "new_accuracy": accuracy(loaded, tests[new], new),
        "old_accuracy": float(np.mean(list(old.values()))),
        "old_by_class": old,
    }


def run_one(args: argparse.Namespace, n: int, data: Any) -> dict[str, Any]:
    """One fresh stack, one post of `n` images; the row of the table."""
    train, test = data.train, data.test
    c = train.class_names.index(args.cls)
    images = train.images[(train.labels == c).nonzero().squeeze(1)[:n]].numpy()
    probe = encode_images(test.images[test.labels == c][:1].numpy())[0]
    payload = encode_images(images)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bsce-latency-") as tmp:
        env = {**os.environ, "BSCE_DATA_HOME": f"{tmp}/state", "BENTOML_HOME": f"{tmp}/bentoml"}
        for var in ("REDIS_URL", "BSCE_API_TOKEN", "BSCE_PREFIX"):
            env.pop(var, None)
        with (
            local_stack(env, free_port(), args.worker_args.split(), log_dir=Path(tmp)) as stack,
            Client(stack.url) as client,
        ):
            base = client.classes()
            if args.cls in [k["name"] for k in base["classes"]]:
                raise SystemExit(f"version 0 already knows {args.cls}: post a class it does not")
            time.sleep(args.settle_s)
            t0 = time.monotonic()
            accepted, request_bytes = client.learn(payload, [args.cls] * n)
            post_s = time.monotonic() - t0
            watch = Watch(client, probe, args.cls, t0)
            status = watch_job(client, accepted["job_id"], watch, args.timeout_s)
            interim_report = _report(client, status.get("interim_version"))
            names = [k["name"] for k in base["classes"]] + [args.cls]
            tests = {m: test.images[test.labels == test.class_names.index(m)] for m in names}
            home = Path(tmp) / "bentoml"
            interim_eval = evaluate(home, status.get("interim_version"), tests, args.cls)
            full_eval = evaluate(home, status.get("version"), tests, args.cls)
    return _row(n, status, watch, post_s, request_bytes, base, interim_report, interim_eval,
                full_eval, load_before)  # fmt: skip


def _report(client: Client, version: int | None) -> dict[str, Any] | None:
    return None if version is None else client.get_json(f"/versions/{version}").get("report")


def _row(
    n: int,
    status: dict[str, Any],
    watch: Watch,
    post_s: float,
    request_bytes: int,
    base: dict[str, Any],
    interim_report: dict[str, Any] | None,
    interim_eval: dict[str, Any],
    full_eval: dict[str, Any],
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    interim, full = status.get("interim_version"), status.get("version")
    return {
        "n": n,
        "base_exemplars": sum(int(k.get("exemplars") or 0) for k in base["classes"]),
        "request_bytes": request_bytes,
        "post_seconds": post_s,
        "job": {k: status.get(k) for k in _STATUS_FIELDS},
        "interim": {
            "version": interim,
            "served": bool(status.get("interim_served")),
            "seconds_to_served": watch.first.get(interim) if status.get("interim_served") else None,
            "worker_seconds": status.get("interim_seconds"),
            "gate": status.get("interim_gate"),
            "fit": interim_report,
            **interim_eval,
        },
        "full": {
            "version": full,
            "served": bool(status.get("pointer_moved")),
            "seconds_to_served": watch.first.get(full) if status.get("pointer_moved") else None,
            "worker_seconds": status.get("full_seconds"),
            "gate": (status.get("gate") or {}).get("verdict"),
            **full_eval,
        },
        "first_correct_probe": None
        if watch.correct is None
        else {"seconds": watch.correct[0], "version": watch.correct[1]},
        "answers_first_seen": {str(v): t for v, t in sorted(watch.first.items())},
        "failed_polls": watch.failed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


_STATUS_FIELDS = ("state", "submitted", "started", "finished", "attempts", "interim_version",
                  "interim_served", "interim_gate", "interim_note", "interim_seconds", "version",
                  "full_seconds", "pointer_moved", "note", "interim_withdrawn")  # fmt: skip


def _cell(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n   N | interim: served s  worker s  new %  old % | full: served s  worker s  new %"
        "  old % | probe right s (version) | load 1-min"
    )
    for r in rows:
        i, f, p = r["interim"], r["full"], r["first_correct_probe"]
        probe = "-" if p is None else f"{p['seconds']:.1f} (v{p['version']})"
        print(
            f"{r['n']:>4} | {_cell(i['seconds_to_served']):>17} {_cell(i['worker_seconds']):>9} "
            f"{_cell(i.get('new_accuracy')):>6} {_cell(i.get('old_accuracy')):>6} | "
            f"{_cell(f['seconds_to_served']):>14} {_cell(f['worker_seconds']):>9} "
            f"{_cell(f.get('new_accuracy')):>6} {_cell(f.get('old_accuracy')):>6} | "
            f"{probe:>23} | {r['load_average_before'][0]:.1f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", default="20,100,1000", help="images posted, one fresh stack each")
    p.add_argument("--class", dest="cls", default="airplane", help="a class version 0 lacks")
    p.add_argument("--worker-args", default="", help="extra learner.worker flags")
    p.add_argument("--settle-s", type=float, default=10.0, help="idle time before the POST")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per post")
    p.add_argument("--out", type=Path, default=REPO / "results" / "latency")
    args = p.parse_args(argv)
    data = load_dataset("cifar10")
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        print(f"N = {n}: a fresh stack, then {n} images of {args.cls} ...", flush=True)
        rows.append(run_one(args, n, data))
        print_table(rows[-1:])
    print_table(rows)
    result = {
        "command": " ".join(
            ["scripts/latency_bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": dt.date.today().isoformat(),
        "machine": describe_machine(DEVICE),
        "class": args.cls,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"latency_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
