"""One machine, one command: embedded Redis, the learner worker and the API server together.

    .venv/bin/python scripts/demo.py [--port 3000] [--exit]

Starts ``python -m learner.worker`` (its defaults: version 0 is the committed six-class base
model, models/) and ``bentoml serve server.service:BsceServe`` (2 API workers) on the
embedded Redis under ``BSCE_DATA_HOME`` (default ``.cache/state``) and the model store under
``BENTOML_HOME`` (default ``.cache/bentoml``), waits until the server is ready, posts two
classes the base model does not know (100 images each of the bundled CIFAR-10 subset)
through ``/learn``, waits for the job, prints predictions for test images of old and new
classes and how long learning took, then keeps serving until Ctrl-C (or exits with
``--exit``). With ``REDIS_URL`` set, uses that Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.data import Dataset  # noqa: E402
from loadtest.client import png_b64  # noqa: E402
from loadtest.stack import Stack, StackError, local_stack  # noqa: E402


def _http(
    method: str, url: str, body: dict | None = None, timeout: float = 30.0
) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    token = os.environ.get("BSCE_API_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--classes", default="airplane,automobile", help="classes of the subset to post")
    p.add_argument("--exit", action="store_true", help="stop everything after the demo")
    args = p.parse_args()
    os.environ.setdefault("BSCE_DATA_HOME", str(REPO / ".cache" / "state"))
    os.environ.setdefault("BENTOML_HOME", str(REPO / ".cache" / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    url = f"http://127.0.0.1:{args.port}"

    from learner.data import load_dataset

    subset = load_dataset("cifar10-subset")
    print(f"starting the learner worker and the API server at {url} ...", flush=True)
    try:
        with local_stack(dict(os.environ), args.port) as stack:
            _demo(stack, subset, args)
    except KeyboardInterrupt:
        pass
    except StackError as e:
        raise SystemExit(str(e)) from None


def _demo(stack: Stack, subset: Dataset, args: argparse.Namespace) -> None:
    url = stack.url
    _, classes = _http("GET", url + "/classes")
    known = [c["name"] for c in classes.get("classes", [])]
    print(f"version 0 knows {len(known)} classes: {', '.join(known) or 'none'}")
    names = [n.strip() for n in args.classes.split(",") if n.strip()]
    if set(names) <= set(known):
        print(f"the served version already knows {names}; not posting them again")
    else:
        _learn(url, subset, names)
        known += [n for n in names if n not in known]
    _show_predictions(url, subset, known, names)
    if args.exit:
        return
    print(f"\nserving at {url} (OpenAPI at {url}/docs); Ctrl-C stops the server and the worker")
    while all(p.poll() is None for p in stack.procs.values()):
        time.sleep(1)


def _learn(url: str, subset: Dataset, names: list[str]) -> None:
    wanted = [subset.train.class_names.index(n) for n in names]
    idx = [i for i, y in enumerate(subset.train.labels.tolist()) if y in wanted]
    body = {
        "images": [png_b64(subset.train.images[i].numpy()) for i in idx],
        "labels": [subset.train.class_names[int(subset.train.labels[i])] for i in idx],
    }
    t0 = time.monotonic()
    status, job = _http("POST", url + "/learn", body, timeout=120)
    if status != 202:
        raise SystemExit(f"/learn answered {status}: {job}")
    print(f"posted {len(idx)} images of {names}: job {job['job_id']} ({status})", flush=True)
    last = None
    while True:
        _, st = _http("GET", f"{url}/jobs/{job['job_id']}")
        if st["state"] in ("done", "failed"):
            break
        line = f"  job {st['state']}, progress {st.get('progress') or 0:.0%} {st.get('progress_note') or ''}"
        if line != last:
            print(line, flush=True)
            last = line
        time.sleep(1)
    if st["state"] != "done":
        raise SystemExit(f"the job failed: {st.get('error')}")
    # Learning latency: until a prediction answers from the new version.
    probe = {"images": [png_b64(subset.test.images[0].numpy())]}
    while _http("POST", url + "/predict", probe)[1].get("version") != st["version"]:
        time.sleep(0.05)
    print(f"learned in {time.monotonic() - t0:.1f} s: version {st['version']}")


def _show_predictions(url: str, subset: Dataset, known: list[str], new: list[str]) -> None:
    """Two test images of every known class, then each class's accuracy on all 20."""
    test = subset.test
    by_class = {
        n: [i for i, y in enumerate(test.labels.tolist()) if test.class_names[y] == n]
        for n in known
    }
    idx = [i for n in known for i in by_class[n]]
    _, pred = _http(
        "POST",
        url + "/predict",
        {"images": [png_b64(test.images[i].numpy()) for i in idx], "top_k": 2},
    )
    answers = dict(zip(idx, pred["predictions"], strict=True))
    print(f"\npredictions of version {pred['version']} (worker pid {pred.get('worker_pid')}):")
    for n in known:
        for i in by_class[n][:2]:
            top = ", ".join(
                f"{lab['label']} {lab['probability']:.2f}" for lab in answers[i]["labels"]
            )
            print(f"  test image {i:>3} (true: {n:<10}{' new' if n in new else ' old'}) -> {top}")
    print(f"\naccuracy on the subset's {len(by_class[known[0]])} test images a class:")
    for n in known:
        hits = sum(answers[i]["labels"][0]["label"] == n for i in by_class[n])
        print(f"  {n:<10} {'new' if n in new else 'old'}  {100 * hits / len(by_class[n]):5.1f}%")


if __name__ == "__main__":
    main()
