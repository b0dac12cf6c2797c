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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
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
from learner.core.methods import DEFAULT_METHOD, METHOD_NAMES
from learner.data import Dataset, load_dataset
from learner.metrics import IncrementalEvaluation
from learner.protocols import PRESETS, Protocol, get_protocol, resolve_class_order

from .client import Client, ServerError, encode_images, parse_time, version_metadata

SOURCE = "http"
# The worker's defaults (learner/worker.py) where the server does not say what it runs.
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
    passing: Collection[int] = (),
) -> tuple[list[list[str]], dict[str, Any]]:
    """Top-k label names of every image, all answered by `version`.

    A chunk answered by another version (a worker that has not swapped yet) is sent again;
    a 413 halves the chunk size (the server's BSCE_MAX_BATCH / body limit). `passing`:
    newer versions that may still answer for a moment (the step's interim, withdrawn when
    its full version was rejected); any other newer one means someone else posts.
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
            if answer["version"] > version and answer["version"] not in passing:
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
    default = StepConfig()  # the worker's recipe is the config's defaults (learner.worker)
    memory = (
        protocol.memory
        if args.memory is None
        else {**protocol.memory.model_dump(), "size": args.memory}
    )
    return StepConfig(
        method=args.method or default.method,
        model=ModelConfig(
            backbone=args.backbone or default.model.backbone,
            in_channels=dataset.train.images.shape[1],
        ),
        optim=OptimConfig(epochs=args.epochs or default.optim.epochs),
        memory=MemoryConfig.model_validate(memory),
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


@dataclass(frozen=True)
class ReplayData:
    """The protocol to replay, its class order and the data set, labelled in learning order."""

    protocol: Protocol
    dataset: Dataset
    order: list[int]
    steps: list[list[int]]
    names: list[str]  # class names in learning order
    train_y: torch.Tensor  # learning-order labels; -1 for a class outside the protocol
    test_y: torch.Tensor

    @property
    def step_sizes(self) -> list[int]:
        return [len(s) for s in self.steps]

    @property
    def index_of(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def load_replay_data(args: argparse.Namespace) -> ReplayData:
    protocol = get_protocol(args.protocol)
    dataset = load_dataset(protocol.dataset, root=args.data_root)
    full_order = resolve_class_order(protocol, dataset.train.class_names, args.order)
    protocol, order = truncated_protocol(protocol, full_order, args.steps)
    remap = torch.full((len(dataset.train.class_names),), -1, dtype=torch.int64)
    remap[torch.as_tensor(order)] = torch.arange(len(order))
    return ReplayData(
        protocol=protocol,
        dataset=dataset,
        order=order,
        steps=protocol.step_classes(order),
        names=[dataset.train.class_names[c] for c in order],
        train_y=remap[dataset.train.labels],
        test_y=remap[dataset.test.labels],
    )


@dataclass(frozen=True)
class ServerStart:
    """The server before the first step: its version 0 and what it says about its learner."""

    fresh: bool
    base_version: int
    base_meta: dict[str, Any] | None
    config_source: str
    workers: int | None


def open_server(args: argparse.Namespace) -> tuple[Client, ServerStart]:
    """A client of the ready server, and the server's state; refuses a used server unless
    ``--allow-used-server``."""
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
    return client, ServerStart(
        fresh, base_version, base_meta, config_source, client.server_workers()
    )


def base_config(
    args: argparse.Namespace, data: ReplayData, server: ServerStart, log: Any
) -> tuple[dict[str, Any], str, int | None]:
    """(the learner's config at version 0, where it came from, the worker's seed if known):
    what the server says, checked against the arguments, else the config they assume."""
    meta = server.base_meta
    if meta is not None and isinstance(meta.get("config"), dict):
        seed = _worker_seed(meta, server.base_version)
        problems = check_server_config(meta["config"], seed, args, data.dataset)
        if problems and not args.ignore_config_mismatch:
            raise ReplayError("; ".join(problems))
        for p in problems:
            log(f"warning: {p}")
        return meta["config"], server.config_source, seed
    log(
        "warning: the server does not expose the learner's config; recording the one "
        "assumed from the arguments (pass --bentoml-home to read it from the model store)"
    )
    assumed = assumed_config(args, data.protocol, data.dataset).model_dump(mode="json")
    return assumed, "assumed", None


@dataclass(frozen=True)
class PostedStep:
    """One step's POST /learn, as the server accepted it."""

    job_id: str
    train_images: int
    request_bytes: int
    posted_at: float  # time.time() at the start of the POST
    post_seconds: float


def post_step(
    client: Client,
    data: ReplayData,
    t: int,
    lo: int,
    hi: int,
    args: argparse.Namespace,
    overrides: dict[str, Any],
) -> PostedStep:
    """POST the training images of learning-order classes lo..hi-1 as one /learn job."""
    train = data.dataset.train
    idx = step_indices(data.train_y, lo, hi, args.max_train_per_class)
    images = encode_images(train.images[idx].numpy())
    names = np.asarray(train.class_names, dtype=object)
    labels = [str(n) for n in names[train.labels[idx].numpy()]]
    t_post = time.time()
    try:
        accepted, body_bytes = client.learn(
            images, labels, overrides or None, classes=data.names[lo:hi]
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
    if accepted["classes"] != data.names[lo:hi]:
        raise ReplayError(f"step {t + 1}: server took classes {accepted['classes']}")
    return PostedStep(accepted["job_id"], int(idx.shape[0]), body_bytes, t_post, post_seconds)


def report_from_version_info(
    info: dict[str, Any], metrics: dict[str, Any], lo: int, hi: int
) -> dict[str, Any]:
    """A step report from what ``VersionInfo`` gives, for a server without the learner's."""
    counts = list(info.get("counts") or [])
    epochs = _derived_epochs(metrics, counts)
    return {
        "step_classes": list(range(lo, hi)),
        "seen_classes": len(info.get("class_names") or []),
        "counts": counts,
        "epochs": epochs,
        "images_trained": None if epochs is None else epochs * sum(counts),
        "train_seconds": metrics.get("train_seconds"),
        "train_images_per_second": metrics.get("train_images_per_second"),
        "selection_seconds": None,
    }


def http_report(
    posted: PostedStep,
    status: dict[str, Any],
    version: int,
    metadata_source: str,
    served_at: float,
    test_images: int,
    eval_stats: dict[str, Any],
) -> dict[str, Any]:
    """A step's ``http`` record: what only the HTTP side can say."""
    submitted = parse_time(status.get("submitted"))
    started = parse_time(status.get("started"))
    finished = parse_time(status.get("finished"))
    return {
        "version": version,
        "job_id": posted.job_id,
        "metadata_source": metadata_source,
        "train_images": posted.train_images,
        "request_bytes": posted.request_bytes,
        "post_seconds": posted.post_seconds,
        "queued_seconds": None if started is None or submitted is None else started - submitted,
        "job_seconds": None if finished is None or started is None else finished - started,
        # From the start of POST /learn to the first /predict answered by the new version.
        "learn_latency_seconds": served_at - posted.posted_at,
        "swap_seconds": None if finished is None else served_at - finished,
        "test_images": test_images,
        **eval_stats,
    }


class Replay:
    """The replay's state across steps: `step` learns one protocol step through the server
    and evaluates it, `result` makes the result record."""

    def __init__(self, args: argparse.Namespace, data: ReplayData, log: Any = print) -> None:
        self.args, self.data, self.log = args, data, log
        self.client, self.server = open_server(args)
        self.base_config, self.config_source, self.worker_seed = base_config(
            args, data, self.server, log
        )
        self.overrides = {
            k: v for k, v in {"method": args.method, "epochs": args.epochs}.items() if v
        }
        self.cnn_eval = IncrementalEvaluation()
        self.reports: list[dict[str, Any]] = []
        self.step_configs: list[dict[str, Any] | None] = []
        self.step_rng: list[str | None] = []
        self.step_source = self.config_source
        self.learner_machine: dict[str, Any] | None = None
        self.learner_distributed: dict[str, Any] | None = None
        self.test_cache: dict[int, list[str]] = {}
        self.seen = 0

    def step(self, t: int, classes: Sequence[int]) -> dict[str, Any]:
        lo, hi = self.seen, self.seen + len(classes)
        posted = post_step(self.client, self.data, t, lo, hi, self.args, self.overrides)
        status = self.client.wait_job(posted.job_id, timeout_s=self.args.job_timeout)
        version = int(status["version"])
        self.seen = hi
        # A version the promotion gate rejected is not served: the step is judged by what
        # users get, the version the pointer still names.
        serving = (
            version
            if status["state"] == "done"
            else self.client.get_json("/versions/current")["version"]
        )
        interim = status.get("interim_version")
        passing = () if interim is None else (int(interim),)
        served_at, test_images, eval_stats = self.evaluate(t, lo, int(serving), passing)
        report, source, metrics = self.learner_report(version, lo, hi)
        report["accuracy"] = self.cnn_eval.result().accuracy_per_step[-1]
        report["memory"] = metrics.get("exemplars")
        report["http"] = http_report(
            posted, status, version, source, served_at, test_images, eval_stats
        )
        self.reports.append(report)
        self.log(
            f"step {t + 1}/{len(self.data.steps)}: {len(classes)} classes, "
            f"{posted.train_images} images -> version {version}; learned in "
            f"{report['http']['learn_latency_seconds']:.1f} s; "
            f"accuracy {report['accuracy']:.1f} on {test_images} test images"
        )
        return report

    def evaluate(
        self, t: int, lo: int, version: int, passing: Collection[int] = ()
    ) -> tuple[float, int, dict[str, Any]]:
        """Wait until `version` answers, then predict the test images of every class seen so
        far; (when it first answered, test images, evaluation stats)."""
        test = self.data.dataset.test
        for c in range(lo, self.seen):
            if c not in self.test_cache:
                sel = (self.data.test_y == c).nonzero().squeeze(1)
                self.test_cache[c] = encode_images(test.images[sel].numpy())
        # The offline runner's test samples (all of the seen classes), grouped by class;
        # accuracies do not depend on the order.
        batch_b64 = [b for c in range(self.seen) for b in self.test_cache[c]]
        y_true = np.concatenate([np.full(len(self.test_cache[c]), c) for c in range(self.seen)])
        served_at = wait_served(
            self.client, self.test_cache[lo][0], version, self.args.swap_timeout
        )
        top, eval_stats = predict_all(
            self.client, batch_b64, version, self.args.predict_batch, passing=passing
        )
        y_pred, topk = to_learning_order(top, self.data.index_of, 5)
        self.cnn_eval.add_step(y_true, y_pred, self.data.step_sizes[: t + 1], topk_pred=topk)
        return served_at, len(batch_b64), eval_stats

    def learner_report(
        self, version: int, lo: int, hi: int
    ) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """(the step report, where it came from, the version's metrics); records the
        learner's config, random stream, machine and seed when the server gives them."""
        info = self.client.version_info(version)
        meta, source = version_metadata(self.client, info, self.args.bentoml_home, version)
        metrics = dict(info.get("metrics") or {})
        if meta is None or not isinstance(meta.get("report"), dict):
            self.step_configs.append(None)
            self.step_rng.append(None)
            return report_from_version_info(info, metrics, lo, hi), source, metrics
        self.step_configs.append(meta.get("config"))
        self.step_source = source
        self.learner_machine = meta.get("machine") or self.learner_machine
        self.learner_distributed = meta.get("distributed") or self.learner_distributed
        self.step_rng.append(meta.get("rng"))
        if self.worker_seed is None:
            self.worker_seed = _worker_seed(meta, version)
        # The promotion gate's report beside the step's (None when the gate was off).
        return {**meta["report"], "gate": meta.get("gate")}, source, metrics

    def final_config(self) -> tuple[dict[str, Any], str]:
        """The config of the last step that reported one, else version 0's with the
        overrides applied; and where it came from."""
        config = next((c for c in reversed(self.step_configs) if c), None)
        if config is not None:
            return config, self.step_source
        config = json.loads(json.dumps(self.base_config))
        config["method"] = self.args.method or config.get("method", DEFAULT_METHOD)
        if self.args.epochs:
            config["optim"]["epochs"] = self.args.epochs
        elif self.reports and self.reports[-1].get("epochs"):
            config["optim"]["epochs"] = self.reports[-1]["epochs"]
        return config, self.config_source

    def result(self, start: float) -> dict[str, Any]:
        """The result record (``learner.bench.run_protocol``'s keys and the HTTP ones);
        closes the client. `start`: time.perf_counter() at the start of the replay."""
        # Counted again at the end: a worker still starting at the beginning is missed there.
        workers = max(self.server.workers or 0, self.client.server_workers() or 0) or None
        self.client.close()
        config, config_source = self.final_config()
        return {
            **self.run_fields(config, config_source),
            **self.machine_fields(workers),
            **self.outcome_fields(start),
        }

    def run_fields(self, config: dict[str, Any], config_source: str) -> dict[str, Any]:
        """What was replayed: protocol, config, class order, seed, data."""
        args, data = self.args, self.data
        distinct = {json.dumps(c, sort_keys=True) for c in self.step_configs if c}
        seed = self.worker_seed
        return {
            "format": RESULT_FORMAT,
            "source": SOURCE,
            "url": self.client.url,
            "protocol": data.protocol.name,
            "protocol_config": data.protocol.model_dump(mode="json"),
            "method": config["method"],
            "memory": config["memory"],
            "config": config,
            "config_source": config_source,
            "config_per_step_differs": len(distinct) > 1,
            "class_order": [int(c) for c in data.order],
            "class_names": data.names,
            "seed": seed if seed is not None else (args.seed or WORKER_DEFAULT_SEED),
            "seed_rule": "version 0's weights come from Generator(seed); each step continues "
            "its parent version's random stream (step_rng 'parent'), as learner.bench draws a "
            "whole run from one generator",
            "step_rng": self.step_rng,
            "order_seed": data.protocol.class_order,
            "max_train_per_class": args.max_train_per_class,
            "data_source": data.dataset.source,
        }

    def machine_fields(self, workers: int | None) -> dict[str, Any]:
        """Where it ran: the learner's machine, the client's, the server."""
        client_machine = describe_machine(torch.device("cpu"))
        return {
            "machine": self.learner_machine
            or {**client_machine, "note": "client machine (learner's unknown)"},
            # The learner's processes (learner/distributed.py), as its versions recorded them.
            "distributed": self.learner_distributed,
            "client_machine": client_machine,
            "server": {
                "workers": workers,
                "fresh": self.server.fresh,
                "base_version": self.server.base_version,
                "overrides": self.overrides,
            },
        }

    def outcome_fields(self, start: float) -> dict[str, Any]:
        """What came out: versions, latencies, metrics, step reports, speed."""
        reports = self.reports
        trained = [r.get("images_trained") for r in reports]
        train_s = [r.get("train_seconds") for r in reports]
        return {
            "versions": [r["http"]["version"] for r in reports],
            "learn_latency_seconds": [r["http"]["learn_latency_seconds"] for r in reports],
            **metric_fields(self.cnn_eval.result()),
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


def run_replay(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Replay ``args.protocol`` through the server at ``args.url``; the result record."""
    start = time.perf_counter()
    data = load_replay_data(args)
    replay = Replay(args, data, log)
    log(
        f"replaying {data.protocol.name} ({len(data.steps)} steps) against "
        f"{replay.client.url}: {replay.server.workers or '?'} API workers, config from "
        f"{replay.config_source}"
    )
    for t, classes in enumerate(data.steps):
        replay.step(t, classes)
    return replay.result(start)


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
    p.add_argument(
        "--method",
        choices=METHOD_NAMES,
        default=None,
        help="per-job override (default: none, the worker's own method)",
    )
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
