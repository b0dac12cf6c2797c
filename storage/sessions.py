"""Upload sessions: a learning job posted in batches, for jobs larger than one request body.

Life of a session::

    open(classes) ──> open ──append(batch)*──> commit ──> a queued job (JobQueue)
                        │
                        ├── abort ──> gone (its samples deleted at once)
                        └── no change for ttl_s ──> gone (expired; nothing left behind)

Why. One /learn request holds a whole job in one body and one process (the job size limit,
64 MiB of decoded samples, is what a body and a worker's memory allow). A session stores each
batch as it arrives, in chunks of at most ``chunk_bytes``, so no API worker ever holds more
than one batch; the commit moves the chunks under the job's key without reading them, and
the learner worker reads them chunk by chunk (storage/chunks.py).

Where the samples live (``BSCE_SESSION_STORE``): ``redis`` (the default, for small
deployments: the chunks are a hash under the session's key) or a directory on storage every
host of the deployment mounts (``<dir>/<prefix>/sessions/<sid>/``, one file per chunk; Redis
holds the session's record and the chunk file names only). Either way the session's record
and chunk list are in Redis, and every change is one MULTI/EXEC under WATCH of the record:
an append that fails (refused, a lost race, a store error) leaves the session as it was, and
the files it wrote are deleted.

Expiry. Both keys of a session expire ``ttl_s`` after its last append. The directory store
has no expiry of its own: `sweep` (run on every open and commit) deletes a session's folder
once its record is gone or no longer open, and a committed session's folder once its job's
samples key is gone (the job done, or failed and its samples expired).

A commit is the same transaction as `JobQueue.submit_job`: the class names are registered in
the label map and the job queued together, with the same record (the worker sees an ordinary
job, held-out split and all). Committing a committed session again answers its job
(``replayed``), so a client may retry a commit whose answer it lost. An append may name the
sample count it expects the session to hold (``expected_samples``): a retried append that
already went through is then refused (`SessionConflictError`) instead of stored twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field

from .arrays import check_images, header
from .boundary import guarded
from .chunks import DEFAULT_CHUNK_BYTES, STORE_DIR, STORE_REDIS, chunk_field, split
from .connection import default_prefix
from .errors import JobTooLargeError, JobValidationError, StorageError
from .jobs import JobQueue, SubmittedJob, checked_overrides_json
from .keys import Keys
from .labels import validate_name

DEFAULT_TTL_S = 3600
DEFAULT_MAX_SAMPLES = 200_000
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
# A folder younger than this is left alone by `sweep`: it may be between its files and the
# transaction that records them.
SWEEP_GRACE_S = 120.0
_JOB_MARKER = "job"  # a committed session's folder: the id of the job that reads it
_LABEL_DTYPE = np.dtype("<u2")
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class UnknownSessionError(StorageError, KeyError):
    """No open or committed session with that id (never opened, aborted or expired)."""


class SessionStateError(StorageError, RuntimeError):
    """The session is committed: it takes no more batches."""


class SessionConflictError(SessionStateError):
    """An append's ``expected_samples`` is not the session's sample count."""


class SessionTooLargeError(JobTooLargeError):
    """A batch would take the session over its sample or byte cap."""


class SessionSettings(BaseModel):
    """Where sessions keep samples and how much they may hold (environment:
    ``BSCE_SESSION_STORE``, ``BSCE_SESSION_TTL_S``, ``BSCE_SESSION_MAX_SAMPLES``,
    ``BSCE_SESSION_MAX_BYTES``, ``BSCE_SESSION_CHUNK_BYTES``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = Field(STORE_REDIS, description='"redis", or a directory all hosts share')
    ttl_s: int = Field(DEFAULT_TTL_S, ge=1)
    max_samples: int = Field(DEFAULT_MAX_SAMPLES, ge=1)
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=1024)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SessionSettings:
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for name in cls.model_fields:
            value = env.get(f"BSCE_SESSION_{name.upper()}", "").strip()
            if value:
                raw[name] = value
        try:
            return cls.model_validate(raw)
        except ValueError as e:
            raise ValueError(f"bad BSCE_SESSION_* setting: {e}") from None

    def sample_dir(self, prefix: str) -> Path | None:
        """The folder of the directory store's session folders (None: the Redis store)."""
        if self.store == STORE_REDIS:
            return None
        return Path(self.store) / prefix / "sessions"


class SessionInfo(BaseModel):
    """A session's record, as `info` and every change return it."""

    id: str
    state: Literal["open", "committed"]
    created: float
    expires_in_s: int | None = None  # seconds left before it expires; None: no expiry
    classes: list[str]
    counts: list[int]  # samples per class, in `classes` order
    num_samples: int
    num_chunks: int
    bytes: int
    sample_shape: list[int] | None = None  # (C, H, W), set by the first batch
    overrides: dict[str, Any] | None = None
    store: str
    job: SubmittedJob | None = None  # the job a commit made


@guarded
class SessionStore:
    def __init__(
        self,
        r: redis.Redis,
        prefix: str | None,
        jobs: JobQueue,
        settings: SessionSettings | None = None,
    ) -> None:
        self.r = r
        self.keys = Keys(prefix or default_prefix())
        self.jobs = jobs
        self.settings = settings or SessionSettings()
        self.dir = self.settings.sample_dir(self.keys.prefix)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self, classes: list[str], overrides: dict[str, Any] | None = None) -> SessionInfo:
        """A new open session for samples of ``classes`` (each once; their order is the
        order new classes get their indices, as /learn's ``classes``)."""
        if isinstance(classes, str) or not isinstance(classes, list | tuple) or not classes:
            raise JobValidationError("a session needs a non-empty list of class names")
        order = [validate_name(n) for n in classes]
        if len(set(order)) != len(order):
            raise JobValidationError("classes must list each class once")
        overrides_json = checked_overrides_json(overrides)
        self.sweep()
        sid = uuid.uuid4().hex
        now = time.time()
        key = self.keys.session(sid)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "state": "open",
                "created": repr(now),
                "classes": json.dumps(order),
                "counts": json.dumps([0] * len(order)),
                "num_samples": 0,
                "num_chunks": 0,
                "bytes": 0,
                "shape": "",
                "overrides": overrides_json,
                "store": STORE_DIR if self.dir is not None else STORE_REDIS,
            },
        )
        pipe.expire(key, self.settings.ttl_s)
        pipe.execute()
        return self.info(sid)

    def append(
        self,
        session_id: str,
        samples: np.ndarray,
        labels: list[str],
        expected_samples: int | None = None,
    ) -> SessionInfo:
        """Add a batch (uint8 (N, C, H, W), one class name per sample) in chunks; all or
        nothing. Refused: an unknown or committed session, a label not among its classes,
        images of another shape than its first batch's, a batch over its caps, an
        ``expected_samples`` other than its count."""
        _checked_id(session_id)
        check_images(samples, "samples", JobValidationError, chw=self.jobs.sample_shape)
        if isinstance(labels, str) or not isinstance(labels, list | tuple):
            raise JobValidationError("labels must be a list of class names, one per sample")
        if len(labels) != samples.shape[0]:
            raise JobValidationError(
                f"{samples.shape[0]} samples but {len(labels)} labels; one label per sample"
            )
        key, chunks_key = self.keys.session(session_id), self.keys.session_chunks(session_id)
        parts = split(samples, self.settings.chunk_bytes)
        files = self._write_files(session_id, parts) if self.dir is not None else None

        def txn(pipe: redis.client.Pipeline) -> None:
            meta = _Meta.read(pipe, key, session_id)
            meta.check_open()
            if expected_samples is not None and expected_samples != meta.num_samples:
                raise SessionConflictError(
                    f"the session holds {meta.num_samples} samples, not the "
                    f"{expected_samples} this batch expects (was an earlier try stored?)"
                )
            shape = list(samples.shape[1:])
            if meta.shape is not None and meta.shape != shape:
                raise JobValidationError(
                    f"images of shape {tuple(shape)}; this session holds {tuple(meta.shape)}"
                )
            index = {name: i for i, name in enumerate(meta.classes)}
            unknown = sorted({str(n) for n in labels if n not in index})[:5]
            if unknown:
                raise JobValidationError(
                    f"labels {unknown} are not among the session's classes {meta.classes[:20]}"
                )
            n_total = meta.num_samples + int(samples.shape[0])
            b_total = meta.bytes + int(samples.nbytes)
            if n_total > self.settings.max_samples:
                raise SessionTooLargeError(
                    f"the session would hold {n_total} samples; the limit is "
                    f"{self.settings.max_samples}"
                )
            if b_total > self.settings.max_bytes:
                raise SessionTooLargeError(
                    f"the session would hold {b_total} bytes of samples; the limit is "
                    f"{self.settings.max_bytes}"
                )
            codes = np.array([index[n] for n in labels], dtype=_LABEL_DTYPE)
            counts = list(meta.counts)
            for c, k in zip(*np.unique(codes, return_counts=True), strict=True):
                counts[int(c)] += int(k)
            mapping: dict[str, bytes] = {}
            start = 0
            for i, part in enumerate(parts):
                n = meta.num_chunks + i
                mapping[chunk_field(n)] = (
                    files[i].encode() if files is not None else np.ascontiguousarray(part).tobytes()
                )
                mapping[f"l{n}"] = codes[start : start + len(part)].tobytes()
                start += len(part)
            pipe.multi()
            pipe.hset(chunks_key, mapping=mapping)  # type: ignore[arg-type]
            pipe.hset(
                key,
                mapping={
                    "num_samples": n_total,
                    "num_chunks": meta.num_chunks + len(parts),
                    "bytes": b_total,
                    "counts": json.dumps(counts),
                    "shape": json.dumps(shape),
                },
            )
            pipe.expire(key, self.settings.ttl_s)
            pipe.expire(chunks_key, self.settings.ttl_s)

        try:
            self.r.transaction(txn, key)
        except BaseException:
            if files is not None:
                self._remove_files(session_id, files)
            raise
        return self.info(session_id)

    def info(self, session_id: str) -> SessionInfo:
        _checked_id(session_id)
        key = self.keys.session(session_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.ttl(key)
        raw, ttl = pipe.execute()
        if not raw:
            raise UnknownSessionError(f"no upload session {session_id!r} (unknown or expired)")
        meta = _Meta.parse(raw, session_id)
        return SessionInfo(
            id=session_id,
            state=meta.state,  # type: ignore[arg-type]
            created=meta.created,
            expires_in_s=int(ttl) if ttl is not None and int(ttl) >= 0 else None,
            classes=meta.classes,
            counts=meta.counts,
            num_samples=meta.num_samples,
            num_chunks=meta.num_chunks,
            bytes=meta.bytes,
            sample_shape=meta.shape,
            overrides=meta.overrides or None,
            store=meta.store,
            job=meta.job,
        )

    def commit(self, session_id: str) -> SubmittedJob:
        """Queue the session's samples as one job (the class names registered in the same
        transaction), moving its chunks under the job's samples key unread. A committed
        session answers its job again (``replayed``). Refused: unknown, empty, or a class
        without samples."""
        _checked_id(session_id)
        self.sweep()
        key, chunks_key = self.keys.session(session_id), self.keys.session_chunks(session_id)
        job_id = uuid.uuid4().hex
        now = time.time()
        marker = None if self.dir is None else self.dir / session_id / _JOB_MARKER

        def txn(pipe: redis.client.Pipeline) -> SubmittedJob:
            meta = _Meta.read(pipe, key, session_id)
            if meta.state == "committed" and meta.job is not None:
                return meta.job.model_copy(update={"replayed": True})
            meta.check_open()
            if meta.num_samples == 0:
                raise JobValidationError("the session holds no samples; append batches first")
            empty = [c for c, n in zip(meta.classes, meta.counts, strict=True) if n == 0]
            if empty:
                raise JobValidationError(
                    f"classes {empty[:5]} have no samples; every class a session names "
                    "needs at least one (open a session with only the classes you post)"
                )
            fields = [f"l{n}" for n in range(meta.num_chunks)]
            raw = pipe.hmget(chunks_key, fields)
            if any(v is None for v in raw):
                raise StorageError(f"upload session {session_id} lost chunks; open a new one")
            codes = np.concatenate([np.frombuffer(v, dtype=_LABEL_DTYPE) for v in raw])
            labels = [meta.classes[int(c)] for c in codes]
            plan = self.jobs.labels.plan_add(pipe, meta.classes)
            submitted = SubmittedJob(
                job_id=job_id,
                classes=meta.classes,
                class_indices=plan.indices,
                new_classes=plan.new,
            )
            samples_key = self.keys.job_samples(job_id)
            # Written, not built from an array: the samples are never read here.
            head = json.loads(header(np.empty((0, *(meta.shape or [])), dtype=np.uint8)))
            head["shape"][0] = meta.num_samples
            if marker is not None:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(job_id)
            pipe.multi()
            self.jobs.labels.stage_add(pipe, plan)
            pipe.rename(chunks_key, samples_key)
            pipe.persist(samples_key)  # the session's expiry does not follow its samples
            pipe.hdel(samples_key, *fields)
            pipe.hset(
                samples_key,
                mapping={
                    "header": json.dumps(head),
                    "chunks": meta.num_chunks,
                    "store": meta.store,
                    **({"dir": session_id} if meta.store == STORE_DIR else {}),
                },
            )
            self.jobs.stage_job(
                pipe,
                job_id,
                now,
                meta.num_samples,
                meta.classes,
                json.dumps(labels),
                json.dumps(meta.overrides or {}),
                plan,
            )
            pipe.hset(
                key,
                mapping={"state": "committed", "job": submitted.model_dump_json()},
            )
            pipe.expire(key, self.settings.ttl_s)
            return submitted

        watches = [key, chunks_key, *self.jobs.labels.watch_keys()]
        try:
            return self.r.transaction(txn, *watches, value_from_callable=True)
        except BaseException:
            if marker is not None and marker.exists() and marker.read_text() == job_id:
                marker.unlink()
            raise

    def abort(self, session_id: str) -> None:
        """Discard an open session and its samples. A committed one is refused (its samples
        belong to its job now)."""
        _checked_id(session_id)
        key, chunks_key = self.keys.session(session_id), self.keys.session_chunks(session_id)

        def txn(pipe: redis.client.Pipeline) -> None:
            _Meta.read(pipe, key, session_id).check_open()
            pipe.multi()
            pipe.delete(key, chunks_key)

        self.r.transaction(txn, key)
        if self.dir is not None:
            shutil.rmtree(self.dir / session_id, ignore_errors=True)

    def sweep(self, grace_s: float = SWEEP_GRACE_S) -> int:
        """Directory store: delete the folders no session or job needs (see the module
        doc); the number deleted. The Redis store expires its keys by itself."""
        if self.dir is None or not self.dir.is_dir():
            return 0
        removed = 0
        now = time.time()
        for folder in self.dir.iterdir():
            try:
                if not folder.is_dir() or now - folder.stat().st_mtime < grace_s:
                    continue
                if self._needed(folder):
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        return removed

    # -- the directory store ---------------------------------------------------------------

    def _needed(self, folder: Path) -> bool:
        marker = folder / _JOB_MARKER
        if marker.exists():
            return bool(self.r.exists(self.keys.job_samples(marker.read_text().strip())))
        state = self.r.hget(self.keys.session(folder.name), "state")
        return state == b"open"

    def _write_files(self, session_id: str, parts: list[np.ndarray]) -> list[str]:
        assert self.dir is not None
        folder = self.dir / session_id
        folder.mkdir(parents=True, exist_ok=True)
        names: list[str] = []
        try:
            for part in parts:
                name = f"{uuid.uuid4().hex}.u8"
                tmp = folder / f"{name}.tmp"
                with open(tmp, "wb") as f:
                    f.write(np.ascontiguousarray(part).tobytes())
                    f.flush()
                    os.fsync(f.fileno())
                tmp.rename(folder / name)
                names.append(name)
        except BaseException:
            self._remove_files(session_id, names)
            raise
        return names

    def _remove_files(self, session_id: str, names: list[str]) -> None:
        assert self.dir is not None
        for name in names:
            (self.dir / session_id / name).unlink(missing_ok=True)


def _checked_id(session_id: str) -> str:
    # Ids are uuid4 hex: anything else could name another key, or a path outside the store.
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise UnknownSessionError(f"no upload session {session_id!r} (unknown or expired)")
    return session_id


class _Meta(BaseModel):
    """A session record, parsed."""

    state: str
    created: float
    classes: list[str]
    counts: list[int]
    num_samples: int
    num_chunks: int
    bytes: int
    shape: list[int] | None
    overrides: dict[str, Any]
    store: str
    job: SubmittedJob | None = None
    session_id: str

    @classmethod
    def read(cls, pipe: redis.client.Pipeline, key: str, session_id: str) -> _Meta:
        _checked_id(session_id)
        raw = pipe.hgetall(key)
        if not raw:
            raise UnknownSessionError(f"no upload session {session_id!r} (unknown or expired)")
        return cls.parse(raw, session_id)

    @classmethod
    def parse(cls, raw: dict[bytes, bytes], session_id: str) -> _Meta:
        def s(name: str) -> str:
            return raw.get(name.encode(), b"").decode()

        return cls(
            state=s("state"),
            created=float(s("created") or 0),
            classes=json.loads(s("classes") or "[]"),
            counts=json.loads(s("counts") or "[]"),
            num_samples=int(s("num_samples") or 0),
            num_chunks=int(s("num_chunks") or 0),
            bytes=int(s("bytes") or 0),
            shape=json.loads(s("shape")) if s("shape") else None,
            overrides=json.loads(s("overrides") or "{}"),
            store=s("store") or STORE_REDIS,
            job=SubmittedJob.model_validate_json(s("job")) if s("job") else None,
            session_id=session_id,
        )

    def check_open(self) -> None:
        if self.state != "open":
            raise SessionStateError(
                f"upload session {self.session_id} is {self.state}"
                + (f" (job {self.job.job_id})" if self.job is not None else "")
                + "; it takes no more changes"
            )


__all__ = [
    "SessionConflictError",
    "SessionInfo",
    "SessionSettings",
    "SessionStateError",
    "SessionStore",
    "SessionTooLargeError",
    "UnknownSessionError",
]
