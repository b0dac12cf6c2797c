"""Prometheus metrics on BentoML's /metrics.

Two kinds:

- Per-worker events (predictions, batch sizes, swaps, the version served) are
  prometheus_client metrics. Under ``bentoml serve`` every worker has
  ``PROMETHEUS_MULTIPROC_DIR`` set before it starts, so their values go to the shared
  multiprocess files that BentoML's /metrics aggregates over all workers (counters and
  histograms summed; the served-version gauge kept per live worker, with a ``pid`` label).
  They are registered in a private registry (never the global one), so building a second
  service in one process (tests) does not collide.
- Store-wide state (jobs by state, exemplar memory, the pointer, the latest training step)
  is read from Redis when /metrics is scraped (`StoreCollector`, appended by the service's
  ``__metrics__`` hook), so it is exact whichever worker answers the scrape.

Request latency per endpoint is BentoML's own ``bentoml_service_request_duration_seconds``
(labels ``endpoint`` and ``http_response_code``), which covers every route, mounted ones
included.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from storage import Storage, VersionInfo

log = logging.getLogger("bsce.server")

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# prometheus_client's per-process files of the "live" gauge modes: gauge_liveall_<pid>.db ...
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


class Metrics:
    """One worker's metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.predictions = Counter("bsce_predictions", "Images classified", ["path"], registry=r)
        self.batch_size = Histogram(
            "bsce_inference_batch_size",
            "Images per model forward pass (single-image requests merged by adaptive "
            "batching, or one multi-image request)",
            ["path"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "bsce_inference_seconds",
            "Duration of one model forward pass with softmax and top-k",
            ["path"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "bsce_decode_seconds",
            "Decoding and validating the images of one request",
            ["endpoint"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "bsce_rejected_requests",
            "Requests refused by the server's own validation",
            ["endpoint", "status"],
            registry=r,
        )
        self.served_version = Gauge(
            "bsce_served_version",
            "Model version this worker serves (-1 before the first load)",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.degraded = Gauge(
            "bsce_degraded",
            "1 while this worker serves a fallback because the pointer's version does not "
            "load (see /health), else 0",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.swaps = Counter("bsce_swaps", "Version swaps completed", registry=r)
        self.swap_failures = Counter(
            "bsce_swap_failures",
            "Versions that failed to load (the previous version kept serving)",
            registry=r,
        )
        self.swap_seconds = Histogram(
            "bsce_swap_duration_seconds",
            "Loading a version completely before switching to it",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.model_bytes = Gauge(
            "bsce_model_bytes",
            "Parameter and buffer bytes on this worker's device of the served version "
            '(slot="served") and of a version being loaded beside it (slot="loading", 0 '
            "when none): during a swap both are resident",
            ["slot"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.cuda_allocated_bytes = Gauge(
            "bsce_cuda_memory_allocated_bytes",
            "torch.cuda.memory_allocated of this worker's device, set at scrape (0 on CPU)",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.jobs_submitted = Counter(
            "bsce_jobs_submitted", "Learning jobs queued through this API", registry=r
        )
        self.served_version.set(-1)
        self.degraded.set(0)
        for slot in ("served", "loading"):
            self.model_bytes.labels(slot).set(0)

    def swapped(self, version: int, seconds: float) -> None:
        self.swaps.inc()
        self.swap_seconds.observe(seconds)
        self.served_version.set(version)

    def text(self) -> str:
        """This registry in the text format (single-process use: tests, debugging)."""
        return generate_latest(self.registry).decode()


def forget_dead_workers(directory: str | None = None) -> list[int]:
    """Drop the live-gauge files of processes that no longer exist; their pids.

    prometheus_client reports a ``liveall`` gauge per pid until ``mark_process_dead`` is
    called for it, which a SIGKILLed worker never does: its last served version would stay
    on /metrics for ever. Called before each scrape is aggregated.
    """
    path = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path or not os.path.isdir(path):
        return []
    pids = {int(m[1]) for f in os.listdir(path) if (m := _LIVE_GAUGE_FILE.fullmatch(f))}
    dead = sorted(pid for pid in pids if not _alive(pid))
    for pid in dead:
        mark_process_dead(pid, path)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    # A killed worker not reaped yet still answers kill(pid, 0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class StoreCollector(Collector):
    """Store-wide gauges, read from Redis at scrape time."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.storage
        up = GaugeMetricFamily("bsce_store_up", "1 when the store answered this scrape")
        try:
            jobs = s.jobs.counts_by_state()
            pointer = s.versions.pointer()
            # The memory of the current version (its generation).
            memory = None if pointer.current is None else s.versions.memory_info(pointer.current)
            num_labels = len(s.labels)
            versions = s.versions.list()
            trained = [
                v for v in versions if isinstance(v.metrics.get("train_seconds"), int | float)
            ]
        except Exception as e:  # a scrape must still answer when Redis does not
            log.warning("metrics: store unreachable: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        g = GaugeMetricFamily("bsce_jobs", "Learning jobs by state", labels=["state"])
        for state, n in sorted(jobs.items()):
            g.add_metric([state], n)
        yield g
        yield GaugeMetricFamily(
            "bsce_exemplar_memory_bytes",
            "Bytes of exemplar images in the current version's replay memory",
            value=0 if memory is None else memory.total_bytes,
        )
        yield GaugeMetricFamily(
            "bsce_exemplars",
            "Exemplar images in the current version's replay memory",
            value=0 if memory is None else sum(memory.counts.values()),
        )
        yield GaugeMetricFamily(
            "bsce_current_version",
            "Version the pointer names (-1: none)",
            value=-1 if pointer.current is None else pointer.current,
        )
        yield GaugeMetricFamily(
            "bsce_pinned_version",
            "Pinned version (-1: not pinned)",
            value=-1 if pointer.pinned is None else pointer.pinned,
        )
        yield GaugeMetricFamily(
            "bsce_label_map_classes", "Class names in the label map", value=num_labels
        )
        yield from _gate_metrics(versions, pointer.current)
        if trained:
            newest = trained[-1]
            step = GaugeMetricFamily(
                "bsce_train_step_seconds",
                "Training time of the newest trained version's step, as its learner recorded it",
                labels=["version"],
            )
            step.add_metric([str(newest.version)], float(newest.metrics["train_seconds"]))
            yield step


def _gate_metrics(versions: list[VersionInfo], current: int | None) -> Iterator[GaugeMetricFamily]:
    """The promotion gate: verdicts over the saved versions, and what it measured on the
    served version's held-out images (recorded in the version's metrics by the learner)."""
    verdicts = GaugeMetricFamily(
        "bsce_gate_versions", "Saved versions by promotion-gate verdict", labels=["verdict"]
    )
    counts: dict[str, int] = {}
    for v in versions:
        counts[v.gate or "none"] = counts.get(v.gate or "none", 0) + 1
    for verdict, n in sorted(counts.items()):
        verdicts.add_metric([verdict], n)
    yield verdicts
    served = next((v for v in versions if v.version == current), None)
    if served is None:
        return
    acc = GaugeMetricFamily(
        "bsce_heldout_accuracy",
        "Held-out accuracy (percent) of the served version, as its gate measured it",
        labels=["classes"],
    )
    for kind in ("overall", "old", "new"):
        value = served.metrics.get(f"heldout_{kind}_accuracy")
        if isinstance(value, int | float):
            acc.add_metric([kind], float(value))
    yield acc
    balance = served.metrics.get("heldout_balance")
    if isinstance(balance, int | float):
        yield GaugeMetricFamily(
            "bsce_heldout_balance",
            "New / old classes' held-out accuracy of the served version at its gate",
            value=float(balance),
        )


def store_metrics_text(storage: Storage) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(storage))
    return generate_latest(registry).decode()
