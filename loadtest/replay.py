"""Replay a class-incremental protocol through a running server's HTTP API.

    python -m loadtest.replay --protocol cifar10-b0-s5 --url http://127.0.0.1:3000 \\
        [--method bsce|ce] [--memory M] [--epochs E] [--seed S] [--token T] \\
        [--max-train-per-class N] [--steps N] [--out results] [--plot] [--compare OFFLINE.json]

For each step of the protocol: one POST /learn with that step's training images (real
images from ``learner.data.load_dataset``, PNG, base64, in the offline runner's order) and
``classes`` in learning order -> one job -> wait for it -> wait
until /predict answers with the job's version -> predict the test images of every class
seen so far (batched, top-5) -> accuracy matrix and metrics with ``learner.metrics``. The
result file has the keys of ``learner.bench.run_protocol``'s, plus ``source: "http"``, the
server URL, the version and the learning latency of every step.

Needs a fresh server: model version 0 only and an empty label map, so that the label-map
index of every class equals its position in the class order (as in the offline runner), and
a learner worker started with the config to compare (backbone, memory, seed: they are
fixed at worker start). ``--method`` and ``--epochs`` are sent as per-job overrides;
``--memory`` and ``--seed`` are checked against what the server reports.

The config recorded is the one the learner used: from ``GET /versions/{v}``, else (a server
without it) from the versions' ``state.json`` in the server's model store
(``--bentoml-home``, same machine), else the one assumed from the arguments
(``config_source`` says which). With the same config, seed and thread count the learner's
training is ``learner.bench.run_protocol``'s bit for bit (loadtest/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.bench import (
    RESULT_FORMAT,
    limit_per_class,
    metric_fields,
    result_filename,
)
from learner.bench import format_table as bench_format_table
from learner.core.config import MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.machine import describe_machine
from learner.data import Dataset, load_dataset
from learner.metrics import IncrementalEvaluation
from learner.protocols import PRESETS, Protocol, get_protocol, resolve_class_order

from .client import Client, ServerError, encode_images, parse_time, version_metadata

SOURCE = "http"
# The worker's defaults (learner/worker.py) where the server does not say what it runs.
WORKER_DEFAULT_EPOCHS = 4
WORKER_DEFAULT_BACKBONE = "resnet32"
WORKER_DEFAULT_SEED = 1993


class ReplayError(RuntimeError):
    pass


# -- what to post ----------------------------------------------------------------------------


def truncated_protocol(
    protocol: Protocol, order: Sequence[int], steps: int | None
) -> tuple[Protocol, list[int]]:
    """The first `steps` steps of `protocol` as a protocol of their own (and its order)."""
    if steps is None or steps >= protocol.num_steps:
        return protocol, list(order)
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    total = sum(protocol.step_sizes()[:steps])
    short = get_protocol(protocol.name, num_steps=steps, total_classes=total)
    return short, list(order)[:total]


def step_indices(
    train_y: torch.Tensor, lo: int, hi: int, max_train_per_class: int | None
) -> torch.Tensor:
    """Training-set indices of the step whose learning-order labels are lo..hi-1, in the
    order ``learner.bench.run_protocol`` trains on them (dataset order, then the cap).

    They are posted in this order with ``classes`` = the step's classes in learning order,
    so the server's label-map indices equal the offline runner's labels and the learner
    worker sees the very same tensors.
    """
    idx = ((train_y >= lo) & (train_y < hi)).nonzero().squeeze(1)
    if max_train_per_class is not None:
        idx = limit_per_class(idx, train_y, max_train_per_class)
    return idx


# -- evaluation through /predict -------------------------------------------------------------


def predict_all(
    client: Client,
    images_b64: Sequence[str],
    version: int,
    batch: int,
    top_k: int = 5,
    max_stale: int = 600,
) -> tuple[list[list[str]], dict[str, Any]]:
    """Top-k label names of every image, all answered by `version`.

    A chunk answered by another version (a worker that has not swapped yet) is sent again;
    a 413 halves the chunk size (the server's BSCE_MAX_BATCH / body limit).
    """
    out: list[list[str]] = []
    requests_sent = stale = 0
    t0 = time.perf_counter()
    i = 0
    while i < len(images_b64):
        chunk = images_b64[i : i + batch]
        try:
            answer = client.predict(chunk, top_k)
        except ServerError as e:
            if e.status == 413 and batch > 1:
                batch = max(1, batch // 2)
                continue
            raise
        requests_sent += 1
        if answer["version"] != version:
            if answer["version"] > version:
                raise ReplayError(
                    f"the server answers with version {answer['version']} while the replay "
                    f"evaluates {version}: something else is posting to this server"
                )
            stale += 1
            if stale > max_stale:
                raise ReplayError(f"workers still answer with version {answer['version']}")
            time.sleep(0.1)
            continue
        out.extend([s["label"] for s in p["labels"]] for p in answer["predictions"])
        i += len(chunk)
    return out, {
        "eval_seconds": time.perf_counter() - t0,
        "eval_requests": requests_sent,
        "eval_stale_retries": stale,
        "predict_batch": batch,
    }


def wait_served(client: Client, probe_b64: str, version: int, timeout_s: float = 120.0) -> float:
    """Poll /predict until an answer comes from `version`; the time.time() of that answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = client.predict([probe_b64], 1)
        if answer["version"] == version:
            return time.time()
        if time.monotonic() > deadline:
            raise ReplayError(f"version {version} not served after {timeout_s:.0f} s")
        time.sleep(0.05)


def to_learning_order(
    top: list[list[str]], index_of: dict[str, int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(top-1, top-k) learning-order labels; -1 for a name outside the seen classes."""
    width = max(1, max((len(t) for t in top), default=1))
    topk = np.full((len(top), max(width, 1)), -1, dtype=np.int64)
    for r, labels in enumerate(top):
        for c, name in enumerate(labels):
            topk[r, c] = index_of.get(name, -1)
    return topk[:, 0].copy(), topk[:, :k]


# -- config ------------------------------------------------------------------------------------


def assumed_config(args: argparse.Namespace, protocol: Protocol, dataset: Dataset) -> StepConfig:
    """The worker's config as its command-line defaults would make it (learner.worker
    config_from_args), with the replay's arguments: used only when the server does not say."""
    memory = args.memory if args.memory is not None else protocol.memory_size
    mode = "none" if memory == 0 else protocol.memory_mode
    if mode == "none" and memory:
        mode = "fixed_total"
    return StepConfig(
        method=args.method or "bsce",
        model=ModelConfig(
            backbone=args.backbone or WORKER_DEFAULT_BACKBONE,
            in_channels=dataset.train.images.shape[1],
        ),
        optim=OptimConfig(epochs=args.epochs or WORKER_DEFAULT_EPOCHS),
        memory=MemoryConfig(mode=mode, size=memory),
    )


def check_server_config(
    base: dict[str, Any], seed: int | None, args: argparse.Namespace, dataset: Dataset
) -> list[str]:
    """Differences between what the worker runs and what the replay was asked for."""
    problems = []
    mem = base.get("memory", {})
    if args.memory is not None:
        want_mode = "none" if args.memory == 0 else None
        if int(mem.get("size", -1)) != args.memory or (want_mode and mem.get("mode") != want_mode):
            problems.append(
                f"--memory {args.memory}, but the learner worker runs memory "
                f"{mem.get('size')} ({mem.get('mode')}); restart it with --memory {args.memory}"
            )
    if args.seed is not None and seed is not None and seed != args.seed:
        problems.append(
            f"--seed {args.seed}, but the learner worker runs seed {seed}; restart it with "
            f"--seed {args.seed}"
        )
    if args.backbone and base.get("model", {}).get("backbone") != args.backbone:
        problems.append(
            f"--backbone {args.backbone}, but the learner worker runs "
            f"{base.get('model', {}).get('backbone')}"
        )
    aug = base.get("augment", {})
    if aug and (
        tuple(aug.get("mean", ())) != tuple(dataset.mean)
        or tuple(aug.get("std", ())) != tuple(dataset.std)
        or aug.get("crop") != dataset.crop
        or aug.get("pad") != dataset.pad
    ):
        problems.append(
            f"the learner normalises/crops as {aug}, the offline runner would use the data "
            f"set's mean {dataset.mean}, std {dataset.std}, crop {dataset.crop}, pad "
            f"{dataset.pad}: results will not be comparable"
        )
    return problems


def _worker_seed(meta: dict[str, Any], version: int) -> int | None:
    """The learner worker's --seed, from a version's metadata."""
    if "seed" not in meta:
        return None
    if meta.get("rng") in ("seed", "parent"):
        return int(meta["seed"])
    # Versions written before the random stream was saved recorded seed + version.
    return int(meta["seed"]) - version


def _derived_epochs(metrics: dict[str, Any], counts: Sequence[int]) -> int | None:
    ips, secs = metrics.get("train_images_per_second"), metrics.get("train_seconds")
    total = sum(int(c) for c in counts)
    if not ips or not secs or not total:
        return None
    return int(round(float(ips) * float(secs) / total))


# -- the replay --------------------------------------------------------------------------------


def run_replay(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    start = time.perf_counter()
    protocol = get_protocol(args.protocol)
    dataset = load_dataset(protocol.dataset, root=args.data_root)
    full_order = resolve_class_order(protocol, dataset.train.class_names, args.order)
    protocol, order = truncated_protocol(protocol, full_order, args.steps)
    steps = protocol.step_classes(order)
    step_sizes = [len(s) for s in steps]
    names = [dataset.train.class_names[c] for c in order]
    index_of = {n: i for i, n in enumerate(names)}

    remap = torch.full((len(dataset.train.class_names),), -1, dtype=torch.int64)
    remap[torch.as_tensor(order)] = torch.arange(len(order))
    train_y = remap[dataset.train.labels]
    test_y = remap[dataset.test.labels]
    train_names = np.asarray(dataset.train.class_names, dtype=object)

    client = Client(args.url, args.token, timeout_s=args.request_timeout)
    client.wait_ready(args.ready_timeout)
    versions = client.versions()
    classes = client.classes()
    known = [c["name"] for c in classes["classes"]] + list(classes["pending"])
    fresh = versions["current"] == 0 and len(versions["versions"]) == 1 and not known
    if not fresh and not args.allow_used_server:
        raise ReplayError(
            f"the server is not fresh (current version {versions['current']}, "
            f"{len(versions['versions'])} versions, {len(known)} classes in the label map): "
            "start it on an empty store (new BSCE_PREFIX) so that label-map indices equal the "
            "learning order, or pass --allow-used-server"
        )
    base_version = int(versions["current"])
    base_info = client.version_info(base_version)
    base_meta, config_source = version_metadata(client, base_info, args.bentoml_home, base_version)
    server_workers = client.server_workers()

    worker_seed: int | None = None
    if base_meta is not None and isinstance(base_meta.get("config"), dict):
        base_config = base_meta["config"]
        worker_seed = _worker_seed(base_meta, base_version)
        problems = check_server_config(base_config, worker_seed, args, dataset)
        if problems and not args.ignore_config_mismatch:
            raise ReplayError("; ".join(problems))
        for p in problems:
            log(f"warning: {p}")
    else:
        base_config = assumed_config(args, protocol, dataset).model_dump(mode="json")
        config_source = "assumed"
        log(
            "warning: the server does not expose the learner's config; recording the one "
            "assumed from the arguments (pass --bentoml-home to read it from the model store)"
        )

    overrides = {k: v for k, v in {"method": args.method, "epochs": args.epochs}.items() if v}
    cnn_eval = IncrementalEvaluation()
    reports: list[dict[str, Any]] = []
    step_configs: list[dict[str, Any] | None] = []
    learner_machine: dict[str, Any] | None = None
    step_rng: list[str | None] = []
    test_cache: dict[int, list[str]] = {}
    seen = 0
    step_source = config_source
    log(
        f"replaying {protocol.name} ({len(steps)} steps) against {client.url}: "
        f"{server_workers or '?'} API workers, config from {config_source}"
    )
    for t, step in enumerate(steps):
        lo, hi = seen, seen + len(step)
        idx = step_indices(train_y, lo, hi, args.max_train_per_class)
        images = encode_images(dataset.train.images[idx].numpy())
        labels = [str(n) for n in train_names[dataset.train.labels[idx].numpy()]]
        t_post = time.time()
        try:
            accepted, body_bytes = client.learn(
                images, labels, overrides or None, classes=names[lo:hi]
            )
        except ServerError as e:
            if e.status == 413:
                raise ReplayError(
                    f"step {t + 1}: the server refuses one /learn request of {len(images)} "
                    f"images ({e.error}). A step must be one job: raise BSCE_MAX_BODY_BYTES / "
                    "BSCE_MAX_LEARN_IMAGES (and the store's job size limit) on the server"
                ) from e
            raise
        post_seconds = time.time() - t_post
        if accepted["classes"] != names[lo:hi]:
            raise ReplayError(f"step {t + 1}: server took classes {accepted['classes']}")
        del images
        status = client.wait_job(accepted["job_id"], timeout_s=args.job_timeout)
        version = int(status["version"])
        seen = hi

        for c in range(lo, hi):
            if c not in test_cache:
                sel = (test_y == c).nonzero().squeeze(1)
                test_cache[c] = encode_images(dataset.test.images[sel].numpy())
        # The offline runner's test samples (all of the seen classes), grouped by class;
        # accuracies do not depend on the order.
        batch_b64 = [b for c in range(seen) for b in test_cache[c]]
        y_true = np.concatenate([np.full(len(test_cache[c]), c) for c in range(seen)])
        served_at = wait_served(client, test_cache[lo][0], version, args.swap_timeout)
        top, eval_stats = predict_all(client, batch_b64, version, args.predict_batch)
        y_pred, topk = to_learning_order(top, index_of, 5)
        cnn_eval.add_step(y_true, y_pred, step_sizes[: t + 1], topk_pred=topk)

        info = client.version_info(version)
        meta, source = version_metadata(client, info, args.bentoml_home, version)
        counts = list(info.get("counts") or [])
        metrics = dict(info.get("metrics") or {})
        if meta is not None and isinstance(meta.get("report"), dict):
            report = dict(meta["report"])
            step_configs.append(meta.get("config"))
            step_source = source
            learner_machine = meta.get("machine") or learner_machine
            step_rng.append(meta.get("rng"))
            if worker_seed is None:
                worker_seed = _worker_seed(meta, version)
        else:
            epochs = _derived_epochs(metrics, counts) if isinstance(counts, list) else None
            report = {
                "step_classes": list(range(lo, hi)),
                "seen_classes": len(info.get("class_names") or []),
                "counts": counts,
                "epochs": epochs,
                "images_trained": None if epochs is None else epochs * sum(counts),
                "train_seconds": metrics.get("train_seconds"),
                "train_images_per_second": metrics.get("train_images_per_second"),
                "selection_seconds": None,
            }
            step_configs.append(None)
            step_rng.append(None)
        report["accuracy"] = cnn_eval.result().accuracy_per_step[-1]
        report["memory"] = metrics.get("exemplars")
        submitted = parse_time(status.get("submitted"))
        started = parse_time(status.get("started"))
        finished = parse_time(status.get("finished"))
        report["http"] = {
            "version": version,
            "job_id": accepted["job_id"],
            "metadata_source": source,
            "train_images": int(idx.shape[0]),
            "request_bytes": body_bytes,
            "post_seconds": post_seconds,
            "queued_seconds": None if started is None or submitted is None else started - submitted,
            "job_seconds": None if finished is None or started is None else finished - started,
            # From the start of POST /learn to the first /predict answered by the new version.
            "learn_latency_seconds": served_at - t_post,
            "swap_seconds": None if finished is None else served_at - finished,
            "test_images": len(batch_b64),
            **eval_stats,
        }
        reports.append(report)
        h = report["http"]
        log(
            f"step {t + 1}/{len(steps)}: {len(step)} classes, {h['train_images']} images -> "
            f"version {version}; learned in {h['learn_latency_seconds']:.1f} s; "
            f"accuracy {report['accuracy']:.1f} on {len(batch_b64)} test images"
        )

    # Counted again at the end: a worker still starting at the beginning is missed there.
    server_workers = max(server_workers or 0, client.server_workers() or 0) or None
    client.close()
    cnn = cnn_eval.result()
    config = next((c for c in reversed(step_configs) if c), None)
    if config is None:
        config = json.loads(json.dumps(base_config))
        config["method"] = args.method or config.get("method", "bsce")
        if args.epochs:
            config["optim"]["epochs"] = args.epochs
        elif reports and reports[-1].get("epochs"):
            config["optim"]["epochs"] = reports[-1]["epochs"]
    else:
        config_source = step_source
    distinct = {json.dumps(c, sort_keys=True) for c in step_configs if c}
    seed = worker_seed if worker_seed is not None else (args.seed or WORKER_DEFAULT_SEED)
    trained = [r.get("images_trained") for r in reports]
    train_s = [r.get("train_seconds") for r in reports]
    client_machine = describe_machine(torch.device("cpu"))
    return {
        "format": RESULT_FORMAT,
        "source": SOURCE,
        "url": client.url,
        "protocol": protocol.name,
        "protocol_config": protocol.model_dump(mode="json"),
        "method": config["method"],
        "memory": config["memory"],
        "config": config,
        "config_source": config_source,
        "config_per_step_differs": len(distinct) > 1,
        "class_order": [int(c) for c in order],
        "class_names": names,
        "seed": seed,
        "seed_rule": "version 0's weights come from Generator(seed); each step continues its "
        "parent version's random stream (step_rng 'parent'), as learner.bench draws a whole "
        "run from one generator",
        "step_rng": step_rng,
        "order_seed": protocol.class_order,
        "max_train_per_class": args.max_train_per_class,
        "data_source": dataset.source,
        "machine": learner_machine
        or {**client_machine, "note": "client machine (learner's unknown)"},
        "client_machine": client_machine,
        "server": {
            "workers": server_workers,
            "fresh": fresh,
            "base_version": base_version,
            "overrides": overrides,
        },
        "versions": [r["http"]["version"] for r in reports],
        "learn_latency_seconds": [r["http"]["learn_latency_seconds"] for r in reports],
        **metric_fields(cnn),
        # The server predicts with the CNN head only; NME is not served.
        "nme": None,
        "steps": reports,
        "wall_seconds": time.perf_counter() - start,
        "train_images_per_second": (
            sum(trained) / sum(train_s)
            if all(v is not None for v in trained + train_s) and sum(train_s) > 0
            else None
        ),
    }


# -- output ------------------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    """``learner.bench.format_table``'s table, plus the version and learning latency."""
    return bench_format_table(
        result,
        columns=[
            ("version", 7, lambda r: str(r["http"]["version"])),
            ("learn s", 8, lambda r: f"{r['http']['learn_latency_seconds']:.1f}"),
        ],
        header_note=f"source=http ({result['url']}, config from {result['config_source']})",
    )


def replay_filename(result: dict[str, Any]) -> str:
    name = "http_" + result_filename(result)
    if result["protocol_config"]["num_steps"] != PRESETS[result["protocol"]].num_steps:
        name = name.replace(".json", f"_steps{result['protocol_config']['num_steps']}.json")
    return name


def compare(result: dict[str, Any], offline: dict[str, Any]) -> dict[str, Any]:
    """Metric differences (http - offline) and the config fields that differ."""
    diffs = {
        k: (
            None
            if result["metrics"][k] is None or offline["metrics"][k] is None
            else result["metrics"][k] - offline["metrics"][k]
        )
        for k in ("avg_incremental_accuracy", "last_accuracy", "forgetting")
    }
    per_step = [
        a - b
        for a, b in zip(
            result["cnn"]["accuracy_per_step"], offline["cnn"]["accuracy_per_step"], strict=False
        )
    ]
    fields = {
        "method": lambda r: r["method"],
        "memory": lambda r: r["memory"],
        "backbone": lambda r: r["config"]["model"]["backbone"],
        "epochs": lambda r: r["config"]["optim"]["epochs"],
        "optim": lambda r: r["config"]["optim"],
        "distill": lambda r: r["config"]["distill"],
        "augment": lambda r: r["config"]["augment"],
        "seed": lambda r: r["seed"],
        "class_order": lambda r: r["class_order"],
        "max_train_per_class": lambda r: r["max_train_per_class"],
    }
    differing = [k for k, get in fields.items() if get(result) != get(offline)]
    # Different thread counts, devices or CPU vector ISAs round differently in training: not
    # bit-exact. A field one of the two files lacks (older results) cannot be compared.
    theirs = offline.get("machine", {})
    machine = [
        k
        for k in ("device", "torch_threads", "cpu_capability", "torch")
        if k in theirs and k in result["machine"] and result["machine"][k] != theirs[k]
    ]
    unknown = [k for k in ("cpu_capability",) if k not in theirs or k not in result["machine"]]
    return {
        "offline_metrics": offline["metrics"],
        "difference": diffs,
        "accuracy_per_step_difference": per_step,
        "config_fields_differing": differing,
        "machine_fields_differing": machine,
        "machine_fields_unknown": unknown,
        "within_one_point": all(v is None or abs(v) <= 1.0 for v in diffs.values()),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--protocol", required=True, choices=sorted(PRESETS))
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:3000")
    p.add_argument("--method", choices=["bsce", "ce"], default=None, help="per-job override")
    p.add_argument("--epochs", type=int, default=None, help="per-job override")
    p.add_argument(
        "--memory", type=int, default=None, help="expected exemplar budget (checked; 0 = none)"
    )
    p.add_argument("--seed", type=int, default=None, help="expected worker seed (checked)")
    p.add_argument(
        "--backbone",
        choices=["resnet32", "resnet18", "resnet8"],
        default=None,
        help="expected backbone (checked; assumed when the server does not say)",
    )
    p.add_argument("--token", default=None, help="bearer token for /learn (BSCE_API_TOKEN)")
    p.add_argument("--order", default=None, help="class order name or file (as learner.bench)")
    p.add_argument("--max-train-per-class", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument(
        "--bentoml-home",
        type=Path,
        default=None,
        help="the server's BENTOML_HOME, to read each version's learner metadata (config, "
        "seed, step report) when the API does not expose it",
    )
    p.add_argument("--predict-batch", type=int, default=256, help="images per /predict request")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--job-timeout", type=float, default=6 * 3600.0)
    p.add_argument("--swap-timeout", type=float, default=120.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--allow-used-server", action="store_true")
    p.add_argument(
        "--ignore-config-mismatch",
        action="store_true",
        help="warn instead of stopping when the worker's memory/seed/backbone differ",
    )
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--plot", action="store_true", help="also write the accuracy curve (PNG)")
    p.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        default=[],
        help="offline learner.bench result(s) to compare with (and plot next to)",
    )
    return p


def add_comparisons(result: dict[str, Any], offline_files: Sequence[Path]) -> None:
    """``comparison`` with the first offline result, ``comparisons`` with each of them."""
    comparisons = [
        {"offline_file": str(f), **compare(result, json.loads(Path(f).read_text()))}
        for f in offline_files
    ]
    result.pop("comparison", None)
    result.pop("comparisons", None)
    if comparisons:
        result["comparison"] = comparisons[0]
        result["comparisons"] = comparisons


def print_comparisons(result: dict[str, Any]) -> None:
    for c in result.get("comparisons", []):
        d = c["difference"]
        print(
            "vs {}: avg {:+.2f}  last {:+.2f}  forgetting {}  per step {}  (config differs in: "
            "{}; machine differs in: {})".format(
                c["offline_file"],
                d["avg_incremental_accuracy"],
                d["last_accuracy"],
                "-" if d["forgetting"] is None else f"{d['forgetting']:+.2f}",
                " ".join(f"{x:+.2f}" for x in c["accuracy_per_step_difference"]),
                ", ".join(c["config_fields_differing"]) or "nothing",
                ", ".join(c["machine_fields_differing"]) or "nothing known",
            )
        )


def write_plot(result: dict[str, Any], path: Path, offline_files: Sequence[Path]) -> Path:
    from learner.plot import plot

    png = path.with_suffix(".png")
    plot([result, *(json.loads(Path(f).read_text()) for f in offline_files)], png)
    return png


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        result = run_replay(args, log=lambda m: print(m, file=sys.stderr))
    except ReplayError as e:
        raise SystemExit(f"replay: {e}") from None
    add_comparisons(result, args.compare)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / replay_filename(result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print_comparisons(result)
    print(f"wrote {path}")
    if args.plot or args.compare:
        print(f"wrote {write_plot(result, path, args.compare)}")
    return result


def compare_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m loadtest.compare HTTP.json OFFLINE.json [...]``: (re)compare a replay
    result with offline results, update its ``comparison(s)`` and its PNG."""
    p = argparse.ArgumentParser(prog="python -m loadtest.compare", description=compare_main.__doc__)
    p.add_argument("replay", type=Path, help="a loadtest.replay result file")
    p.add_argument("offline", type=Path, nargs="+", help="learner.bench result files")
    args = p.parse_args(argv)
    result = json.loads(args.replay.read_text())
    if result.get("source") != SOURCE:
        raise SystemExit(f"{args.replay} is not a loadtest.replay result")
    add_comparisons(result, args.offline)
    args.replay.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print_comparisons(result)
    print(f"updated {args.replay}; wrote {write_plot(result, args.replay, args.offline)}")
    return result


if __name__ == "__main__":
    main()
