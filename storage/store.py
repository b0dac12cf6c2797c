"""All stores on one connection, and the one transaction that ends a learning step."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from pydantic import BaseModel

from .boundary import boundary, guarded
from .connection import close, connect, default_prefix
from .errors import ExemplarValidationError
from .exemplars import ExemplarStore
from .holdout import HoldoutStore
from .jobs import DEFAULT_MAX_JOB_BYTES, JobQueue
from .labels import LabelMap
from .versions import PointerState, VersionStore


class StepResult(BaseModel):
    version: int
    tag: str
    # False when the pointer stayed where it was: pinned, or no longer on the step's parent.
    served: bool
    collected: list[int] = []  # memory generations removed by this commit
    built_on: int | None = None  # the parent the step was built on, when it named one
    note: str | None = None  # why the new version is not served


@guarded
class Storage:
    """The four stores sharing one client and prefix.

    `r` is the raw Redis client, for this package and its tests; everything else goes
    through the stores, whose errors are `storage.errors` types.
    """

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
        self.jobs = JobQueue(
            r,
            self.prefix,
            max_job_bytes=max_job_bytes,
            sample_shape=sample_shape,
            labels=self.labels,
        )
        self.versions = VersionStore(
            r, self.prefix, bentoml_home=bentoml_home, exemplars=self.exemplars
        )
        self.holdout = HoldoutStore(r, self.prefix)

    def close(self) -> None:
        """Close the client (with the embedded Redis, the last one closed stops it)."""
        close(self.r)

    def commit_step(
        self,
        job_id: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        memory: Mapping[int, np.ndarray],
        reason: str = "",
        holdout: Mapping[int, np.ndarray] | None = None,
    ) -> StepResult:
        """End a learning step: everything a finished job changes, or nothing.

        Writes the version's files first (unregistered), then one MULTI/EXEC registers the
        version with `memory` as its memory generation (number `version`), moves the
        pointer and announces it (see below), removes the memory generations no version
        needs any more (storage/versions.py) and acknowledges the job as done. A worker
        killed anywhere before EXEC leaves the job to be claimed again and no registered
        version or generation, so the retried job saves the same version number once.
        A stale worker whose job was taken over and finished gets `JobStateError` here.

        The pointer moves by compare-and-set, under WATCH in the same transaction: only
        when it is not pinned and still names the version the step was built on
        (``metadata["parent_version"]``; a step that names none moves it unless pinned).
        Otherwise an operator decided while the step trained, and the decision stands:
        after a rollback or a set to another version the new version is saved (a later
        set or pin can serve it) but not served; under a pin it is saved behind the pin,
        and `unpin` serves the newest version. The job is done either way; its status says
        what it was built on and, when the pointer stayed, why (`JobStatus.note`).

        A version the promotion gate rejected (``metadata["gate"]["verdict"] == "rejected"``)
        is saved and never moves the pointer; its job ends ``rejected`` with the gate's
        report. `holdout` (the job's held-out images by class) is written as the version's
        held-out chunk in the same transaction, whatever the verdict.
        """
        if memory is None:
            raise ExemplarValidationError("a step commits its memory (an empty mapping for none)")
        pending = self.versions.write(
            version, tensors, {**dict(metadata), "job_id": job_id}, memory
        )
        v = pending.info.version
        parent = metadata.get("parent_version")
        built_on = None if parent is None else int(parent)
        gate = metadata.get("gate")
        rejected = pending.info.gate == "rejected"

        def txn(pipe: redis.client.Pipeline) -> tuple[str | None, list[int]]:
            self.versions.check_register(pipe, pending)
            stream_id = self.jobs.check_completable(pipe, job_id)
            before = self.versions.read_pointer(pipe)
            note = _rejected_note(v, gate) if rejected else _not_served_note(before, v, built_on)
            after = before.after_set(v) if note is None else before
            drop = self.versions.unneeded_generations(pipe, after, new=pending.info)
            pipe.multi()
            self.versions.stage_register(pipe, pending)
            if note is None:
                self.versions.stage_move(
                    pipe, "set", v, before.current, None, reason or f"job {job_id}"
                )
            outcome: dict[str, str | int] = {"pointer_moved": "1" if note is None else "0"}
            if built_on is not None:
                outcome["built_on"] = built_on
            if note is not None:
                outcome["note"] = note
            if gate is not None:
                outcome["gate"] = json.dumps(gate)
            if rejected:
                outcome["state"] = "rejected"
            if holdout:
                self.holdout.stage_write(pipe, v, holdout)
            self.versions.stage_collect(pipe, drop)
            self.jobs.stage_complete(pipe, job_id, stream_id, v, outcome)
            return note, drop

        watches = {
            *self.versions.register_watches(pending),
            *self.versions.pointer_watches(),
            *self.versions.memory_watches(),
            *self.jobs.watch_keys(job_id),
        }
        try:
            note, drop = self.r.transaction(txn, *watches, value_from_callable=True)
        except BaseException:
            self.versions.discard(pending)
            raise
        finally:
            self.versions.release_lock(pending)
        return StepResult(
            version=v,
            tag=pending.info.tag,
            served=note is None,
            collected=drop,
            built_on=built_on,
            note=note,
        )


def _rejected_note(version: int, gate: Mapping[str, Any]) -> str:
    reasons = "; ".join(gate.get("reasons") or []) or "no reason given"
    return (
        f"version {version} is saved but not served: the promotion gate rejected it ({reasons}); "
        f"POST /versions/{version}/promote serves it anyway"
    )


def _not_served_note(before: PointerState, version: int, built_on: int | None) -> str | None:
    """Why a step's commit leaves the pointer where it is; None when it moves it."""
    if before.pinned is not None:
        built = "" if built_on is None else f" (built on version {built_on})"
        return (
            f"version {version}{built} is saved but not served: the pointer is pinned to "
            f"version {before.pinned}; unpin to serve the newest version"
        )
    if built_on is not None and before.current != built_on:
        return (
            f"version {version} is saved but not served: it was built on version {built_on}, "
            f"and the pointer moved to version {before.current} while it trained (a rollback "
            "or an operator's set); set or pin it to serve it"
        )
    return None


@boundary
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
