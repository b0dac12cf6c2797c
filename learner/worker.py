"""The learner worker: turns posted classes into new model versions.

    python -m learner.worker [--epochs 4] [--device auto] [--once]

Loop: claim the oldest job -> load the parent version and its exemplar memory -> one
training step (BSCE by default) -> write version N+1 with its memory, move the serving
pointer, announce it and acknowledge the job, all in one storage transaction. Redis at
``REDIS_URL``, else the embedded one under ``BSCE_DATA_HOME``. It knows nothing of HTTP.

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
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from learner.core.config import DistillConfig, MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.machine import describe_machine, resolve_device
from learner.core.overrides import apply_overrides
from learner.core.versioning import (
    RNG_KEY,
    initial_payload,
    load_version,
    step_generator,
    version_payload,
)
from learner.data import DATASETS, augment_for
from learner.exemplars import ExemplarMemory
from learner.step import StepData, train_step
from storage.errors import JobStateError

log = logging.getLogger("bsce.worker")

_MEMORY_PREFIX = "memory."


class WorkerConfig(BaseModel):
    """The deployment's learning recipe. Jobs may override a few fields (``JobOverrides``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: StepConfig = StepConfig(optim=OptimConfig(epochs=4))
    seed: int = 1993
    # A claimed job whose worker shows no sign of life this long is taken over.
    claim_timeout_s: float = Field(120.0, gt=0)
    poll_ms: int = Field(1000, ge=1)


def _memory_tensors(memory: ExemplarMemory) -> dict[str, torch.Tensor]:
    # The memory travels with its version (as PODNet keeps learner state next to the weights),
    # so a job after a rollback restarts from the memory of the version it builds on.
    return {f"{_MEMORY_PREFIX}{c}": x.contiguous() for c, x in memory.images.items()}


def _memory_from_tensors(tensors: Mapping[str, torch.Tensor]) -> ExemplarMemory:
    return ExemplarMemory(
        {
            int(k[len(_MEMORY_PREFIX) :]): v
            for k, v in tensors.items()
            if k.startswith(_MEMORY_PREFIX)
        }
    )


class Worker:
    def __init__(
        self, storage: Any, config: WorkerConfig, device: torch.device, consumer: str | None = None
    ) -> None:
        self.storage = storage
        self.config = config
        self.device = device
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stop_requested = threading.Event()
        self.abandon = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def ensure_initial_version(self) -> None:
        self.storage.versions.ensure_initial(
            lambda: initial_payload(self.config.step, self.config.seed)
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

    def process(self, job: Any) -> int | None:
        """Run one claimed job to a committed version; the version, or None if it failed."""
        t0 = time.perf_counter()
        queued_s = (
            0.0 if job.submitted is None else max(0.0, time.time() - job.submitted.timestamp())
        )
        heartbeat = _Heartbeat(self.storage, job, self.consumer, self.config.claim_timeout_s / 3)
        heartbeat.start()
        try:
            done = self.storage.versions.version_for_job(job.id)
            if done is not None:
                # Committed by an earlier attempt whose acknowledgement was lost.
                self.storage.jobs.complete(job.id, done)
                return done
            self.storage.jobs.mark_running(job.id)
            step_config = apply_overrides(self.config.step, job.overrides)
            indices = self.storage.labels.get_or_add(job.labels)
            t_load = time.perf_counter()
            parent, model_state, memory, parent_tensors = self._load_parent()
            load_s = time.perf_counter() - t_load

            labels = torch.tensor(indices, dtype=torch.int64)
            data = StepData(torch.from_numpy(np.ascontiguousarray(job.samples)), labels)
            version = self.storage.versions.next_version()
            # The step continues its parent's random stream, so a lineage of versions is the
            # same computation as one offline run with the same seed (learner.bench). A retry
            # of the job starts again from the same parent state: the same version comes out.
            generator = step_generator(parent_tensors, self.config.seed + version)
            rng = "parent" if RNG_KEY in parent_tensors else "seed+version"
            del parent_tensors
            result = train_step(
                model_state.model,
                data,
                memory,
                step_config,
                device=self.device,
                generator=generator,
                on_epoch=lambda e, n, loss: self._on_epoch(job.id, heartbeat, e, n, loss),
            )
            names = self.storage.labels.names()[: result.model.num_classes]
            active = _active_classes(model_state.metadata, result.counts)
            tensors, metadata = version_payload(
                result.model.cpu(),
                class_names=names,
                counts=result.counts.tolist(),
                augment=step_config.augment,
                class_means=result.class_means,
                config=step_config,
                generator=generator,
                extra={
                    "parent_version": parent,
                    "step": int(model_state.metadata.get("step", 0)) + 1,
                    "active_classes": active,
                    "seed": self.config.seed,
                    "rng": rng,
                    "report": result.report.model_dump(),
                    "machine": describe_machine(self.device),
                    "metrics": {
                        "train_seconds": result.report.train_seconds,
                        "train_images_per_second": result.report.train_images_per_second,
                        "exemplars": len(result.memory),
                    },
                },
            )
            tensors.update(_memory_tensors(result.memory))
            t_commit = time.perf_counter()
            memory_np = {c: x.numpy() for c, x in result.memory.images.items()}
            committed = self.storage.commit_step(
                job.id, version, tensors, metadata, memory_np, reason=f"job {job.id}"
            )
            commit_s = time.perf_counter() - t_commit
            total_s = time.perf_counter() - t0
            log.info(
                "job %s -> version %d (%s): queued %.1f s, load %.2f s, train step %.1f s, commit %.2f s, "
                "storage+queue overhead %.1f%% of the step",
                job.id,
                committed.version,
                "served" if committed.served else "pinned, not served",
                queued_s,
                load_s,
                result.report.wall_seconds,
                commit_s,
                100 * (total_s - result.report.wall_seconds) / result.report.wall_seconds,
            )
            return committed.version
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

    def _load_parent(self) -> tuple[int, Any, ExemplarMemory, Mapping[str, torch.Tensor]]:
        """The version the step builds on: the served one, or while a pin holds serving still,
        the newest (learning goes on behind a pin)."""
        versions = self.storage.versions
        parent = versions.latest() if versions.pinned() is not None else versions.current()
        if parent is None:
            parent = versions.latest()
        tensors, metadata = versions.load(parent)
        state = load_version(tensors, {**metadata})
        return parent, state, _memory_from_tensors(tensors), tensors

    def _on_epoch(
        self, job_id: str, heartbeat: _Heartbeat, epoch: int, epochs: int, loss: float
    ) -> None:
        self.storage.jobs.set_progress(
            job_id, epoch / epochs, f"epoch {epoch}/{epochs}, loss {loss:.3f}"
        )
        self._check_abandon(job_id, heartbeat)

    def _check_abandon(self, job_id: str, heartbeat: _Heartbeat) -> None:
        if heartbeat.lost.is_set():
            raise _TakenOver(job_id)
        if self.abandon.is_set():
            raise _Abandoned(job_id)


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

    def __init__(self, storage: Any, job: Any, consumer: str, every_s: float) -> None:
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
    step = StepConfig(
        method=args.method,
        model=ModelConfig(backbone=args.backbone, in_channels=len(augment.mean)),
        augment=augment,
        optim=OptimConfig(epochs=args.epochs),
        distill=DistillConfig(),
        memory=MemoryConfig(mode="none", size=0)
        if args.memory == 0
        else MemoryConfig(mode=args.memory_mode, size=args.memory),
    )
    return WorkerConfig(step=step, seed=args.seed, claim_timeout_s=args.claim_timeout)


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags; each defaults to its environment variable."""
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m learner.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=int(env("BSCE_EPOCHS", "4")))
    p.add_argument("--method", choices=["bsce", "ce"], default=env("BSCE_METHOD", "bsce"))
    p.add_argument(
        "--backbone",
        choices=["resnet32", "resnet18", "resnet8"],
        default=env("BSCE_BACKBONE", "resnet32"),
    )
    p.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=env("BSCE_DATASET", "cifar10"),
        help="input geometry and normalisation of the images to learn (channels, crop, pad, "
        "mean, std); the files are not read",
    )
    p.add_argument("--memory", type=int, default=int(env("BSCE_MEMORY", "2000")))
    p.add_argument(
        "--memory-mode",
        choices=["fixed_total", "fixed_per_class"],
        default=env("BSCE_MEMORY_MODE", "fixed_total"),
    )
    p.add_argument("--seed", type=int, default=int(env("BSCE_SEED", "1993")))
    p.add_argument("--device", default=env("BSCE_DEVICE", "auto"))
    p.add_argument(
        "--threads",
        type=int,
        default=int(env("BSCE_TRAIN_THREADS", "0")),
        help="torch CPU threads (0: torch's default). Float rounding in training depends on "
        "it: match the offline run's to reproduce it bit for bit",
    )
    p.add_argument("--claim-timeout", type=float, default=float(env("BSCE_CLAIM_TIMEOUT_S", "120")))
    p.add_argument(
        "--consumer", default=None, help="consumer name in the job group (default host-pid)"
    )
    p.add_argument("--once", action="store_true", help="process one job, then exit")
    return p


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
    worker.run(once=args.once)


if __name__ == "__main__":
    main()
