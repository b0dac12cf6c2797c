"""The model a worker serves, and how it follows the version pointer (DESIGN.md §3).

Each API worker process holds its own `ServedVersion`. A new version is loaded completely
(weights read and checked, network built, moved to the device, one warm-up forward) while
the old one keeps serving; then `ModelHolder` switches one attribute. A request reads that
attribute once and uses the object it got to the end, so requests in flight finish on the
version they started with.

A version that fails to load is retried on every poll. Meanwhile the worker serves the best
fallback that loads (the pointer version's ancestors first, `VersionStore.fallbacks`) and
reports itself degraded (/health, ``bsce_degraded``): a worker that starts while the pointer
names a broken version serves its parent rather than nothing.

`VersionWatcher` is the worker's background thread: it blocks on the storage announcements
(pub/sub) for at most ``poll_interval_s``, then compares the pointer (one Redis GET) with
what is loaded. The announcement wakes it at once; the GET catches anything pub/sub lost.

Memory. During a swap two versions are resident on the device: the served one and the one
being loaded beside it (and the old one stays until the last request holding it finishes).
The holder counts the parameter and buffer bytes of both (`ModelHolder.memory`, in /health
and as ``bsce_model_bytes{slot}``), the sum at the last swap, and on CUDA what torch's
allocator holds: a GPU must have room for two versions plus the activations of a batch.

Precision. On CUDA the forward pass runs under bf16 autocast where ``BSCE_PRECISION``
resolves to bf16 (``auto``: where the GPU supports it); on CPU inference is always fp32.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from learner.core.evaluate import infer
from learner.core.machine import autocast, precision_name, resolve_precision
from learner.core.versioning import LoadedVersion, load_version
from storage import StorageError, Subscription, VersionStore, next_announcement

from .metrics import Metrics

log = logging.getLogger("bsce.server")

Score = tuple[int, str, float]  # (class index, name, probability)


@dataclass(frozen=True, eq=False)
class ServedVersion:
    """A loaded, ready-to-run version. Immutable: swapping replaces the whole object."""

    version: int
    loaded: LoadedVersion
    device: torch.device
    # Head rows that may be predicted (the worker's ``active_classes``: after a rollback the
    # head can hold rows of classes this lineage never learned).
    active: tuple[bool, ...]
    loaded_at: float = field(default_factory=time.time)
    # The autocast dtype of the forward pass (None: fp32), and the bytes of the network's
    # parameters and buffers on the device.
    amp: torch.dtype | None = None
    model_bytes: int = 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.loaded.class_names

    @property
    def chw(self) -> tuple[int, int, int]:
        return self.loaded.image_shape

    @property
    def num_active(self) -> int:
        return sum(self.active)

    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """Softmax over the active classes of raw logits (no prior at prediction), on CPU;
        inactive rows get probability 0."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        with autocast(self.device, self.amp):
            logits, _ = infer(self.loaded.model, x, self.loaded.augment, device=self.device)
        if logits.shape[1] == 0:
            return logits
        if not all(self.active):
            mask = torch.tensor(self.active, dtype=torch.bool)
            logits = logits.masked_fill(~mask, -math.inf)
            if not any(self.active):
                return torch.zeros_like(logits)
        return torch.softmax(logits, dim=1)

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[Score]]:
        k = min(k, self.num_active)
        if k == 0:
            return [[] for _ in range(probs.shape[0])]
        values, indices = probs.topk(k, dim=1)
        names = self.class_names
        return [
            [(int(i), names[int(i)], float(p)) for p, i in zip(pv, iv, strict=True)]
            for pv, iv in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def classify(self, images: np.ndarray, k: int) -> list[list[Score]]:
        return self.top_k(self.probabilities(images), k)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a network's parameters and buffers (what a version occupies on its device,
    activations aside)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The server's autocast dtype: the precision setting on CUDA, fp32 (None) on CPU."""
    return resolve_precision(precision, device) if device.type == "cuda" else None


def load_served(
    versions: VersionStore,
    version: int,
    device: torch.device,
    precision: str = "auto",
    on_resident: Callable[[int, int], None] | None = None,
) -> ServedVersion:
    """Everything a version needs before it can serve, done before anyone sees it.

    ``on_resident(version, bytes)`` is called once the weights are on the device, before the
    warm-up forward (the holder counts them as the version being loaded)."""
    tensors, metadata = versions.load(version)
    loaded = load_version(tensors, metadata)
    model = loaded.model.to(device)
    if model.config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    nbytes = model_bytes(model)
    if on_resident is not None:
        on_resident(version, nbytes)
    n = model.num_classes
    flags = metadata.get("active_classes")
    if isinstance(flags, list) and len(flags) == n:
        active = tuple(bool(a) for a in flags)
    else:
        active = (True,) * n
    if len(loaded.class_names) != n:
        raise StorageError(
            f"version {version} names {len(loaded.class_names)} classes for a head of {n} rows"
        )
    served = ServedVersion(
        version=version,
        loaded=loaded,
        device=device,
        active=active,
        amp=inference_dtype(precision, device),
        model_bytes=nbytes,
    )
    # The first forward allocates and picks kernels; pay for it here, not in a request.
    served.probabilities(np.zeros((1, *served.chw), dtype=np.uint8))
    return served


@dataclass(frozen=True)
class Degraded:
    """A worker serving `served` (None: nothing) because `wanted`, the version the pointer
    names, does not load; `error` says why."""

    wanted: int
    served: int | None
    error: str

    def describe(self) -> str:
        serving = "nothing" if self.served is None else f"version {self.served}"
        return f"serving {serving} instead of version {self.wanted}, retrying it: {self.error}"


class ModelHolder:
    """One worker's served version; swapped by replacing a single reference."""

    def __init__(
        self, loader: Callable[[int], ServedVersion], metrics: Metrics | None = None
    ) -> None:
        self._loader = loader
        self._metrics = metrics
        self._current: ServedVersion | None = None
        # Serialises swaps only; readers never take it.
        self._swap_lock = threading.Lock()
        self.last_error: str | None = None
        self.degraded: Degraded | None = None
        # Versions whose failure was logged and counted: a retry on every poll stays quiet.
        self._reported: set[int] = set()
        # The version being loaded beside the served one, and its bytes once on the device.
        self._loading: tuple[int, int] | None = None
        self.swap_peak_bytes = 0  # served + loaded at the last swap: both resident at once

    @property
    def current(self) -> ServedVersion | None:
        """The version to use for one request: read it once and keep the object."""
        return self._current

    def swap_to(self, version: int) -> bool:
        """Load `version` and serve it; False (old version still served) if loading fails.
        Success ends a degraded state."""
        if not self._switch(version):
            return False
        self.last_error = None
        self._set_degraded(None)
        return True

    def serve_fallback(self, wanted: int, version: int | None, error: str) -> bool:
        """Serve `version` (None: keep what is served) while `wanted`, the pointer's version,
        does not load (`error`); False if `version` does not load either."""
        if version is not None and not self._switch(version):
            return False
        cur = self._current
        self._set_degraded(Degraded(wanted, None if cur is None else cur.version, error))
        return True

    def _switch(self, version: int) -> bool:
        with self._swap_lock:
            cur = self._current
            if cur is not None and cur.version == version:
                return True
            start = time.perf_counter()
            self._loading = (version, 0)
            try:
                new = self._loader(version)
            except Exception as e:
                self._set_loading(None)
                self._load_failed(version, e, cur)
                return False
            new_bytes = int(getattr(new, "model_bytes", 0))
            self._set_loading((version, new_bytes))
            self.swap_peak_bytes = new_bytes + _bytes_of(cur)
            self._current = new
            self._set_loading(None)
            self._reported.discard(version)
            seconds = time.perf_counter() - start
            log.info(
                "now serving version %d (was %s; loaded in %.3f s)",
                version,
                None if cur is None else cur.version,
                seconds,
            )
            if self._metrics is not None:
                self._metrics.swapped(version, seconds)
            return True

    def loading_resident(self, version: int, nbytes: int) -> None:
        """A loader's report: ``version``'s weights (``nbytes``) are now on the device."""
        if self._loading is not None and self._loading[0] == version:
            self._set_loading((version, nbytes))

    def _set_loading(self, loading: tuple[int, int] | None) -> None:
        self._loading = loading
        if self._metrics is not None:
            self._metrics.model_bytes.labels("loading").set(0 if loading is None else loading[1])
            self._metrics.model_bytes.labels("served").set(_bytes_of(self._current))

    def memory(self) -> dict[str, int | str | None]:
        """Bytes of the served version, of a version being loaded beside it, their sum at the
        last swap, and on CUDA what torch's allocator holds (also set on the metrics)."""
        cur, loading = self._current, self._loading
        device = getattr(cur, "device", None)
        served_bytes, loading_bytes = _bytes_of(cur), 0 if loading is None else loading[1]
        out: dict[str, int | str | None] = {
            "device": None if device is None else str(device),
            "precision": None if cur is None else precision_name(getattr(cur, "amp", None)),
            "served_version": None if cur is None else cur.version,
            "served_bytes": served_bytes,
            "loading_version": None if loading is None else loading[0],
            "loading_bytes": loading_bytes,
            "swap_peak_bytes": self.swap_peak_bytes,
            "cuda_allocated_bytes": None,
            "cuda_reserved_bytes": None,
            "cuda_max_allocated_bytes": None,
        }
        allocated = None
        if isinstance(device, torch.device) and device.type == "cuda":
            allocated = torch.cuda.memory_allocated(device)
            out["cuda_allocated_bytes"] = allocated
            out["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        if self._metrics is not None:
            self._metrics.model_bytes.labels("served").set(served_bytes)
            self._metrics.model_bytes.labels("loading").set(loading_bytes)
            if allocated is not None:
                self._metrics.cuda_allocated_bytes.set(allocated)
        return out

    def _load_failed(self, version: int, e: Exception, cur: ServedVersion | None) -> None:
        self.last_error = f"version {version} failed to load: {type(e).__name__}: {e}"
        if version in self._reported:
            log.debug("version %s still fails to load: %s", version, e)
            return
        self._reported.add(version)
        log.exception(
            "version %s failed to load; still serving %s",
            version,
            None if cur is None else cur.version,
        )
        if self._metrics is not None:
            self._metrics.swap_failures.inc()

    def _set_degraded(self, state: Degraded | None) -> None:
        if state is not None and state != self.degraded:
            log.warning("degraded: %s", state.describe())
        elif state is None and self.degraded is not None:
            log.info("no longer degraded: version %d loaded", self.degraded.wanted)
        self.degraded = state
        if self._metrics is not None:
            self._metrics.degraded.set(0 if state is None else 1)


class VersionWatcher:
    """Background thread keeping a `ModelHolder` on the version the pointer names.

    A version that does not load is retried on every poll; meanwhile the holder serves the
    best fallback that loads (`VersionStore.fallbacks`: the version's own lineage first) and
    reports itself degraded. Without this, a worker started while the pointer names a
    broken version would serve nothing.
    """

    def __init__(
        self, versions: VersionStore, holder: ModelHolder, poll_interval_s: float = 0.5
    ) -> None:
        self.versions = versions
        self.holder = holder
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bsce-version-watcher", daemon=True)
        self.store_ok_at: float | None = None  # monotonic time of the last good Redis reply
        self.store_error: str | None = None
        self.target: int | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def store_reachable(self) -> bool:
        ok = self.store_ok_at
        return ok is not None and time.monotonic() - ok < max(3.0, 4 * self.poll_interval_s)

    def sync_once(self) -> None:
        """Read the pointer and load what it names, if needed (also used by tests)."""
        target = self.versions.current()
        self.store_ok_at = time.monotonic()
        self.store_error = None
        self.target = target
        if target is None:
            return
        cur = self.holder.current
        if cur is not None and cur.version == target and self.holder.degraded is None:
            return
        # (Serving the fallback the pointer now names, e.g. after a rollback, ends the
        # degraded state without a reload.)
        if self.holder.swap_to(target):
            return
        degraded = self.holder.degraded
        if degraded is None or degraded.wanted != target:
            self._fall_back(target, self.holder.last_error or f"version {target} did not load")

    def _fall_back(self, target: int, error: str) -> None:
        # Searched once per pointer value; the pointer's own version is retried every poll.
        for version in self.versions.fallbacks(target):
            if self.holder.serve_fallback(target, version, error):
                return
        self.holder.serve_fallback(target, None, error)

    def _run(self) -> None:
        pubsub = None
        errors = 0
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.versions.subscribe()
                self.sync_once()
                errors = 0
                # Returns early on an announcement; the loop then reads the pointer itself,
                # which is authoritative (announcements are hints and may arrive out of order).
                next_announcement(pubsub, self.poll_interval_s)
            except (StorageError, OSError) as e:  # a Redis failure is a StorageError too
                errors += 1
                self.store_error = f"{type(e).__name__}: {e}"
                if errors == 1 or errors % 20 == 0:
                    log.warning("version watcher: store unreachable (%s); retrying", e)
                if pubsub is not None:
                    _close_quietly(pubsub)
                    pubsub = None
                self._stop.wait(min(self.poll_interval_s * errors, 5.0))
            except Exception:
                # A bug here must not end the thread: the worker would serve one version forever.
                log.exception("version watcher: unexpected error")
                self._stop.wait(1.0)
        if pubsub is not None:
            _close_quietly(pubsub)


def _bytes_of(served: ServedVersion | None) -> int:
    # Stand-ins for a ServedVersion (tests) have no byte count: 0.
    return 0 if served is None else int(getattr(served, "model_bytes", 0))


def _close_quietly(pubsub: Subscription) -> None:
    try:
        pubsub.close()
    except Exception:  # closing a broken connection may raise; nothing to do about it
        log.debug("closing pub/sub failed", exc_info=True)
