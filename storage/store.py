"""All stores on one connection, and the one transaction that ends a learning step."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from pydantic import BaseModel

from .boundary import boundary, guarded
from .connection import close, connect, default_prefix
from .errors import ExemplarValidationError, MetadataError, VersionExistsError
from .exemplars import ExemplarStore
from .holdout import HoldoutStore
from .jobs import DEFAULT_MAX_JOB_BYTES, InterimRecord, JobQueue
from .labels import LabelMap
from .sessions import SessionSettings, SessionStore
from .versions import PointerState, VersionStore


class StepResult(BaseModel):
    version: int
    tag: str
    # False when the pointer stayed where it was: pinned, or no longer on the step's parent.
    served: bool
    collected: list[int] = []  # memory generations removed by this commit
    built_on: int | None = None  # the parent the step was built on, when it named one
    note: str | None = None  # why the new version is not served
    withdrawn: bool = False  # a rejected full version: the pointer went back from its interim


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
        sessions: SessionSettings | None = None,
    ) -> None:
        self.r = r
        self.prefix = prefix or default_prefix()
        session_settings = sessions or SessionSettings()
        self.exemplars = ExemplarStore(r, self.prefix)
        self.labels = LabelMap(r, self.prefix)
        self.jobs = JobQueue(
            r,
            self.prefix,
            max_job_bytes=max_job_bytes,
            sample_shape=sample_shape,
            labels=self.labels,
            sample_dir=session_settings.sample_dir(self.prefix),
            chunk_bytes=session_settings.chunk_bytes,
        )
        self.versions = VersionStore(
            r, self.prefix, bentoml_home=bentoml_home, exemplars=self.exemplars
        )
        self.holdout = HoldoutStore(r, self.prefix)
        # Upload sessions (storage/sessions.py): jobs posted in batches.
        self.sessions = SessionStore(r, self.prefix, self.jobs, session_settings)

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
        status: Mapping[str, str | int | float] | None = None,
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

        The fast path: when the job's interim version (`commit_interim`) was served, it
        stands in for the parent: the pointer must name that interim instead, and it leaves
        the rollback stack when the full version replaces it. A rollback from the interim to
        the parent is an operator's decision like any other, and stands.

        A version the promotion gate rejected (``metadata["gate"]["verdict"] == "rejected"``)
        is saved and never moves the pointer; its job ends ``rejected`` with the gate's
        report. If the job's interim is served then, the pointer goes back to the parent (the
        interim is withdrawn): the lineage is the one a job without the fast path leaves.
        `holdout` (the job's held-out images by class) is written as the version's held-out
        chunk in the same transaction, whatever the verdict. `status` adds fields to the
        job's status record (``full_seconds``).
        """
        return self._commit(
            job_id, version, tensors, metadata, memory, reason, holdout, status, final=True
        )

    def commit_interim(
        self,
        job_id: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        memory: Mapping[int, np.ndarray],
        holdout: Mapping[int, np.ndarray] | None = None,
        status: Mapping[str, str | int | float] | None = None,
    ) -> StepResult:
        """Commit a running job's interim version (``metadata["interim"]``, the fast path)
        without ending the job: registered under ``P:versions:interim_by_job``, served by
        the same compare-and-set as `commit_step` and never when the gate rejected it; the
        job's status records it (``interim_version``, ``interim_served``, ``interim_note``,
        ``interim_gate`` and `status`). A job has one interim: a second is
        `VersionExistsError`. `memory` is its own generation (the parent's memory again).
        """
        if metadata.get("interim") is not True:
            raise MetadataError('an interim version\'s metadata says "interim": true')
        return self._commit(
            job_id, version, tensors, metadata, memory, "", holdout, status, final=False
        )

    def _commit(
        self,
        job_id: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        memory: Mapping[int, np.ndarray],
        reason: str,
        holdout: Mapping[int, np.ndarray] | None,
        status: Mapping[str, str | int | float] | None,
        final: bool,
    ) -> StepResult:
        if memory is None:
            raise ExemplarValidationError("a step commits its memory (an empty mapping for none)")
        pending = self.versions.write(
            version, tensors, {**dict(metadata), "job_id": job_id}, memory
        )
        v = pending.info.version
        parent = metadata.get("parent_version")
        built_on = None if parent is None else int(parent)
        gate = metadata.get("gate")

        def txn(pipe: redis.client.Pipeline) -> tuple[_Move, list[int]]:
            self.versions.check_register(pipe, pending)
            stream_id = self.jobs.check_completable(pipe, job_id)
            interim = self.jobs.read_interim(pipe, job_id)
            if not final and interim is not None:
                raise VersionExistsError(
                    f"job {job_id} already has its interim version {interim.version}"
                )
            before = self.versions.read_pointer(pipe)
            move = _decide(before, v, rejected=pending.info.gate == "rejected", gate=gate,
                           built_on=built_on, interim=interim if final else None)  # fmt: skip
            after = before if move.target is None else before.after_set(move.target, move.push)
            drop = self.versions.unneeded_generations(pipe, after, new=pending.info)
            pipe.multi()
            self.versions.stage_register(pipe, pending)
            if move.target is not None:
                why = move.reason or reason or f"job {job_id}"
                self.versions.stage_move(
                    pipe, "set", move.target, before.current, None, why, push_history=move.push
                )
            if holdout:
                self.holdout.stage_write(pipe, v, holdout)
            self.versions.stage_collect(pipe, drop)
            fields = _job_fields(move, v, built_on, gate, final, status)
            if final:
                self.jobs.stage_complete(pipe, job_id, stream_id, v, fields)
            else:
                self.jobs.stage_fields(pipe, job_id, fields)
            return move, drop

        watches = {
            *self.versions.register_watches(pending),
            *self.versions.pointer_watches(),
            *self.versions.memory_watches(),
            *self.jobs.watch_keys(job_id),
        }
        try:
            move, drop = self.r.transaction(txn, *watches, value_from_callable=True)
        except BaseException:
            self.versions.discard(pending)
            raise
        finally:
            self.versions.release_lock(pending)
        return StepResult(
            version=v,
            tag=pending.info.tag,
            served=move.target == v,
            collected=drop,
            built_on=built_on,
            note=move.note,
            withdrawn=move.withdrawn,
        )

    def withdraw_interim(self, job_id: str, reason: str = "") -> bool:
        """After a job failed for good: put the pointer back from its served interim version
        on the interim's parent, as `commit_step` does for a rejected full version. Only
        while the pointer still names the interim and is not pinned (an operator's move
        stands). True when the pointer moved."""

        def txn(pipe: redis.client.Pipeline) -> bool:
            interim = self.jobs.read_interim(pipe, job_id)
            before = self.versions.read_pointer(pipe)
            if interim is None or not interim.served or before.pinned is not None:
                return False
            if before.current != interim.version:
                return False
            parent = self.versions.info(interim.version).parent_version
            if parent is None:
                return False
            why = reason or f"job {job_id} failed: its interim version {interim.version} withdrawn"
            pipe.multi()
            self.versions.stage_move(
                pipe, "set", parent, interim.version, None, why, push_history=False
            )
            self.jobs.stage_fields(pipe, job_id, {"interim_withdrawn": "1"})
            return True

        watches = {*self.versions.pointer_watches(), *self.jobs.watch_keys(job_id)}
        return self.r.transaction(txn, *watches, value_from_callable=True)


@dataclass(frozen=True)
class _Move:
    """What a commit does with the pointer: set it to `target` (None: leave it), and why not
    to the new version (`note`)."""

    target: int | None
    note: str | None = None
    push: bool = True  # push the version it replaces on the rollback stack
    withdrawn: bool = False  # back from the job's interim on the parent
    reason: str | None = None


def _decide(
    before: PointerState,
    version: int,
    *,
    rejected: bool,
    gate: Mapping[str, Any] | None,
    built_on: int | None,
    interim: InterimRecord | None,
) -> _Move:
    """The pointer rule of a commit (see `Storage.commit_step`); `interim` is the job's
    interim record, given to the full step's commit only."""
    own = interim is not None and interim.served and built_on is not None
    expected = interim.version if own else built_on  # type: ignore[union-attr]
    if rejected:
        note = _rejected_note(version, gate or {})
        if own and before.pinned is None and before.current == expected:
            note += (
                f"; its job's interim version {expected} is withdrawn: the pointer is back on "
                f"version {built_on}"
            )
            why = f"version {version} rejected: interim version {expected} withdrawn"
            return _Move(built_on, note, push=False, withdrawn=True, reason=why)
        return _Move(None, note)
    note = _not_served_note(before, version, built_on, expected)
    if note is not None:
        return _Move(None, note)
    return _Move(version, push=not own)


def _job_fields(
    move: _Move,
    version: int,
    built_on: int | None,
    gate: Mapping[str, Any] | None,
    final: bool,
    status: Mapping[str, str | int | float] | None,
) -> dict[str, str | int | float]:
    """The status fields a commit writes: the full step's outcome, or the interim's record."""
    fields = _outcome(move, version, built_on, gate) if final else _interim(move, version, gate)
    return {**fields, **dict(status or {})}


def _interim(move: _Move, version: int, gate: Mapping[str, Any] | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "interim_version": version,
        "interim_served": "1" if move.target == version else "0",
    }
    if move.note is not None:
        fields["interim_note"] = move.note
    if gate is not None:
        fields["interim_gate"] = str(gate.get("verdict"))
    return fields


def _outcome(
    move: _Move, version: int, built_on: int | None, gate: Mapping[str, Any] | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"pointer_moved": "1" if move.target == version else "0"}
    if built_on is not None:
        fields["built_on"] = built_on
    if move.note is not None:
        fields["note"] = move.note
    if gate is not None:
        fields["gate"] = json.dumps(gate)
        if gate.get("verdict") == "rejected":
            fields["state"] = "rejected"
    if move.withdrawn:
        fields["interim_withdrawn"] = "1"
    return fields


def _rejected_note(version: int, gate: Mapping[str, Any]) -> str:
    reasons = "; ".join(gate.get("reasons") or []) or "no reason given"
    return (
        f"version {version} is saved but not served: the promotion gate rejected it ({reasons}); "
        f"POST /versions/{version}/promote serves it anyway"
    )


def _not_served_note(
    before: PointerState, version: int, built_on: int | None, expected: int | None = None
) -> str | None:
    """Why a step's commit leaves the pointer where it is; None when it moves it. The
    pointer must still name `expected`: the parent, or the job's served interim version."""
    if before.pinned is not None:
        built = "" if built_on is None else f" (built on version {built_on})"
        return (
            f"version {version}{built} is saved but not served: the pointer is pinned to "
            f"version {before.pinned}; unpin to serve the newest version"
        )
    expected = built_on if expected is None else expected
    if built_on is not None and before.current != expected:
        named = (
            "" if expected == built_on else f" (its job's interim version {expected} stood for it)"
        )
        return (
            f"version {version} is saved but not served: it was built on version {built_on}"
            f"{named}, and the pointer moved to version {before.current} while it trained (a "
            "rollback or an operator's set); set or pin it to serve it"
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
    and the workers of a deployment should agree on it. ``BSCE_SESSION_*`` set the upload
    sessions (`SessionSettings`); the server and the workers must agree on
    ``BSCE_SESSION_STORE`` (a directory store must be the same folder on every host).
    """
    if "max_job_bytes" not in kwargs:
        kwargs["max_job_bytes"] = max_job_bytes_from_env()
    if "sessions" not in kwargs:
        kwargs["sessions"] = SessionSettings.from_env()
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
