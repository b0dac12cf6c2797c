"""The learner worker: turns posted classes into new model versions.

    python -m learner.worker [--epochs 4] [--device auto] [--once]

Loop: claim the oldest job -> load the parent version (weights, random stream) and its
exemplar memory generation from Redis -> one training step (BSCE by default) -> write
version N+1, its memory generation, move the serving pointer, announce it and acknowledge
the job, all in one storage transaction. Redis at ``REDIS_URL``, else the embedded one under
``BSCE_DATA_HOME``. It knows nothing of HTTP.

SIGTERM / SIGINT: a step in progress is finished and committed, then the worker exits; a
second signal abandons the step and releases the job unfinished (nothing half-written: the
commit is one transaction). A worker that dies (SIGKILL) leaves its job to be claimed
again after ``--claim-timeout`` seconds; the retry saves the same version number once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from learner.base import (
    DEFAULT_BASE_MODEL,
    BaseModelError,
    base_version0,
    file_sha256,
    resolve_base_model,
)
from learner.cli import add_recipe_arguments, recipe_from_args
from learner.core.config import ModelConfig, StepConfig
from learner.core.machine import describe_machine, resolve_device
from learner.core.overrides import apply_overrides
from learner.core.versioning import (
    RNG_KEY,
    LoadedVersion,
    initial_payload,
    load_version,
    step_generator,
    version_payload,
)
from learner.data import DATASETS, augment_for
from learner.exemplars import ExemplarMemory
from learner.step import StepData, StepResult, train_step
from storage import Job, JobStateError, Storage
from storage import StepResult as Committed

log = logging.getLogger("bsce.worker")


class WorkerConfig(BaseModel):
    """The deployment's learning recipe. Jobs may override a few fields (``JobOverrides``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: StepConfig = StepConfig()
    # Version 0 of a fresh deployment: this base-model file (python -m learner.base), the
    # committed six-class CIFAR-10 model by default; None starts from an untrained network
    # with no classes (the protocol replays, which train from scratch).
    base_model: Path | None = DEFAULT_BASE_MODEL
    seed: int = 1993
    # A claimed job whose worker shows no sign of life this long is taken over.
    claim_timeout_s: float = Field(120.0, gt=0)
    poll_ms: int = Field(1000, ge=1)


class Worker:
    def __init__(
        self,
        storage: Storage,
        config: WorkerConfig,
        device: torch.device,
        consumer: str | None = None,
    ) -> None:
        self.storage = storage
        self.config = config
        self.device = device
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stop_requested = threading.Event()
        self.abandon = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def ensure_initial_version(self) -> None:
        """Version 0, unless it exists: the configured base model (``--base-model``: its
        classes take label indices 0..k-1, its exemplars become memory generation 0), else
        an untrained network with no classes."""
        base = self.config.base_model
        if base is None:
            self.storage.versions.ensure_initial(
                lambda: initial_payload(self.config.step, self.config.seed)
            )
            return
        versions = self.storage.versions
        versions.ensure_initial(lambda: base_version0(base, self.config.step, self.storage.labels))
        made_from = versions.metadata(0).get("base_model", {}).get("sha256")
        if not base.is_file() or made_from != file_sha256(base):
            log.warning(
                "version 0 already exists and was not made from the base model %s: serving "
                "and learning go on from the existing versions (a fresh deployment uses it)",
                base,
            )

    def run(self, once: bool = False) -> int:
        """Process jobs until stopped (or one job with ``once``); the number processed."""
        self.ensure_initial_version()
        done = 0
        while not self.stop_requested.is_set():
            job = self.storage.jobs.claim(
                self.consumer,
                block_ms=self.config.poll_ms,
                min_idle_ms=int(self.config.claim_timeout_s * 1000),
            )
            if job is None:
                if once and done:
                    break
                continue
            self.process(job)
            done += 1
            if once:
                break
        return done

    # -- one job --------------------------------------------------------------------------

    def process(self, job: Job) -> int | None:
        """Run one claimed job to a committed version; the version, or None if it failed."""
        heartbeat = _Heartbeat(self.storage, job, self.consumer, self.config.claim_timeout_s / 3)
        heartbeat.start()
        try:
            return self._run_job(job, heartbeat)
        except _Abandoned:
            self.storage.jobs.release(job.id)
            log.warning("job %s released unfinished", job.id)
            return None
        except (_TakenOver, JobStateError) as exc:
            # Another worker holds the job now; nothing of ours was committed.
            log.warning("job %s: %s", job.id, exc)
            return None
        except Exception as exc:  # the job's error stays inspectable in its status
            state = self.storage.jobs.fail(job.id, f"{type(exc).__name__}: {exc}")
            log.exception("job %s failed (%s)", job.id, state)
            return None
        finally:
            heartbeat.stop()

    def _run_job(self, job: Job, heartbeat: _Heartbeat) -> int:
        """Load the parent, train, commit: the version the job produced."""
        timings = _Timings(job)
        done = self.storage.versions.version_for_job(job.id)
        if done is not None:
            # Committed by an earlier attempt whose acknowledgement was lost.
            self.storage.jobs.complete(job.id, done)
            return done
        self.storage.jobs.mark_running(job.id)
        step_config = apply_overrides(self.config.step, job.overrides)
        version = self.storage.versions.next_version()
        with timings.measure("load"):
            parent = self._load_parent(version)
        result = self._train(job, parent, step_config, heartbeat)
        tensors, metadata = self._payload(result, parent, step_config)
        with timings.measure("commit"):
            committed = self.storage.commit_step(
                job.id, version, tensors, metadata, _arrays(result.memory), reason=f"job {job.id}"
            )
        timings.log(committed, result.report.wall_seconds)
        return committed.version

    def _load_parent(self, version: int) -> _Parent:
        """What step `version` builds on: the served version or, while a pin holds serving
        still, the newest (learning goes on behind a pin), with its memory generation."""
        versions = self.storage.versions
        parent = versions.latest() if versions.pinned() is not None else versions.current()
        if parent is None:
            parent = versions.latest()
        tensors, metadata = versions.load(parent)
        memory = ExemplarMemory(
            {c: torch.from_numpy(x) for c, x in versions.memory(parent).items()}
        )
        # The step continues its parent's random stream, so a lineage of versions is the
        # same computation as one offline run with the same seed (learner.bench). A retry of
        # the job starts again from the same parent state: the same version comes out.
        generator = step_generator(tensors, self.config.seed + version)
        rng = "parent" if RNG_KEY in tensors else "seed+version"
        return _Parent(parent, load_version(tensors, {**metadata}), memory, generator, rng)

    def _train(
        self, job: Job, parent: _Parent, step_config: StepConfig, heartbeat: _Heartbeat
    ) -> StepResult:
        """One training step on the job's samples (label-map indices fixed when it was
        queued) and the parent's memory."""
        labels = torch.tensor(job.indices, dtype=torch.int64)
        data = StepData(torch.from_numpy(np.ascontiguousarray(job.samples)), labels)
        return train_step(
            parent.state.model,
            data,
            parent.memory,
            step_config,
            device=self.device,
            generator=parent.generator,
            on_epoch=lambda e, n, loss: self._on_epoch(
                job.id, heartbeat, e, n, loss, step_config.optim.min_steps
            ),
        )

    def _payload(
        self, result: StepResult, parent: _Parent, step_config: StepConfig
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The new version's tensors (weights, class means, random stream) and metadata."""
        names = self.storage.labels.names()[: result.model.num_classes]
        return version_payload(
            result.model.cpu(),
            class_names=names,
            counts=result.counts.tolist(),
            augment=step_config.augment,
            class_means=result.class_means,
            config=step_config,
            generator=parent.generator,
            extra={
                "parent_version": parent.version,
                "step": int(parent.state.metadata.get("step", 0)) + 1,
                "active_classes": _active_classes(parent.state.metadata, result.counts),
                "seed": self.config.seed,
                "rng": parent.rng,
                "report": result.report.model_dump(),
                "machine": describe_machine(self.device),
                "metrics": {
                    "train_seconds": result.report.train_seconds,
                    "train_images_per_second": result.report.train_images_per_second,
                    "exemplars": len(result.memory),
                },
            },
        )

    def _on_epoch(
        self,
        job_id: str,
        heartbeat: _Heartbeat,
        epoch: int,
        epochs: int,
        loss: float,
        min_steps: int,
    ) -> None:
        # The resolved budget shows as the epoch count; the version's report keeps the rest
        # (epochs, min_steps, batches_per_epoch, optimizer_steps).
        note = f"epoch {epoch}/{epochs} (at least {min_steps} optimizer steps), loss {loss:.3f}"
        self.storage.jobs.set_progress(job_id, epoch / epochs, note)
        self._check_abandon(job_id, heartbeat)

    def _check_abandon(self, job_id: str, heartbeat: _Heartbeat) -> None:
        if heartbeat.lost.is_set():
            raise _TakenOver(job_id)
        if self.abandon.is_set():
            raise _Abandoned(job_id)


@dataclass(frozen=True)
class _Parent:
    """The version a step builds on."""

    version: int
    state: LoadedVersion
    memory: ExemplarMemory  # its memory generation, read from Redis
    generator: torch.Generator  # its random stream, which the step continues
    rng: str  # where the stream came from: "parent", or "seed+version" (older versions)


def _arrays(memory: ExemplarMemory) -> dict[int, np.ndarray]:
    return {c: x.numpy() for c, x in memory.images.items()}


class _Timings:
    """Where a job's time went, for the log line."""

    def __init__(self, job: Job) -> None:
        self.start = time.perf_counter()
        submitted = job.submitted
        self.queued_s = 0.0 if submitted is None else max(0.0, time.time() - submitted.timestamp())
        self.job_id = job.id
        self.seconds: dict[str, float] = {}

    @contextmanager
    def measure(self, what: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] = time.perf_counter() - t

    def log(self, committed: Committed, train_s: float) -> None:
        total_s = time.perf_counter() - self.start
        log.info(
            "job %s -> version %d (%s): queued %.1f s, load %.2f s, train step %.1f s, "
            "commit %.2f s, storage+queue overhead %.1f%% of the step",
            self.job_id,
            committed.version,
            "served" if committed.served else "pinned, not served",
            self.queued_s,
            self.seconds.get("load", 0.0),
            train_s,
            self.seconds.get("commit", 0.0),
            100 * (total_s - train_s) / train_s,
        )


def _active_classes(parent_metadata: Mapping[str, Any], counts: torch.Tensor) -> list[bool]:
    """Head rows that stand for a class of this lineage: trained now or active in the parent.

    After a rollback the label map may hold classes this lineage never learned; their rows
    exist (the head follows label-map order) but must never be predicted.
    """
    before = list(parent_metadata.get("active_classes", []))
    return [bool(c > 0) or (i < len(before) and before[i]) for i, c in enumerate(counts.tolist())]


class _Abandoned(Exception):
    pass


class _TakenOver(Exception):
    pass


class _Heartbeat:
    """Keeps a long step's job from looking dead to standby workers."""

    def __init__(self, storage: Storage, job: Job, consumer: str, every_s: float) -> None:
        self.storage, self.job, self.consumer, self.every_s = storage, job, consumer, every_s
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="job-heartbeat")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.storage.jobs.heartbeat(self.job, self.consumer)
            except JobStateError:
                # Taken over: our commit would be refused anyway; stop spending the CPU.
                self.lost.set()
                return
            except Exception:  # a missed beat only risks a takeover, which is safe
                log.debug("heartbeat failed", exc_info=True)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    # The data set fixes the input geometry and normalisation (as learner.bench takes them
    # from the loaded data), not its files: images arrive through the API.
    augment = augment_for(args.dataset)
    base = StepConfig(model=ModelConfig(in_channels=len(augment.mean)), augment=augment)
    defaults = WorkerConfig()
    return WorkerConfig(
        step=recipe_from_args(args, base),
        seed=defaults.seed if args.seed is None else args.seed,
        claim_timeout_s=defaults.claim_timeout_s
        if args.claim_timeout is None
        else args.claim_timeout,
        base_model=defaults.base_model
        if args.base_model is None
        else resolve_base_model(args.base_model),
    )


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags; each defaults to its environment variable, else to the config's
    default (`WorkerConfig`, `StepConfig`)."""
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m learner.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_recipe_arguments(p, from_env=True)
    p.add_argument(
        "--base-model",
        default=env("BSCE_BASE_MODEL"),
        help="version 0 of a fresh deployment: a base-model file (python -m learner.base), "
        "'default' for models/base-cifar10-animals.safetensors (the default), 'none' for an "
        "untrained network (protocol replays)",
    )
    p.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=env("BSCE_DATASET", "cifar10"),
        help="input geometry and normalisation of the images to learn (channels, crop, pad, "
        "mean, std); the files are not read",
    )
    p.add_argument("--seed", type=int, default=_env_number("BSCE_SEED", int))
    p.add_argument("--device", default=env("BSCE_DEVICE", "auto"))
    p.add_argument(
        "--threads",
        type=int,
        default=int(env("BSCE_TRAIN_THREADS", "0")),
        help="torch CPU threads (0: torch's default). Float rounding in training depends on "
        "it: match the offline run's to reproduce it bit for bit",
    )
    p.add_argument(
        "--claim-timeout", type=float, default=_env_number("BSCE_CLAIM_TIMEOUT_S", float)
    )
    p.add_argument(
        "--consumer", default=None, help="consumer name in the job group (default host-pid)"
    )
    p.add_argument("--once", action="store_true", help="process one job, then exit")
    return p


def _env_number(name: str, kind: type) -> int | float | None:
    raw = os.environ.get(name)
    return None if raw is None else kind(raw)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads < 0:
        raise SystemExit("--threads must be 0 (torch's default) or more")
    if args.threads:
        torch.set_num_threads(args.threads)

    from storage import open_storage

    try:
        config = config_from_args(args)
    except ValidationError as e:
        raise SystemExit(f"bad worker configuration: {e}") from None
    worker = Worker(open_storage(), config, resolve_device(args.device), consumer=args.consumer)

    def on_signal(signum: int, _frame: Any) -> None:
        if worker.stop_requested.is_set():
            worker.abandon.set()
        worker.stop_requested.set()
        log.info(
            "signal %d: %s",
            signum,
            "abandoning the step"
            if worker.abandon.is_set()
            else "finishing the step, then exiting",
        )

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("worker %s on %s, %s", worker.consumer, worker.device, config.step.model_dump_json())
    try:
        worker.run(once=args.once)
    except BaseModelError as e:
        raise SystemExit(f"cannot start from the base model: {e}") from None


if __name__ == "__main__":
    main()
