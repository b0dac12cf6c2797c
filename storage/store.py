"""All stores on one connection, and the one transaction that ends a learning step."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from pydantic import BaseModel

from .connection import connect, default_prefix
from .errors import JobStateError, UnknownJobError
from .exemplars import ExemplarStore
from .jobs import DEFAULT_MAX_JOB_BYTES, JobQueue
from .labels import LabelMap
from .versions import VersionStore


class StepResult(BaseModel):
    version: int
    tag: str
    served: bool  # False when the pointer was pinned and stayed where it was


class Storage:
    """The four stores sharing one client and prefix."""

    def __init__(
        self,
        r: redis.Redis,
        prefix: str | None = None,
        bentoml_home: Path | str | None = None,
        max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        self.r = r
        self.prefix = prefix or default_prefix()
        self.exemplars = ExemplarStore(r, self.prefix)
        self.labels = LabelMap(r, self.prefix)
        self.jobs = JobQueue(r, self.prefix, max_job_bytes=max_job_bytes, sample_shape=sample_shape)
        self.versions = VersionStore(r, self.prefix, bentoml_home=bentoml_home)

    def commit_step(
        self,
        job_id: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        memory: Mapping[int, np.ndarray] | None,
        reason: str = "",
    ) -> StepResult:
        """End a learning step: everything a finished job changes, or nothing.

        Writes the version's files first (unregistered), then one MULTI/EXEC registers the
        version, replaces the exemplar memory (unless `memory` is None), moves the pointer
        and announces it (unless pinned), and acknowledges the job as done. A worker killed
        anywhere before EXEC leaves the job to be claimed again, the old memory whole and
        no registered version, so the retried job saves the same version number once.
        A stale worker whose job was taken over and finished gets `JobStateError` here.
        """
        prepared = None if memory is None else self.exemplars.prepare(memory, version)
        pending = self.versions.write(version, tensors, {**dict(metadata), "job_id": job_id})
        job_key = self.jobs.keys.job(job_id)
        v = pending.info.version

        def txn(pipe: redis.client.Pipeline) -> bool:
            self.versions._check_register(pipe, pending)
            state, stream_id = pipe.hmget(job_key, ["state", "stream_id"])
            if state is None:
                raise UnknownJobError(f"no job with id {job_id!r}")
            if state in (b"done", b"failed"):
                raise JobStateError(f"job {job_id} is already {state.decode()}")
            cur, pin = self.versions._read_pointer(pipe)
            pipe.multi()
            self.versions._stage_register(pipe, pending)
            if prepared is not None:
                self.exemplars.stage(pipe, prepared)
            if pin is None:
                self.versions._stage_move(pipe, "set", v, cur, None, reason or f"job {job_id}")
            self.jobs._stage_complete(pipe, job_id, stream_id, v)
            return pin is None

        watches = [
            *self.versions._register_watches(pending),
            *self.versions._pointer_watches(),
            job_key,
        ]
        try:
            served = self.r.transaction(txn, *watches, value_from_callable=True)
        except BaseException:
            self.versions.discard(pending)
            raise
        finally:
            self.versions.release_lock(pending)
        return StepResult(version=v, tag=pending.info.tag, served=served)


def open_storage(
    redis_url: str | None = None,
    data_dir: Path | None = None,
    prefix: str | None = None,
    bentoml_home: Path | str | None = None,
    **kwargs: Any,
) -> Storage:
    """`connect` + `Storage`, from the environment's settings unless given.

    `BSCE_MAX_JOB_BYTES` sets the largest job (decoded samples) the queue takes; the server
    and the workers of a deployment should agree on it.
    """
    if "max_job_bytes" not in kwargs:
        kwargs["max_job_bytes"] = max_job_bytes_from_env()
    return Storage(connect(redis_url, data_dir), prefix, bentoml_home=bentoml_home, **kwargs)


def max_job_bytes_from_env() -> int:
    raw = os.environ.get("BSCE_MAX_JOB_BYTES")
    if not raw:
        return DEFAULT_MAX_JOB_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"BSCE_MAX_JOB_BYTES must be a whole number of bytes, got {raw!r}"
        ) from None
    if value <= 0:
        raise ValueError(f"BSCE_MAX_JOB_BYTES must be positive, got {value}")
    return value
