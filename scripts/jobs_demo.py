"""A learner worker turning a two-step CIFAR-10 stream, posted as update jobs, into versions.

    .venv/bin/python scripts/jobs_demo.py [--per-class 1000] [--epochs 3]

Posts the first two steps of cifar10-b0-s5 (real CIFAR-10 from ../shared/data) straight to
the job queue (no HTTP), runs ``python -m learner.worker`` until both jobs are done, prints
each job's time split (queueing and storage against training) and ``bentoml models list``.
Uses ``REDIS_URL`` when set, else the embedded Redis; ``BENTOML_HOME`` when set, else
``.cache/bentoml``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--per-class", type=int, default=1000, help="training images per class (5000 = all)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--prefix", default=f"bsce-demo-{uuid.uuid4().hex[:6]}")
    args = p.parse_args()
    os.environ.setdefault("BENTOML_HOME", str(REPO / ".cache" / "bentoml"))
    os.environ["BSCE_PREFIX"] = args.prefix

    import torch

    from learner.data import load_dataset
    from learner.protocols import get_protocol, resolve_class_order
    from storage import open_storage

    protocol = get_protocol("cifar10-b0-s5")
    data = load_dataset(protocol.dataset)
    order = resolve_class_order(protocol, data.train.class_names)
    steps = protocol.step_classes(order)[:2]
    storage = open_storage()
    # Without REDIS_URL the worker joins this process's embedded Redis (same data dir).
    env = {**os.environ}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "learner.worker",
            "--base-model",
            "none",
            "--epochs",
            str(args.epochs),
        ],
        cwd=REPO,
        env=env,
    )
    try:
        job_ids = []
        for classes in steps:
            idx = torch.cat(
                [(data.train.labels == c).nonzero().squeeze(1)[: args.per_class] for c in classes]
            )
            names = [data.train.class_names[int(c)] for c in data.train.labels[idx]]
            job_ids.append(storage.jobs.submit(data.train.images[idx].numpy(), names))
            print(f"posted job {job_ids[-1]}: {len(idx)} images of {sorted(set(names))}")
        while any(storage.jobs.status(j).state not in ("done", "failed") for j in job_ids):
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(120)

    print()
    print(
        f"{'job':>34} {'version':>7} {'queued s':>9} {'train s':>8} {'storage+queue s':>15} {'overhead':>8}"
    )
    for j in job_ids:
        st = storage.jobs.status(j)
        if st.state != "done":
            print(f"{j}: {st.state} {st.error}")
            continue
        _, meta = storage.versions.load(st.version)
        train = meta["report"]["wall_seconds"]
        # From mark_running to done: loading the parent and memory, the step, the commit.
        job_s = (st.finished - st.started).total_seconds()
        queued = (st.started - st.submitted).total_seconds()
        overhead = job_s - train
        print(
            f"{j:>34} {st.version:>7} {queued:>9.2f} {train:>8.1f} {overhead:>15.2f} {100 * overhead / train:>7.1f}%"
        )
    print("(queued: from posting to the start of training; it includes waiting for the job before)")
    print()
    subprocess.run([sys.executable, "-m", "bentoml", "models", "list"], env=env, check=False)


if __name__ == "__main__":
    main()
