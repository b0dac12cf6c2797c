"""The first hour of a user, as a benchmark: post new classes to a running stack, 100 images
each, and watch every class's accuracy after each post.

    .venv/bin/python scripts/first_hour.py [--url URL] [--posts "airplane,automobile;ship;truck"]
        [--per-class 100] [--test full|subset] [--joint] [--out results/first_hour]

Without ``--url`` it starts a fresh stack of its own (embedded Redis, one learner worker on
its defaults, ``bentoml serve`` with 2 API workers) in a temporary folder, so version 0 is
the deployment's base model. The posted images come from the bundled CIFAR-10 subset
(data/); the test images are the full CIFAR-10 test set of each known class (``--test
full``, 1,000 a class, from ../shared/data) or the subset's 20 a class.

After each post it prints every known class's accuracy through ``/predict``, the means over
the old classes (known before the post) and the new ones, and the seconds from the POST to
the first answer of the version that learned them. With ``--joint`` it also trains the joint
bound offline: the same network trained once from scratch on the base data and every posted
image, with the base model's recipe, for as many optimizer steps as the base model and the
posts' versions took together (`joint_bound`); that is what this data and budget give without
incremental learning. Figures go to ``OUT/first_hour_<date>.json``.
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
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.base import DEFAULT_BASE_MODEL  # noqa: E402
from learner.core.machine import describe_machine  # noqa: E402
from learner.data import Dataset, load_dataset  # noqa: E402
from loadtest.client import Client, encode_images  # noqa: E402
from loadtest.stack import local_stack  # noqa: E402

DEFAULT_POSTS = "airplane,automobile;ship;truck"


def parse_posts(spec: str) -> list[list[str]]:
    posts = [[c.strip() for c in part.split(",") if c.strip()] for part in spec.split(";")]
    if not all(posts):
        raise SystemExit(f"--posts {spec!r}: every post needs at least one class")
    return posts


def post_images(
    subset: Dataset, classes: list[str], per_class: int
) -> tuple[np.ndarray, list[str]]:
    """The first ``per_class`` training images of each class, in class order."""
    names = subset.train.class_names
    images, labels = [], []
    for name in classes:
        idx = (subset.train.labels == names.index(name)).nonzero().squeeze(1)[:per_class]
        if len(idx) < per_class:
            raise SystemExit(f"the subset has only {len(idx)} training images of {name}")
        images.append(subset.train.images[idx].numpy())
        labels += [name] * len(idx)
    return np.concatenate(images), labels


def test_images(test: Any, names: list[str]) -> dict[str, np.ndarray]:
    return {n: test.images[test.labels == test.class_names.index(n)].numpy() for n in names}


def accuracy_by_class(
    client: Client, tests: dict[str, np.ndarray], batch: int = 64
) -> tuple[dict[str, float], int]:
    """Top-1 accuracy in percent of each class through /predict; the version that answered."""
    out, versions = {}, set()
    for name, images in tests.items():
        hits = 0
        for start in range(0, len(images), batch):
            answer = client.predict(encode_images(images[start : start + batch]), top_k=1)
            versions.add(answer["version"])
            hits += sum(p["labels"][0]["label"] == name for p in answer["predictions"])
        out[name] = 100.0 * hits / len(images)
    if len(versions) != 1:
        raise RuntimeError(f"the served version changed during evaluation: {sorted(versions)}")
    return out, versions.pop()


def wait_served(client: Client, version: int, probe: str, timeout_s: float = 120.0) -> float:
    """Poll /predict until the answer comes from ``version``; the monotonic time it did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.predict([probe], top_k=1)["version"] >= version:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"version {version} was not served within {timeout_s:.0f} s")


def run_posts(client: Client, args: argparse.Namespace, subset: Dataset, test: Any) -> list[dict]:
    known = [c["name"] for c in client.classes()["classes"]]
    print(f"version 0 knows {len(known)} classes: {', '.join(known)}", flush=True)
    probe = encode_images(subset.test.images[:1].numpy())[0]
    rows = []
    for post in parse_posts(args.posts):
        images, labels = post_images(subset, post, args.per_class)
        t0 = time.monotonic()
        accepted, _ = client.learn(encode_images(images), labels)
        status = client.wait_job(accepted["job_id"], timeout_s=3600)
        serving = status["version"]
        if status["state"] == "rejected":
            # Saved, not served: users keep the version the pointer names.
            print(f"  the promotion gate rejected version {serving}: {status.get('gate')}")
            serving = client.get_json("/versions/current")["version"]
        served_at = wait_served(client, serving, probe)
        old = list(known)
        known += [c for c in post if c not in known]
        acc, version = accuracy_by_class(client, test_images(test, known))
        detail = client.get_json(f"/versions/{version}")
        row = {
            "post": post,
            "images": len(labels),
            "version": version,
            "seconds_to_served": served_at - t0,
            "job": {k: status.get(k) for k in ("version", "created", "started", "finished")},
            "report": detail.get("report"),
            "rejected_when_cut": detail.get("rejected_when_cut"),
            "job_state": status["state"],
            "gate": detail.get("gate"),
            "config": detail.get("config"),
            "accuracy": acc,
            "old_mean": float(np.mean([acc[c] for c in old])) if old else None,
            "new_mean": float(np.mean([acc[c] for c in post])),
            "mean": float(np.mean(list(acc.values()))),
        }
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    print(
        f"\nposted {', '.join(row['post'])} ({row['images']} images): version {row['version']} "
        f"served {row['seconds_to_served']:.1f} s after the POST",
        flush=True,
    )
    report = row.get("report") or {}
    if "optimizer_steps" in report:
        print(
            f"  trained {report['optimizer_steps']} optimizer steps of "
            f"{report.get('planned_steps', report['optimizer_steps'])} planned in "
            f"{report['train_seconds']:.1f} s (time bound: {report.get('time_budget_seconds')})"
        )
    cut = row.get("rejected_when_cut")
    if cut:
        print(
            f"  trained again without the bound: the gate rejected a first try cut to "
            f"{cut['optimizer_steps']} of {cut['planned_steps']} steps ({cut['train_seconds']:.1f} "
            f"s; {'; '.join(cut['gate_reasons'])})"
        )
    for name, acc in row["accuracy"].items():
        mark = "  (new)" if name in row["post"] else ""
        print(f"  {name:<12} {acc:5.1f}%{mark}")
    old = "-" if row["old_mean"] is None else f"{row['old_mean']:.1f}"
    print(f"  mean {row['mean']:.1f}   old {old}   new {row['new_mean']:.1f}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default=None, help="a running stack (default: start a fresh one)")
    p.add_argument("--token", default=os.environ.get("BSCE_API_TOKEN"))
    p.add_argument("--posts", default=DEFAULT_POSTS, help="classes per post: 'a,b;c;d'")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--test", choices=["full", "subset"], default="full")
    p.add_argument("--joint", action="store_true", help="also train the joint bound offline")
    p.add_argument("--worker-args", default="", help="extra learner.worker flags (fresh stack)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the joint bound")
    p.add_argument(
        "--base-file",
        type=Path,
        default=DEFAULT_BASE_MODEL,
        help="the base model version 0 was made from (for the joint bound)",
    )
    p.add_argument("--out", type=Path, default=REPO / "results" / "first_hour")
    args = p.parse_args(argv)

    subset = load_dataset("cifar10-subset")
    test = load_dataset("cifar10").test if args.test == "full" else subset.test
    if args.url:
        with Client(args.url, args.token) as client:
            rows = run_posts(client, args, subset, test)
            base_meta = client.get_json("/versions/0")
    else:
        with tempfile.TemporaryDirectory(prefix="bsce-first-hour-") as tmp:
            env = {**os.environ, "BSCE_DATA_HOME": f"{tmp}/state", "BENTOML_HOME": f"{tmp}/bentoml"}
            env.pop("REDIS_URL", None)
            env.pop("BSCE_API_TOKEN", None)
            port = free_port()
            with (
                local_stack(env, port, args.worker_args.split(), log_dir=Path(tmp)) as stack,
                Client(stack.url) as client,
            ):
                rows = run_posts(client, args, subset, test)
                base_meta = client.get_json("/versions/0")
    result: dict[str, Any] = {
        "command": " ".join(["scripts/first_hour.py", *(argv or sys.argv[1:])]),
        "date": dt.date.today().isoformat(),
        "machine": describe_machine(torch.device("cpu")),
        "test_set": args.test,
        "posts": rows,
        "base": {k: base_meta.get(k) for k in ("info", "config", "seed")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"first_hour_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}", flush=True)
    if args.joint:
        torch.set_num_threads(args.threads)
        result["joint"] = joint_bound(rows, args.base_file, subset, test)
        judge(result)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return result


def joint_bound(
    rows: list[dict[str, Any]], base_file: Path, subset: Dataset, test: Any
) -> list[dict[str, Any]]:
    """The joint bound (ours): the same network trained once, from scratch, on the base data
    and every posted image together, with the base model's recipe (BSCE over the joint counts;
    no memory or distillation, there is nothing to remember) at the same budget: at least as
    many optimizer steps as the base model and every post's version took (whole epochs, so a
    few more; the step report of each version says how many). Trained once on
    all classes; after post k it predicts among the classes known after post k (the columns
    of the others are left out), which stands in for k joint models, one per post."""
    from learner.base import load_base
    from learner.core.config import StepConfig
    from learner.core.evaluate import infer
    from learner.core.model import IncrementalNet
    from learner.exemplars import ExemplarMemory
    from learner.step import StepData, train_step

    _, metadata, _ = load_base(base_file)
    info = metadata["base_model"]
    dataset = load_dataset(info["dataset"])
    names = list(metadata["class_names"])
    xs, ys = _base_data(dataset.train, names, info.get("max_train_per_class"))
    xs, ys = [xs], [ys]
    for row in rows:
        images, labels = post_images(subset, row["post"], row["images"] // len(row["post"]))
        names += [c for c in row["post"] if c not in names]
        xs.append(torch.from_numpy(images))
        ys.append(torch.tensor([names.index(c) for c in labels]))
    recipe = StepConfig.model_validate(metadata["config"])
    budget = served_steps(metadata, rows)
    config = recipe.model_copy(
        update={
            "memory": recipe.memory.model_copy(update={"mode": "none", "size": 0}),
            "optim": recipe.optim.model_copy(update={"epochs": 1, "min_steps": budget}),
        }
    )
    g = torch.Generator().manual_seed(int(metadata.get("seed", 1993)))
    model = IncrementalNet.create(config.model, g)
    print(
        f"joint bound: {len(names)} classes, {sum(len(y) for y in ys)} images, "
        f"at least {budget} optimizer steps (the served versions' total) from scratch ...",
        flush=True,
    )
    t0 = time.monotonic()
    device = torch.device("cpu")
    result = train_step(
        model,
        StepData(torch.cat(xs), torch.cat(ys)),
        ExemplarMemory(),
        config,
        device=device,
        generator=g,
    )
    train_seconds = time.monotonic() - t0
    tests = test_images(test, names)
    logits = {
        n: infer(result.model, torch.from_numpy(x), config.augment, device=device)[0]
        for n, x in tests.items()
    }
    out, known = [], list(metadata["class_names"])
    for row in rows:
        known += [c for c in row["post"] if c not in known]
        cols = [names.index(c) for c in known]
        acc = {
            n: 100.0 * float((logits[n][:, cols].argmax(1) == known.index(n)).float().mean())
            for n in known
        }
        out.append(
            {
                "classes": list(known),
                "accuracy": acc,
                "mean": float(np.mean(list(acc.values()))),
                "train_seconds": train_seconds,
                "epochs": result.report.epochs,
                "optimizer_steps": result.report.optimizer_steps,
                "served_optimizer_steps": budget,
            }
        )
        print(f"joint bound after {'+'.join(row['post'])}: mean {out[-1]['mean']:.1f}", flush=True)
    return out


def served_steps(base_metadata: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    """Optimizer steps behind the last served version: the base model's and every post's."""
    reports = [base_metadata.get("report"), *(row.get("report") for row in rows)]
    if any(not r or "optimizer_steps" not in r for r in reports):
        raise SystemExit("a version has no step report with optimizer_steps; cannot size the bound")
    return sum(int(r["optimizer_steps"]) for r in reports)


def _base_data(train: Any, names: list[str], limit: int | None) -> tuple[Any, Any]:
    xs, ys = [], []
    for i, name in enumerate(names):
        idx = (train.labels == train.class_names.index(name)).nonzero().squeeze(1)[:limit]
        xs.append(train.images[idx])
        ys.append(torch.full((len(idx),), i, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def judge(result: dict[str, Any]) -> None:
    """The issue's targets: mean within 10 points of the joint bound, no class below half the
    mean, each post served in under a minute."""
    print("\npost                   mean  joint   gap  lowest class (half mean)   served s")
    for row, joint in zip(result["posts"], result["joint"], strict=True):
        low_name = min(row["accuracy"], key=row["accuracy"].get)
        gap = joint["mean"] - row["mean"]
        row["targets"] = {
            "within_10_of_joint": gap <= 10.0,
            "no_class_below_half_mean": row["accuracy"][low_name] >= row["mean"] / 2,
            "served_under_60_s": row["seconds_to_served"] < 60.0,
        }
        print(
            f"{'+'.join(row['post']):<20} {row['mean']:6.1f} {joint['mean']:6.1f} {gap:5.1f}  "
            f"{low_name} {row['accuracy'][low_name]:.1f} ({row['mean'] / 2:.1f})"
            f"{'':>8}{row['seconds_to_served']:6.1f}  "
            + " ".join(k for k, ok in row["targets"].items() if not ok)
        )


if __name__ == "__main__":
    main()
