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

Store outages. No store error ends the worker: while Redis is unreachable it retries with
capped exponential backoff (logged), idle or mid-job. A step that is training goes on (its
progress updates are skipped) and its commit is retried until the store answers; a commit
whose reply was lost is recognised by its job, so the version is committed exactly once. A
job interrupted before it had a result is released (no attempt spent) once the store is
back, and claimed again.

Failures. A failed attempt is retried after a delay that doubles from ``retry_base_s``
(``BSCE_RETRY_BASE_S``); after 3 attempts the job is failed. A job no retry can fix fails at
once: a parent version that cannot be loaded (weights, metadata or exemplar memory), or a
job over the operator's limits (``BSCE_MAX_JOB_STEPS`` optimizer steps, checked before
training; ``BSCE_MAX_JOB_SECONDS`` of wall time, checked after each epoch).

Latency. A job's training loop is bounded to ``train_seconds`` (``BSCE_TRAIN_SECONDS``, 50 s;
0: no bound): where the epochs that the step minimum added would run past it, the last of them
are dropped (learner.step.TimeBudget; never below ``--epochs`` nor below ``train_min_share``
of the planned steps, ``BSCE_TRAIN_MIN_SHARE``, a half), so a small post is served within a
minute on the slower CPUs too; the version's report records the steps planned and trained. A
version the bound cut short that the gate rejects is trained again without the bound (its
metadata says so, ``rejected_when_cut``): the bound trades latency, never a post's class.

The promotion gate (``--no-gate`` turns it off). A tenth of each posted class's images (at
most 50) is held out of training and kept with the version; after training, the new version
and its parent are evaluated on the held-out images of every class they know, and a version
that fails the checks (learner/core/gate.py) is saved as ``rejected``: the pointer stays and
the job ends ``rejected`` with the gate's report. The classes of a base model have no held-out
images (it trained on all of its data; its exemplars are training images, on which it scores
far above what any later version can), so the gate judges posted classes only.

The fast path (``--fast-path off`` turns it off). Before the full step, an interim version
within seconds (learner/fast_path.py): the parent's network frozen, its head grown and the
job's rows fit with BSCE on the features of the job's images and of the parent's exemplars
(cached per version). It is judged by the gate like any version and committed with the
parent's memory as its own generation; served when it passes and the pointer still names the
parent. The full step then runs from the parent exactly as without the fast path (same
random stream, same version contents) and replaces the interim. A retried job finds its
interim (``P:versions:interim_by_job``) and makes none again. A rejected full version, or a
job that fails for good, puts the pointer back from its interim on the parent.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

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
from learner.core.gate import GateConfig, GateReport
from learner.core.machine import describe_machine, resolve_device
from learner.core.model import IncrementalNet
from learner.core.overrides import apply_overrides, train_seconds_for
from learner.core.versioning import (
    RNG_KEY,
    LoadedVersion,
    initial_payload,
    load_version,
    step_generator,
    version_payload,
)
from learner.data import DATASETS, augment_for
from learner.distributed import (
    SINGLE,
    Dist,
    DistConfig,
    RankLostError,
    StepAborted,
    is_collective_error,
)
from learner.exemplars import ExemplarMemory
from learner.fast_path import (
    ExemplarFeatures,
    Features,
    InterimFit,
    InterimFitConfig,
    fit_interim,
    interim_generator,
    memory_features,
)
from learner.gate import judge, split_job
from learner.step import StepData, StepResult, TimeBudget, resolve_budget, train_step
from storage import (
    Job,
    JobStateError,
    Storage,
    StorageError,
    StoreResponseError,
    StoreUnavailableError,
    VersionExistsError,
    VersionLockedError,
)
from storage import StepResult as Committed

log = logging.getLogger("bsce.worker")
T = TypeVar("T")


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
    # The operator's limits on one job: a resolved budget over max_job_steps optimizer
    # steps fails before training, a step running longer than max_job_seconds is stopped.
    # Neither is retried (the same job would hit the same limit).
    max_job_steps: int = Field(20_000, ge=1)
    max_job_seconds: float = Field(3600.0, gt=0)
    # Ours: the latency target of a post. The training loop of a job ends its epochs early
    # where going on would take it past this many seconds (learner.step.TimeBudget): on the
    # project's slower CPUs a small post's 150-step minimum alone took 87-109 s. 0: no bound
    # (the budget alone decides, as in a benchmark). A job may set its own (JobOverrides).
    train_seconds: float = Field(50.0, ge=0)
    # The share of a job's planned optimizer steps that the time bound never cuts: on a busy
    # machine a one-class post cut to 48 of 156 steps was not learned, one of 66-72 was
    # (learner.step.TimeBudget). A bounded version the gate rejects is trained again without
    # the bound (`Worker._train_judged`), so the share sets how often that costs twice.
    train_min_share: float = Field(0.5, ge=0, le=1)
    # A failed attempt's job waits retry_base_s * 2**(attempt - 1), at most retry_max_s,
    # before any worker may claim it again, so a transient fault is not met 3 times at once.
    retry_base_s: float = Field(5.0, ge=0)
    retry_max_s: float = Field(300.0, ge=0)
    # While the store is unreachable the worker retries after store_retry_base_s,
    # doubling up to store_retry_max_s.
    store_retry_base_s: float = Field(0.5, gt=0)
    store_retry_max_s: float = Field(30.0, gt=0)
    # The promotion gate (learner/gate.py): held-out images per class, and the checks a new
    # version passes before it is served.
    gate: GateConfig = GateConfig()
    # The fast path (learner/fast_path.py): an interim version within seconds of each job,
    # then the full step; and the interim's head fit.
    fast_path: bool = True
    interim_fit: InterimFitConfig = InterimFitConfig()


def retry_delay(config: WorkerConfig, attempt: int) -> float:
    """Seconds a job waits for its next attempt after failed attempt `attempt` (1, 2, ...)."""
    return min(config.retry_max_s, config.retry_base_s * 2 ** min(max(attempt, 1) - 1, 30))


class PermanentJobError(Exception):
    """A job that no retry can fix: it fails at once, with this message in its status."""


class ParentUnloadableError(PermanentJobError):
    """The version a step would build on cannot be loaded (weights, metadata or memory)."""


class JobLimitError(PermanentJobError):
    """A job over the operator's limits (``max_job_steps``, ``max_job_seconds``)."""


class Worker:
    def __init__(
        self,
        storage: Storage,
        config: WorkerConfig,
        device: torch.device,
        consumer: str | None = None,
        dist: Dist = SINGLE,
    ) -> None:
        self.storage = storage
        # Under torchrun this is rank 0: it alone claims, reads the store and commits; the
        # other ranks train each step with it (`follow`).
        self.dist = dist
        self.config = config
        self.device = device
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stop_requested = threading.Event()
        self.abandon = threading.Event()
        self.features = ExemplarFeatures()  # the fast path's, by version
        self._warmed: int | None = None  # the version `_warm_features` last looked at

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
        """Process jobs until stopped (or one job with ``once``); the number processed.

        A store error never ends it: it waits for the store with backoff and goes on."""
        try:
            self._until_stored(self.ensure_initial_version, "making version 0", self.stop_requested)
        except _Abandoned:
            return 0
        done = 0
        backoff = self._backoff("waiting for jobs")
        while not self.stop_requested.is_set():
            # The other ranks wait for the next step in a collective with a timeout: a beat
            # each poll keeps them (and tells rank 0 they are alive).
            self.dist.broadcast_object(_IDLE)
            try:
                job = self.storage.jobs.claim(
                    self.consumer,
                    block_ms=self.config.poll_ms,
                    min_idle_ms=int(self.config.claim_timeout_s * 1000),
                )
            except StorageError as exc:
                backoff.wait(exc, self.stop_requested)
                continue
            backoff.succeeded()
            if job is None:
                if once and done:
                    break
                self._warm_features()
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
            self._settle(job.id, "releasing", lambda: self.storage.jobs.release(job.id))
            log.warning("job %s released unfinished", job.id)
        except (_TakenOver, JobStateError, VersionExistsError, VersionLockedError) as exc:
            # Another worker holds the job (or committed it); nothing of ours was committed.
            log.warning("job %s: %s", job.id, exc)
        except StoreUnavailableError as exc:
            # Lost before the step had a result: hand the job back, no attempt spent.
            log.warning("job %s: the store went away (%s); it is released once back", job.id, exc)
            self._settle(job.id, "releasing", lambda: self.storage.jobs.release(job.id))
        except Exception as exc:  # the job's error stays inspectable in its status
            self._fail(job, exc)
            if self.dist.active and is_collective_error(exc):
                # The group is broken: no later step can run on it. The job is retried
                # by whichever worker claims it next.
                raise RankLostError(f"job {job.id}: a rank was lost ({exc})") from exc
        finally:
            heartbeat.stop()
        return None

    def _fail(self, job: Job, exc: Exception) -> None:
        """Record the failed attempt: retried after a delay, or failed now when no retry
        can help."""
        permanent = isinstance(exc, PermanentJobError)
        delay = 0.0 if permanent else retry_delay(self.config, job.attempts)
        state = self._settle(
            job.id,
            "failing",
            lambda: self.storage.jobs.fail(
                job.id, f"{type(exc).__name__}: {exc}", retry_after_s=delay, permanent=permanent
            ),
        )
        if state == "failed":
            self._settle(job.id, "withdrawing the interim of", self._withdraw(job.id))
        if permanent:
            log.error("job %s failed, not retried: %s", job.id, exc)
        elif state == "queued":
            log.exception("job %s: attempt failed; next attempt in %.1f s", job.id, delay)
        else:
            log.exception("job %s failed (%s)", job.id, state)

    def _settle(self, job_id: str, what: str, call: Callable[[], T]) -> T | None:
        """A job's last word (fail, release), retried until the store answers. Given up
        only on a second signal: the job is then claimed again after the claim timeout."""
        try:
            return self._until_stored(call, f"{what} job {job_id}", self.abandon)
        except _Abandoned:
            log.warning("job %s: stopped before the store came back; left to be reclaimed", job_id)
        except StorageError as exc:
            log.error("job %s: %s it failed: %s", job_id, what, exc)
        return None

    def _until_stored(self, call: Callable[[], T], what: str, give_up: threading.Event) -> T:
        """`call()`, retried with backoff while the store is unreachable; `_Abandoned` when
        `give_up` is set first."""
        backoff = self._backoff(what)
        while True:
            try:
                result = call()
            except StoreUnavailableError as exc:
                if give_up.is_set():
                    raise _Abandoned(what) from exc
                backoff.wait(exc, give_up)
                continue
            backoff.succeeded()
            return result

    def _backoff(self, what: str) -> _Backoff:
        return _Backoff(self.config.store_retry_base_s, self.config.store_retry_max_s, what)

    def _run_job(self, job: Job, heartbeat: _Heartbeat) -> int:
        """Load the parent, (the fast path's interim,) train, commit: the version the job
        produced."""
        timings = _Timings(job)
        versions = self.storage.versions
        done = versions.version_for_job(job.id)
        if done is not None:
            # Committed by an earlier attempt whose acknowledgement was lost.
            self.storage.jobs.complete(job.id, done)
            return done
        self.storage.jobs.mark_running(job.id)
        deadline = time.monotonic() + self.config.max_job_seconds
        step_config = apply_overrides(self.config.step, job.overrides)
        # An earlier attempt's interim: this one builds on its parent and makes no other.
        interim = versions.interim_for_job(job.id)
        # The job's first version number: the one it takes without the fast path, which a
        # parent saved without its random stream seeds the step's stream with.
        first = versions.next_version() if interim is None else interim
        # Read now: after training the store may be away, and the map is append-only.
        names = self.storage.labels.names()
        with timings.measure("load"):
            built_on = None if interim is None else versions.info(interim).parent_version
            parent = self._load_parent(first, built_on)
        held = self._held_out(job, parent)
        self._check_budget(job, parent, step_config)
        claimed = _Claimed(job, parent, step_config, names, held, timings)
        if interim is None and self._wants_interim(parent):
            self._fast_path(claimed, first)
        version = versions.next_version()
        bound = train_seconds_for(self.config.train_seconds, job.overrides)
        run = _Run(job.id, heartbeat, deadline, step_config.optim.min_steps, bound)
        result, report, cut = self._train_judged(claimed, run)
        chunks = held.chunks_after(version)
        tensors, metadata = self._payload(result, parent, step_config, names, report, chunks, cut)
        with timings.measure("commit"):
            status = {"full_seconds": timings.elapsed()}
            committed = self._commit(
                job, version, tensors, metadata, result.memory, held.job, status
            )
        timings.log(committed, result.report.wall_seconds)
        return committed.version

    # -- the fast path ----------------------------------------------------------------------

    def _wants_interim(self, parent: _Parent) -> bool:
        """An interim needs a parent that learned something: classes, and exemplars to fit
        the new rows against (an untrained version 0, or no memory: no interim)."""
        model = parent.state.model
        return self.config.fast_path and model.num_classes > 0 and len(parent.memory) > 0

    def _fast_path(self, claimed: _Claimed, version: int) -> None:
        """Fit, judge and commit the interim version `version` (served when the gate passes
        it). A failure of the fit costs the interim only: the full step goes on."""
        job, parent, step_config, names = claimed.job, claimed.parent, claimed.config, claimed.names
        held, timings = claimed.held, claimed.timings
        try:
            with timings.measure("interim fit"):
                fit = self._fit_interim(job, parent, step_config, held.train)
            report = self._judge(fit.model, parent, step_config, names, held)
        except (StorageError, _Abandoned, _TakenOver):
            raise
        except Exception:
            log.exception("job %s: the fast path failed; the full step goes on", job.id)
            return
        chunks = held.chunks_after(version)
        tensors, metadata = self._interim_payload(fit, parent, step_config, names, report, chunks)
        status = {"interim_seconds": timings.elapsed()}
        committed = self._commit_interim(
            job, version, tensors, metadata, parent.memory, held, status
        )
        timings.seconds["interim"] = status["interim_seconds"]
        log.info(
            "job %s -> interim version %d (%s) %.2f s after the claim",
            job.id,
            committed.version,
            "served" if committed.served else committed.note or "not served",
            status["interim_seconds"],
        )

    def _fit_interim(
        self, job: Job, parent: _Parent, step_config: StepConfig, train: torch.Tensor
    ) -> InterimFit:
        t0 = time.perf_counter()
        augment, batch = step_config.augment, step_config.eval_batch_size
        images = torch.from_numpy(np.ascontiguousarray(job.samples))[train]
        labels = torch.tensor(job.indices, dtype=torch.int64)[train]
        new = Features.of(parent.state.model, images, labels, augment, self.device, batch)
        t1 = time.perf_counter()
        cached = parent.version in self.features
        exemplars = self._exemplar_features(parent, step_config)
        t2 = time.perf_counter()
        fit = fit_interim(
            parent.state.model,
            new,
            exemplars,
            interim_generator(self.config.seed, job.id),
            self.config.interim_fit,
        )
        fit.report.update(
            job_feature_seconds=t1 - t0,
            exemplar_feature_seconds=t2 - t1,
            exemplar_features_cached=cached,
        )
        return fit

    def _exemplar_features(self, parent: _Parent, step_config: StepConfig) -> Features:
        found = self.features.get(parent.version)
        if found is None:
            found = memory_features(
                parent.state.model,
                parent.memory,
                step_config.augment,
                self.device,
                step_config.eval_batch_size,
            )
            self.features.put(parent.version, found)
        return found

    def _warm_features(self) -> None:
        """While idle: the exemplar features of the version the next job builds on, so
        that its interim does not wait for them."""
        if not self.config.fast_path:
            return
        try:
            versions = self.storage.versions
            parent = versions.latest() if versions.pinned() is not None else versions.current()
            if parent is None or parent == self._warmed or parent in self.features:
                return
            self._warmed = parent  # once: a version without classes or memory has none
            loaded = self._read_parent(parent, parent)
            if self._wants_interim(loaded):
                self._exemplar_features(loaded, self.config.step)
        except Exception as exc:  # only a cache: the job computes them if need be
            log.debug("exemplar features not prepared: %s", exc)

    def _commit_interim(
        self,
        job: Job,
        version: int,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        memory: ExemplarMemory,
        held: _HeldOut,
        status: dict[str, float],
    ) -> Committed:
        """`Storage.commit_interim`, retried while the store is unreachable; a try whose
        reply was lost is found by the job's interim record."""

        def attempt() -> Committed:
            done = self.storage.versions.interim_for_job(job.id)
            if done is not None:
                served = self.storage.versions.current() == done
                return Committed(version=done, tag=self.storage.versions.tag(done), served=served)
            return self.storage.commit_interim(
                job.id, version, tensors, metadata, _arrays(memory), held.job, status
            )

        return self._until_stored(attempt, f"committing the interim of job {job.id}", self.abandon)

    def _withdraw(self, job_id: str) -> Callable[[], bool]:
        return lambda: self.storage.withdraw_interim(job_id)

    def _commit(
        self,
        job: Job,
        version: int,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        memory: ExemplarMemory,
        holdout: dict[int, np.ndarray],
        status: dict[str, float],
    ) -> Committed:
        """Commit the step, retried while the store is unreachable, so that an outage does
        not cost a trained step; a try whose reply was lost is found by its job id, so the
        version is committed once."""

        def attempt() -> Committed:
            done = self.storage.versions.version_for_job(job.id)
            if done is not None:
                self.storage.jobs.complete(job.id, done)
                served = self.storage.versions.current() == done
                return Committed(version=done, tag=self.storage.versions.tag(done), served=served)
            return self.storage.commit_step(
                job.id,
                version,
                tensors,
                metadata,
                _arrays(memory),
                reason=f"job {job.id}",
                holdout=holdout,
                status=status,
            )

        return self._until_stored(attempt, f"committing job {job.id}", self.abandon)

    def _check_budget(self, job: Job, parent: _Parent, step_config: StepConfig) -> None:
        """Refuse, before training, a job whose resolved budget is over the operator's limit
        (its samples and the parent's exemplars are what the step trains on)."""
        budget = resolve_budget(
            step_config.optim, len(job.labels) - job.validation + len(parent.memory)
        )
        limit = self.config.max_job_steps
        if budget.steps > limit:
            raise JobLimitError(
                f"the job's budget of {budget.steps} optimizer steps ({budget.epochs} epochs of "
                f"{budget.batches} batches) exceeds the operator's limit of {limit} "
                "(BSCE_MAX_JOB_STEPS); post fewer epochs, fewer steps or a larger batch size"
            )

    def _load_parent(self, version: int, parent: int | None = None) -> _Parent:
        """What step `version` builds on: `parent` when given (the parent of the job's
        interim), else the served version or, while a pin holds serving still, the newest
        (learning goes on behind a pin), with its memory generation.

        A parent that cannot be loaded is `ParentUnloadableError` (no retry fixes it); a
        store that does not answer is the store's error (transient)."""
        versions = self.storage.versions
        if parent is None:
            parent = versions.latest() if versions.pinned() is not None else versions.current()
        if parent is None:
            parent = versions.latest()
        try:
            return self._read_parent(parent, version)
        except (StoreUnavailableError, StoreResponseError):
            raise
        except Exception as exc:
            raise ParentUnloadableError(
                f"model version {parent}, the parent of this step, cannot be loaded "
                f"({type(exc).__name__}: {exc}); no retry can fix that: roll back or pin a "
                "loadable version, then post again"
            ) from exc

    def _read_parent(self, parent: int, version: int) -> _Parent:
        versions = self.storage.versions
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

    def _held_out(self, job: Job, parent: _Parent) -> _HeldOut:
        """The job's split (which samples train, which are held out) and the held-out
        images of the parent's lineage, read now: after training the store may be away."""
        labels = torch.tensor(job.indices, dtype=torch.int64)
        if not self.config.gate.enabled:  # a validation set is never trained on
            return _HeldOut(torch.arange(len(labels) - job.validation), {}, {}, [])
        train, held = split_job(labels, job.validation, self.config.gate, self.config.seed)
        chunks = [int(c) for c in parent.state.metadata.get("heldout_chunks", [])]
        return _HeldOut(
            train,
            {c: np.ascontiguousarray(job.samples[idx.numpy()]) for c, idx in held.items()},
            self.storage.holdout.read(chunks),
            chunks,
        )

    def _train_judged(
        self, claimed: _Claimed, run: _Run
    ) -> tuple[StepResult, GateReport | None, dict[str, Any] | None]:
        """Train and judge the full version; the third item is the try the time bound cut
        short, where there was one. Such a version that the gate rejects is trained again
        without the bound, from the same random stream (so as a worker without the bound
        would have trained it): the bound buys latency and must not cost a post its class. On
        a busy machine a one-class post cut to 48 of 156 steps was rejected (truck 10% on its
        held-out images) and its class was never predicted."""
        job, parent, step_config, names = claimed.job, claimed.parent, claimed.config, claimed.names
        held, timings = claimed.held, claimed.timings
        rng = parent.generator.get_state()
        result = self._train(job, parent, step_config, run, held.train)
        with timings.measure("gate"):
            report = self._judge(result.model, parent, step_config, names, held)
        trained = result.report
        if (
            report is None
            or report.verdict != "rejected"
            or trained.optimizer_steps >= trained.planned_steps
        ):
            return result, report, None
        cut = {
            "optimizer_steps": trained.optimizer_steps,
            "planned_steps": trained.planned_steps,
            "train_seconds": trained.train_seconds,
            "gate_reasons": report.reasons,
        }
        log.info(
            "job %s: the gate rejected the version cut to %d of %d steps by the time bound "
            "(%s); training it again without the bound",
            job.id,
            trained.optimizer_steps,
            trained.planned_steps,
            "; ".join(report.reasons),
        )
        parent.generator.set_state(rng)
        result = self._train(
            job, parent, step_config, replace(run, train_seconds=0.0, again=True), held.train
        )
        with timings.measure("gate"):
            report = self._judge(result.model, parent, step_config, names, held)
        return result, report, cut

    def _judge(
        self,
        model: IncrementalNet,
        parent: _Parent,
        step_config: StepConfig,
        names: list[str],
        held: _HeldOut,
    ) -> GateReport | None:
        if not self.config.gate.enabled:
            return None
        known = parent.state.model.num_classes
        return judge(
            model,
            parent.state.model,
            step_config.augment,
            names[: model.num_classes],
            held.all(),
            [c for c in range(known, model.num_classes)],
            self.config.gate,
            self.device,
            parent_version=parent.version,
        )

    def _train(
        self, job: Job, parent: _Parent, step_config: StepConfig, run: _Run, train: torch.Tensor
    ) -> StepResult:
        """One training step on the job's samples that are not held out (label-map indices
        fixed when it was queued) and the parent's memory."""
        labels = torch.tensor(job.indices, dtype=torch.int64)[train]
        images = torch.from_numpy(np.ascontiguousarray(job.samples))[train]
        data = StepData(images, labels)
        time_budget = (
            TimeBudget(run.train_seconds, self.config.train_min_share)
            if run.train_seconds > 0
            else None
        )
        if self.dist.active:
            memory = dict(parent.memory.images)
            call = _TrainCall(
                parent.state.model,
                data,
                memory,
                step_config,
                parent.generator.get_state(),
                time_budget,
            )
            self.dist.broadcast_object(call)
        return train_step(
            parent.state.model,
            data,
            parent.memory,
            step_config,
            device=self.device,
            generator=parent.generator,
            on_epoch=lambda e, n, loss: self._on_epoch(run, e, n, loss),
            dist=self.dist,
            time_budget=time_budget,
        )

    def _payload(
        self,
        result: StepResult,
        parent: _Parent,
        step_config: StepConfig,
        names: list[str],
        report: GateReport | None,
        heldout_chunks: list[int],
        cut: dict[str, Any] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The new version's tensors (weights, class means, random stream) and metadata;
        ``cut``: the try the time bound cut short and the gate rejected, where there was one."""
        metrics = {
            "train_seconds": result.report.train_seconds,
            "train_images_per_second": result.report.train_images_per_second,
            "exemplars": len(result.memory),
        }
        extra = self._extra(
            parent, result.counts, result.report.model_dump(), report, heldout_chunks, metrics
        )
        return version_payload(
            result.model.cpu(),
            class_names=names[: result.model.num_classes],
            counts=result.counts.tolist(),
            augment=step_config.augment,
            class_means=result.class_means,
            config=step_config,
            generator=parent.generator,
            extra=extra if cut is None else {**extra, "rejected_when_cut": cut},
        )

    def _interim_payload(
        self,
        fit: InterimFit,
        parent: _Parent,
        step_config: StepConfig,
        names: list[str],
        report: GateReport | None,
        heldout_chunks: list[int],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The interim's payload. Its random stream is the parent's, saved and not drawn
        from (a step built on the interim continues the lineage's stream); its memory is the
        parent's (it selects no exemplars)."""
        metrics = {"fit_seconds": fit.report["fit_seconds"], "exemplars": len(parent.memory)}
        extra = self._extra(parent, fit.counts, fit.report, report, heldout_chunks, metrics)
        return version_payload(
            fit.model,
            class_names=names[: fit.model.num_classes],
            counts=fit.counts.tolist(),
            augment=step_config.augment,
            class_means=fit.class_means,
            config=step_config,
            generator=parent.generator,
            extra={"interim": True, **extra},
        )

    def _extra(
        self,
        parent: _Parent,
        counts: torch.Tensor,
        step_report: dict[str, Any],
        report: GateReport | None,
        heldout_chunks: list[int],
        metrics: dict[str, Any],
    ) -> dict[str, Any]:
        """The metadata a version records besides its network and classes."""
        return {
            "parent_version": parent.version,
            "step": int(parent.state.metadata.get("step", 0)) + 1,
            "active_classes": _active_classes(parent.state.metadata, counts),
            "seed": self.config.seed,
            "rng": parent.rng,
            "report": step_report,
            "gate": None if report is None else report.model_dump(mode="json"),
            "heldout_chunks": heldout_chunks,
            "machine": describe_machine(self.device),
            "distributed": self.dist.describe(),
            "metrics": {**metrics, **_gate_metrics(report)},
        }

    def _on_epoch(self, run: _Run, epoch: int, epochs: int, loss: float) -> None:
        # The resolved budget shows as the epoch count (fewer once the time bound cut it); the
        # version's report keeps the rest (epochs, min_steps, batches_per_epoch,
        # optimizer_steps, planned_steps).
        bound = run.train_seconds
        share = self.config.train_min_share
        within = (
            f", or what fits in {bound:g} s, not under {share:.0%} of them" if bound > 0 else ""
        )
        again = "again without the time bound (the gate rejected the shorter try): " * run.again
        note = (
            f"{again}epoch {epoch}/{epochs} (at least {run.min_steps} optimizer steps{within}), "
            f"loss {loss:.3f}"
        )
        try:
            self.storage.jobs.set_progress(run.job_id, epoch / epochs, note)
        except StorageError as exc:  # progress is for show: an outage must not cost the step
            log.debug("job %s: progress not recorded: %s", run.job_id, exc)
        self._check_abandon(run.job_id, run.heartbeat)
        # Not after the last epoch: the step is all but done, and keeping it costs less.
        if time.monotonic() > run.deadline and epoch < epochs:
            raise JobLimitError(
                f"stopped after epoch {epoch}/{epochs}: the job ran longer than the "
                f"operator's limit of {self.config.max_job_seconds:g} s (BSCE_MAX_JOB_SECONDS)"
            )

    def _check_abandon(self, job_id: str, heartbeat: _Heartbeat) -> None:
        if heartbeat.lost.is_set():
            raise _TakenOver(job_id)
        if self.abandon.is_set():
            raise _Abandoned(job_id)


@dataclass(frozen=True)
class _Claimed:
    """What the stages of a claimed job share: the job, the parent it builds on, its recipe
    (the worker's with the job's overrides), the label names, its held-out split and the
    timings of its log line."""

    job: Job
    parent: _Parent
    config: StepConfig
    names: list[str]
    held: _HeldOut
    timings: _Timings


@dataclass(frozen=True)
class _Run:
    """What the progress callback of a training job needs."""

    job_id: str
    heartbeat: _Heartbeat
    deadline: float  # time.monotonic() past which the job is stopped
    min_steps: int
    train_seconds: float  # the time bound on its training loop (0: none)
    again: bool = False  # trained again without the bound, after the gate rejected a cut try


class _Backoff:
    """Capped exponential waits while the store is unreachable, each one logged."""

    def __init__(self, base_s: float, max_s: float, what: str) -> None:
        self.base_s, self.max_s, self.what = base_s, max_s, what
        self.failures = 0

    def wait(self, exc: Exception, until: threading.Event) -> None:
        """Sleep the next delay, or less when `until` is set meanwhile."""
        delay = min(self.max_s, self.base_s * 2 ** min(self.failures, 30))
        self.failures += 1
        log.warning(
            "store %s while %s (%s); retry %d in %.2f s",
            "unavailable" if isinstance(exc, StoreUnavailableError) else "error",
            self.what,
            exc,
            self.failures,
            delay,
        )
        until.wait(delay)

    def succeeded(self) -> None:
        if self.failures:
            log.info("store reachable again after %d retries (%s)", self.failures, self.what)
        self.failures = 0


@dataclass(frozen=True)
class _Parent:
    """The version a step builds on."""

    version: int
    state: LoadedVersion
    memory: ExemplarMemory  # its memory generation, read from Redis
    generator: torch.Generator  # its random stream, which the step continues
    rng: str  # where the stream came from: "parent", or "seed+version" (older versions)


def _gate_metrics(report: GateReport | None) -> dict[str, float]:
    """The gate's figures for the version's registry entry (the server's metrics)."""
    if report is None:
        return {}
    figures = {
        "heldout_overall_accuracy": report.overall_accuracy,
        "heldout_old_accuracy": report.old_accuracy,
        "heldout_new_accuracy": report.new_accuracy,
        "heldout_balance": report.balance,
        "gate_seconds": report.seconds,
    }
    return {k: float(v) for k, v in figures.items() if v is not None}


@dataclass(frozen=True)
class _HeldOut:
    """The promotion gate's data for one job."""

    train: torch.Tensor  # indices of the job's samples to train on
    job: dict[int, np.ndarray]  # the job's held-out images by class (its version's chunk)
    lineage: dict[int, np.ndarray]  # the held-out images of the parent's lineage
    chunks: list[int]  # the parent's held-out chunks

    def all(self) -> dict[int, np.ndarray]:
        classes = sorted({*self.job, *self.lineage})
        return {
            c: np.concatenate([x[c] for x in (self.lineage, self.job) if c in x]) for c in classes
        }

    def chunks_after(self, version: int) -> list[int]:
        """The chunks the new version names: its parent's, and its own when it has one."""
        return [*self.chunks, version] if self.job else list(self.chunks)


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

    def elapsed(self) -> float:
        """Seconds since the attempt started (the job was claimed)."""
        return time.perf_counter() - self.start

    @contextmanager
    def measure(self, what: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            # Summed: a job judged twice (the time bound's retry) logs both judgements.
            self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t

    def log(self, committed: Committed, train_s: float) -> None:
        total_s = time.perf_counter() - self.start
        interim = self.seconds.get("interim")
        log.info(
            "job %s -> version %d (%s): queued %.1f s, %sload %.2f s, train step %.1f s, "
            "gate %.2f s, commit %.2f s, storage+queue overhead %.1f%% of the step",
            self.job_id,
            committed.version,
            "served" if committed.served else committed.note or "not served",
            self.queued_s,
            "" if interim is None else f"interim committed at {interim:.2f} s, ",
            self.seconds.get("load", 0.0),
            train_s,
            self.seconds.get("gate", 0.0),
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


# What rank 0 broadcasts to the other ranks between steps: a beat while it waits for a job,
# a step to train, or None to stop.
_IDLE = "idle"


@dataclass(frozen=True)
class _TrainCall:
    """One training step as rank 0 runs it: the other ranks run the same call on their
    slice of every batch (rank 0 alone read it from the store)."""

    model: IncrementalNet
    data: StepData
    memory: dict[int, torch.Tensor]  # an ExemplarMemory's images (its mapping view does not pickle)
    config: StepConfig
    rng_state: torch.Tensor  # the parent's random stream, which every rank continues
    time_budget: TimeBudget | None = None  # rank 0's clock decides when it cuts the budget

    def run(self, device: torch.device, dist: Dist) -> StepResult:
        generator = torch.Generator()
        generator.set_state(self.rng_state)
        return train_step(
            self.model,
            self.data,
            ExemplarMemory(self.memory),
            self.config,
            device=device,
            generator=generator,
            dist=dist,
            time_budget=self.time_budget,
        )


def follow(dist: Dist, device: torch.device) -> int:
    """A rank other than 0: train every step rank 0 sends until it sends None; the number
    of steps trained. A failed collective (rank 0 died or hung) propagates."""
    steps = 0
    while True:
        command = dist.broadcast_object(None)
        if command is None:
            return steps
        if not isinstance(command, _TrainCall):
            continue  # a beat
        try:
            command.run(device, dist)
            steps += 1
        except StepAborted:
            log.info("rank %d: rank 0 stopped the step", dist.rank)
        except Exception as exc:
            if is_collective_error(exc):
                raise
            # The same inputs fail the same way on rank 0, which fails the job; a failure of
            # this rank alone breaks the next collective, which then fails for both.
            log.exception("rank %d: the step failed", dist.rank)


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
        gate=_gate_from_args(args),
        fast_path=args.fast_path == "on",
        **{f: getattr(args, f) for f in _OPERATOR_FIELDS if getattr(args, f) is not None},
    )


# GateConfig fields set by --gate-<field> or BSCE_GATE_<FIELD> (``enabled`` is --gate on|off).
_GATE_FIELDS = [f for f in GateConfig.model_fields if f != "enabled"]


def _gate_from_args(args: argparse.Namespace) -> GateConfig:
    given = {f: getattr(args, f"gate_{f}") for f in _GATE_FIELDS}
    return GateConfig(
        enabled=args.gate == "on", **{f: v for f, v in given.items() if v is not None}
    )


def _add_gate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gate",
        choices=["on", "off"],
        default=os.environ.get("BSCE_GATE", "on"),
        help="the promotion gate: hold out part of each posted class and serve a new version "
        "only when it passes the checks on held-out images (BSCE_GATE, default on)",
    )
    for field in _GATE_FIELDS:
        info = GateConfig.model_fields[field]
        kind = int if info.annotation is int else float
        p.add_argument(
            "--gate-" + field.replace("_", "-"),
            type=kind,
            default=_env_number(f"BSCE_GATE_{field.upper()}", kind),
            help=f"(BSCE_GATE_{field.upper()}, default {info.default})",
        )


# WorkerConfig fields set by the flag --<field> or the variable BSCE_<FIELD>.
_OPERATOR_FIELDS: dict[str, type] = {
    "max_job_steps": int,
    "max_job_seconds": float,
    "train_seconds": float,
    "train_min_share": float,
    "retry_base_s": float,
    "retry_max_s": float,
    "store_retry_base_s": float,
    "store_retry_max_s": float,
}


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
    for field, kind in _OPERATOR_FIELDS.items():
        p.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            default=_env_number(f"BSCE_{field.upper()}", kind),
            help=f"(BSCE_{field.upper()}, default {WorkerConfig.model_fields[field].default})",
        )
    _add_gate_arguments(p)
    p.add_argument(
        "--fast-path",
        choices=["on", "off"],
        default=env("BSCE_FAST_PATH", "on"),
        help="an interim version within seconds of each job (the parent's network frozen, the "
        "head refit on features), then the full step (BSCE_FAST_PATH, default on)",
    )
    p.add_argument("--once", action="store_true", help="process one job, then exit")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=_env_number("BSCE_DIST_TIMEOUT_S", float) or DistConfig().timeout_s,
        help="under torchrun: seconds a collective may wait before the worker fails its job "
        "and exits (a dead or hung rank) (BSCE_DIST_TIMEOUT_S, default "
        f"{DistConfig().timeout_s:g})",
    )
    return p


def _open_storage(config: WorkerConfig) -> Storage:
    """The store, waited for with backoff when it is down at start."""
    from storage import open_storage

    backoff = _Backoff(config.store_retry_base_s, config.store_retry_max_s, "starting")
    while True:
        try:
            return open_storage()
        except StoreUnavailableError as exc:
            backoff.wait(exc, threading.Event())


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

    try:
        config = config_from_args(args)
        dist_config = DistConfig(timeout_s=args.dist_timeout)
    except ValidationError as e:
        raise SystemExit(f"bad worker configuration: {e}") from None
    # Under torchrun (learner/distributed.py): rank 0 is the worker below; the other ranks
    # never touch the store, they train the steps it sends them.
    dist, device = Dist.from_env(resolve_device(args.device), dist_config)
    if not dist.is_main:
        _follow_main(dist, device)
        return
    worker = Worker(_open_storage(config), config, device, args.consumer, dist=dist)

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
    except Exception as e:
        if dist.active and is_collective_error(e):
            raise SystemExit(
                f"rank 0 of {dist.world_size}: a rank died, or hung past --dist-timeout "
                f"{dist_config.timeout_s:g} s ({type(e).__name__}: {e}); exiting"
            ) from None
        raise
    dist.broadcast_object(None)  # the other ranks stop too
    dist.close()


def _follow_main(dist: Dist, device: torch.device) -> None:
    """Ranks other than 0 leave signals to rank 0 (which finishes or abandons the step and
    then tells them to stop) and end when it does; a lost rank 0 is a non-zero exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info("rank %d of %d on %s follows rank 0", dist.rank, dist.world_size, device)
    try:
        steps = follow(dist, device)
    except Exception as e:
        if is_collective_error(e):
            raise SystemExit(
                f"rank {dist.rank} of {dist.world_size}: lost rank 0 or another rank "
                f"({type(e).__name__}: {e})"
            ) from None
        raise
    log.info("rank %d: stopped by rank 0 after %d steps", dist.rank, steps)
    dist.close()


if __name__ == "__main__":
    main()
