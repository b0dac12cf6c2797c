"""Update jobs: a Redis Stream with one consumer group, samples under their own keys.

Submitting a job registers its class names in the label map in the same transaction
(`submit`): a refused or failed submission leaves neither a job nor a new name, and the job
carries the class indices it was given, which the learner trains with.

Life of a job::

    submit ──> queued ──claim/mark_running──> running ──complete──> done (acked)
                  ^                              │
                  └────── fail (attempt < 3) ────┤
                          release (SIGTERM)      └── fail on attempt 3 / died 3 times ──> failed (acked)

Ordering. The group hands out at most one job at a time: `claim` gives the oldest
unacknowledged job and nothing newer while that one is held by a live worker. One job is
one incremental step, and step N+1 must start from the model of step N, so learners can
never run two jobs at once anyway; a second worker is a hot standby that takes over a dead
worker's job. Hence jobs are processed strictly in the order posted (the order their
submissions committed), with one worker or several, including across retries and crashes.

Liveness. A worker holds its job while it is idle less than the `min_idle_ms` that other
workers pass to `claim`; a long step keeps it with `heartbeat`.

Retries. A job's attempts are the deliveries counted by the stream's pending list. `fail`
keeps the job pending until its third attempt, then marks it failed and acknowledges it;
`fail(..., permanent=True)` (no retry can help) marks it failed at once. A job failed with
`retry_after_s` is handed out again (first to its own worker) only once that delay is over
(``P:jobs:retry``), and nothing newer is handed out meanwhile. A worker that dies never
calls `fail`; another worker (or the same one, restarted under its name) claims the job
again after `min_idle_ms`, and a job delivered more than three times is marked failed unrun.

Idempotency. `submit_job` with an idempotency key records the key (24 hours) in the
transaction that queues the job; the same key again returns that job (``replayed``) for the
same request and refuses another request (`IdempotencyConflictError`), writing nothing.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import redis
from pydantic import BaseModel

from .arrays import check_images
from .boundary import guarded
from .chunks import DEFAULT_CHUNK_BYTES, read_samples, stage_redis_samples
from .connection import default_prefix
from .errors import (
    IdempotencyConflictError,
    JobStateError,
    JobTooLargeError,
    JobValidationError,
    UnknownJobError,
)
from .keys import JOB_GROUP, Keys
from .labels import LabelMap, LabelPlan, validate_name

JobState = Literal["queued", "running", "done", "failed", "rejected"]
# A job in one of these has ended: no worker runs it again.
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "rejected"})
STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed", "rejected")

DEFAULT_MAX_JOB_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 3
# How long an idempotency key is remembered (a client retrying after a timeout retries within
# minutes; a day covers a client that retries after its own restart).
IDEMPOTENCY_TTL_S = 24 * 3600
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# Samples of a failed job are kept for inspection this long, then Redis drops them.
DEFAULT_FAILED_SAMPLES_TTL_S = 7 * 24 * 3600
# Idle time given to a released job so that any worker's min_idle_ms is already passed;
# well below "now" in ms, which Redis needs for IDLE to be honoured.
_RELEASED_IDLE_MS = 2**31

# One atomic step of `claim`: the oldest pending job if its holder is us or gone idle,
# else nothing when someone holds it, else the next new job.
_CLAIM = """
local stream, group, me, min_idle = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local p = redis.call('XPENDING', stream, group, '-', '+', 1)
if #p > 0 then
  local id, owner, idle, n = p[1][1], p[1][2], tonumber(p[1][3]), tonumber(p[1][4])
  local retry_at = tonumber(redis.call('HGET', KEYS[2], id) or '0')
  if retry_at > tonumber(ARGV[4]) then
    return {'wait', id, retry_at - tonumber(ARGV[4])}
  end
  if owner == me or idle >= min_idle then
    redis.call('HDEL', KEYS[2], id)
    local c = redis.call('XCLAIM', stream, group, me, 0, id)
    if #c == 0 or not c[1] then
      redis.call('XACK', stream, group, id)
      return {'gone', id}
    end
    return {'job', id, c[1][2], n + 1}
  end
  return {'busy', id, owner, idle}
end
local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', 1, 'STREAMS', stream, '>')
if r and r[1] and #r[1][2] > 0 then
  local e = r[1][2][1]
  return {'job', e[1], e[2], 1}
end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local name, last = nil, nil
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == group then return {'empty', last} end
end
return {'empty', '0-0'}
"""

_COMPLETE = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'unknown'} end
if st == 'done' or st == 'rejected' then
  return {'done', redis.call('HGET', KEYS[1], 'version') or ''}
end
if st == 'failed' then return {'failed'} end
local sid = redis.call('HGET', KEYS[1], 'stream_id')
if sid then
  redis.call('XACK', KEYS[3], ARGV[1], sid)
  redis.call('HDEL', KEYS[4], sid)
end
redis.call('HSET', KEYS[1], 'state', 'done', 'version', ARGV[2], 'finished', ARGV[3])
redis.call('HDEL', KEYS[1], 'error', 'retry_at')
redis.call('DEL', KEYS[2])
return {'ok'}
"""

_FAIL = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'unknown'} end
if st == 'done' or st == 'failed' or st == 'rejected' then return {'terminal', st} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local n = math.max(attempts, failures)
local sid = redis.call('HGET', KEYS[1], 'stream_id')
if n >= tonumber(ARGV[4]) or ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[2], 'finished', ARGV[3])
  redis.call('HDEL', KEYS[1], 'retry_at')
  if sid then
    redis.call('XACK', KEYS[3], ARGV[1], sid)
    redis.call('HDEL', KEYS[4], sid)
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  return {'failed', n}
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'error', ARGV[2])
if sid and ARGV[7] ~= '' then
  redis.call('HSET', KEYS[4], sid, ARGV[7])
  redis.call('HSET', KEYS[1], 'retry_at', ARGV[8])
end
return {'queued', n}
"""

_MARK_RUNNING = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'unknown' end
if st == 'done' or st == 'failed' or st == 'rejected' then return st end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1])
return 'ok'
"""


# Reset the idle time of a job we hold, so no other worker takes it over; refuse when it is
# no longer ours (finished, or taken over after we were thought dead).
_HEARTBEAT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return 'not-pending' end
if p[1][2] ~= ARGV[2] then return 'other' end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 'ok'
"""


class JobStatus(BaseModel):
    """A job's status record, as `status` and `list` return it."""

    id: str
    state: JobState
    submitted: datetime
    started: datetime | None = None
    finished: datetime | None = None
    attempts: int = 0
    version: int | None = None
    error: str | None = None
    num_samples: int
    # Of num_samples, the last `validation` are the request's explicit validation set: held
    # out for the promotion gate in place of a random split of their classes, never trained.
    validation: int = 0
    classes: list[str]
    overrides: dict[str, Any] | None = None
    progress: float | None = None  # fraction of the training step done, 0..1
    progress_note: str | None = None
    # A failed attempt's job waits until then for its next one (retry backoff).
    retry_at: datetime | None = None
    # A done job: the version its step was built on, whether its commit moved the serving
    # pointer to the new version, and why not (a rollback or pin while it trained).
    built_on: int | None = None
    pointer_moved: bool | None = None
    note: str | None = None
    # The promotion gate's report on the job's version (learner.core.gate.GateReport).
    gate: dict[str, Any] | None = None
    # The fast path (learner/fast_path.py), two stages: the interim version committed first,
    # whether its commit served it (gate passed, pointer still on the parent, no pin), why
    # not, its gate verdict, and the seconds from the attempt's start to each commit; then
    # `version`, the full step's. `interim_withdrawn`: the full version was rejected and its
    # commit put the pointer back from the interim on the parent (or the job failed).
    interim_version: int | None = None
    interim_served: bool | None = None
    interim_note: str | None = None
    interim_gate: str | None = None
    interim_seconds: float | None = None
    full_seconds: float | None = None
    interim_withdrawn: bool | None = None


@dataclass(frozen=True)
class InterimRecord:
    """What a job's status says of its interim version (read inside a commit)."""

    version: int
    served: bool


@dataclass
class Job:
    """A claimed job: what the learner needs to run it."""

    id: str
    samples: np.ndarray  # uint8 (N, C, H, W)
    labels: list[str]  # one class name per sample
    overrides: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1  # this attempt's number, 1 on first delivery
    stream_id: str = ""
    submitted: datetime | None = None
    # Class name -> label-map index, as registered when the job was queued.
    class_indices: dict[str, int] = field(default_factory=dict)
    # The last `validation` samples are the request's explicit validation set (JobStatus).
    validation: int = 0

    @property
    def indices(self) -> list[int]:
        """The label-map index of each sample."""
        return [self.class_indices[name] for name in self.labels]


class SubmittedJob(BaseModel):
    """What `JobQueue.submit_job` queued."""

    job_id: str
    classes: list[str]  # distinct class names, in the order they were registered
    class_indices: dict[str, int]
    new_classes: list[str]  # names the label map did not hold before this job
    # True when an earlier submission with the same idempotency key (and request) made this
    # job: nothing new was queued or registered.
    replayed: bool = False


def _ts(v: bytes | None) -> datetime | None:
    return None if v is None or v == b"" else datetime.fromtimestamp(float(v), tz=UTC)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class _Idempotency:
    """A submission's idempotency key: where it is recorded and what request it stands for."""

    key: str  # the Redis key of its record
    digest: str

    @classmethod
    def of(
        cls, keys: Keys, idempotency_key: str, request_digest: str | None, job: _CheckedJob
    ) -> _Idempotency:
        if not isinstance(idempotency_key, str) or not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise JobValidationError("an idempotency key must be 1 to 255 visible ASCII characters")
        if request_digest is not None and (
            not isinstance(request_digest, str) or not 0 < len(request_digest) <= 512
        ):
            raise JobValidationError("a request digest must be a string of 1 to 512 characters")
        name = hashlib.sha256(idempotency_key.encode()).hexdigest()
        return cls(keys.idempotency(name), request_digest or _job_digest(job))

    def earlier(self, pipe: redis.client.Pipeline) -> SubmittedJob | None:
        """Under WATCH (immediate mode): the job an earlier submission with this key made,
        or None; `IdempotencyConflictError` when that submission was another request."""
        raw = pipe.get(self.key)
        if raw is None:
            return None
        record = json.loads(raw)
        if record["digest"] != self.digest:
            raise IdempotencyConflictError(
                f"this idempotency key was used for a different request (job "
                f"{record['job']['job_id']}); use a new key for a new request"
            )
        return SubmittedJob.model_validate({**record["job"], "replayed": True})

    def stage_record(self, pipe: redis.client.Pipeline, submitted: SubmittedJob) -> None:
        """Queue the record of this key (inside MULTI)."""
        record = {"digest": self.digest, "job": submitted.model_dump(mode="json")}
        pipe.set(self.key, json.dumps(record), ex=IDEMPOTENCY_TTL_S)


def _job_digest(job: _CheckedJob) -> str:
    """What makes two submissions the same request, when the caller gives no digest."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [job.samples.shape, job.labels_json, job.overrides_json, job.classes, job.validation]
        ).encode()
    )
    h.update(np.ascontiguousarray(job.samples).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class _CheckedJob:
    samples: np.ndarray
    labels: list[str]
    classes: list[str]
    labels_json: str
    overrides_json: str
    validation: int = 0


@guarded
class JobQueue:
    def __init__(
        self,
        r: redis.Redis,
        prefix: str | None = None,
        max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        sample_shape: Sequence[int] | None = None,
        failed_samples_ttl_s: int = DEFAULT_FAILED_SAMPLES_TTL_S,
        labels: LabelMap | None = None,
        sample_dir: Path | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        """`sample_shape`, when given, is the (C, H, W) every submitted image must have;
        `labels` is the label map jobs register their classes in (one on `r` by default);
        `sample_dir` is where upload sessions of the directory store keep samples
        (storage/sessions.py); `chunk_bytes` bounds one stored chunk of a job's samples."""
        self.r = r
        self.keys = Keys(prefix or default_prefix())
        self.labels = labels if labels is not None else LabelMap(r, self.keys.prefix)
        self.max_job_bytes = int(max_job_bytes)
        self.max_attempts = int(max_attempts)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.failed_samples_ttl_s = int(failed_samples_ttl_s)
        self.sample_dir = None if sample_dir is None else Path(sample_dir)
        self.chunk_bytes = int(chunk_bytes)
        self._claim = r.register_script(_CLAIM)
        self._complete = r.register_script(_COMPLETE)
        self._fail = r.register_script(_FAIL)
        self._mark_running = r.register_script(_MARK_RUNNING)
        self._heartbeat = r.register_script(_HEARTBEAT)
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the stream and its consumer group unless they exist (idempotent)."""
        try:
            self.r.xgroup_create(self.keys.jobs_stream, JOB_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- producer side -------------------------------------------------------------------

    def submit(
        self,
        samples: np.ndarray,
        labels: Sequence[str],
        overrides: dict[str, Any] | None = None,
        classes: Sequence[str] | None = None,
        validation: int = 0,
    ) -> str:
        """Queue a job; its id. See `submit_job`."""
        return self.submit_job(samples, labels, overrides, classes, validation=validation).job_id

    def submit_job(
        self,
        samples: np.ndarray,
        labels: Sequence[str],
        overrides: dict[str, Any] | None = None,
        classes: Sequence[str] | None = None,
        idempotency_key: str | None = None,
        request_digest: str | None = None,
        validation: int = 0,
    ) -> SubmittedJob:
        """Register the job's class names and queue it, in one transaction.

        `classes` (default: the distinct labels in order of appearance) are exactly the
        distinct labels, in the order new names get their indices. Raises
        `JobValidationError` / `JobTooLargeError` (or `LabelValidationError`) writing
        nothing; a store failure leaves nothing either (the transaction ran or not).

        `idempotency_key` (a client's retry token) is recorded with the job, in the same
        transaction, for 24 hours. A submission with a key already recorded writes nothing:
        with the same `request_digest` (default: a digest of samples, labels, overrides and
        classes) it returns the first submission's job with ``replayed=True``; with another
        it raises `IdempotencyConflictError`.

        `validation`: the last that many samples are an explicit validation set (the promotion
        gate's held-out images of their classes, never trained on); each of their labels must
        be one the training samples bring.
        """
        job = self._checked(samples, labels, overrides, classes, validation)
        idem = None
        if idempotency_key is not None:
            idem = _Idempotency.of(self.keys, idempotency_key, request_digest, job)
        job_id = uuid.uuid4().hex
        now = time.time()

        def txn(pipe: redis.client.Pipeline) -> SubmittedJob:
            if idem is not None and (earlier := idem.earlier(pipe)) is not None:
                return earlier  # nothing queued: the transaction executes empty
            plan = self.labels.plan_add(pipe, job.classes)
            submitted = SubmittedJob(
                job_id=job_id,
                classes=job.classes,
                class_indices=plan.indices,
                new_classes=plan.new,
            )
            pipe.multi()
            self.labels.stage_add(pipe, plan)
            self._stage_submit(pipe, job_id, now, job, plan)
            if idem is not None:
                idem.stage_record(pipe, submitted)
            return submitted

        watches = [*self.labels.watch_keys(), *([idem.key] if idem is not None else [])]
        return self.r.transaction(txn, *watches, value_from_callable=True)

    def _checked(
        self,
        samples: np.ndarray,
        labels: Sequence[str],
        overrides: dict[str, Any] | None,
        classes: Sequence[str] | None,
        validation: int = 0,
    ) -> _CheckedJob:
        check_images(samples, "samples", JobValidationError, chw=self.sample_shape)
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise JobValidationError("labels must be a sequence of class names, one per sample")
        labels = [validate_name(n) for n in labels]
        if len(labels) != samples.shape[0]:
            raise JobValidationError(
                f"{samples.shape[0]} samples but {len(labels)} labels; one label per sample"
            )
        _check_validation(labels, validation)
        order = _checked_classes(classes, labels)
        overrides_json = checked_overrides_json(overrides)
        labels_json = json.dumps(labels)
        size = samples.nbytes + len(labels_json) + len(overrides_json)
        if size > self.max_job_bytes:
            raise JobTooLargeError(
                f"job is {size} bytes ({samples.shape[0]} samples), the limit is {self.max_job_bytes} bytes"
            )
        return _CheckedJob(samples, labels, order, labels_json, overrides_json, int(validation))

    def _stage_submit(
        self,
        pipe: redis.client.Pipeline,
        job_id: str,
        now: float,
        job: _CheckedJob,
        plan: LabelPlan,
    ) -> None:
        # In bounded chunks (storage/chunks.py), so the worker reads them chunk by chunk.
        stage_redis_samples(pipe, self.keys.job_samples(job_id), job.samples, self.chunk_bytes)
        self.stage_job(
            pipe,
            job_id,
            now,
            int(job.samples.shape[0]),
            job.classes,
            job.labels_json,
            job.overrides_json,
            plan,
            job.validation,
        )

    def stage_job(
        self,
        pipe: redis.client.Pipeline,
        job_id: str,
        now: float,
        num_samples: int,
        classes: Sequence[str],
        labels_json: str,
        overrides_json: str,
        plan: LabelPlan,
        validation: int = 0,
    ) -> None:
        """Queue a job's record and its stream entry (inside MULTI, its samples already
        staged under ``P:job:<id>:samples``): what `submit_job` and an upload session's
        commit (storage/sessions.py) share, so both make the same kind of job."""
        k = self.keys
        pipe.hset(
            k.job(job_id),
            mapping={
                "id": job_id,
                "state": "queued",
                "submitted": repr(now),
                "attempts": 0,
                "failures": 0,
                "num_samples": int(num_samples),
                "classes": json.dumps(list(classes)),
                "class_indices": json.dumps(plan.indices),
                "labels": labels_json,
                "overrides": overrides_json,
                "validation": int(validation),
            },
        )
        pipe.zadd(k.jobs_index, {job_id: now})
        pipe.xadd(k.jobs_stream, {"job_id": job_id})

    # -- worker side ---------------------------------------------------------------------

    def claim(self, consumer: str, block_ms: int = 0, min_idle_ms: int = 60_000) -> Job | None:
        """The next job for `consumer`, waiting up to `block_ms` (0: don't wait); else None.

        First the oldest unacknowledged job: ours (a retry after `fail`, or a restart under
        the same consumer name) or another worker's that has been idle `min_idle_ms`
        (that worker is taken for dead). While another worker holds it, nothing newer is
        handed out. Then the next new job. A job's own worker must finish, `fail` or
        `release` it within `min_idle_ms` or it is taken over.
        """
        if not consumer:
            raise JobValidationError("consumer name must be non-empty")
        deadline = time.monotonic() + max(0, block_ms) / 1000
        stream = self.keys.jobs_stream
        while True:
            try:
                reply = self._claim(
                    keys=[stream, self.keys.jobs_retry],
                    args=[JOB_GROUP, consumer, int(min_idle_ms), _now_ms()],
                )
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                self.ensure_group()  # the stream was deleted under us (e.g. FLUSHDB)
                continue
            kind = reply[0]
            if kind == b"job":
                job = self._load(reply[1].decode(), reply[2], int(reply[3]))
                if job is not None:
                    return job
                continue
            if kind == b"gone":
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if kind == b"busy":
                # Wake when the holder would count as dead, but poll so we notice its ack.
                left = max(0.0, (min_idle_ms - int(reply[3])) / 1000)
                time.sleep(min(remaining, max(left, 0.005), 0.1))
            elif kind == b"wait":
                # The oldest job waits for its next attempt (retry backoff); nothing newer
                # may overtake it. Poll, so that a release or a finish is noticed.
                time.sleep(min(remaining, max(int(reply[2]) / 1000, 0.005), 0.1))
            else:  # empty: wait for an entry after the last one handed out
                # In slices of at most a second, so a client socket_timeout never trips.
                wait_ms = max(1, min(1000, int(remaining * 1000)))
                self.r.xread({stream: reply[1]}, count=1, block=wait_ms)

    def _load(self, stream_id: str, fields: list[bytes], deliveries: int) -> Job | None:
        entry = dict(zip(fields[::2], fields[1::2], strict=True))
        job_id = entry.get(b"job_id", b"").decode()
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(k.job(job_id))
        pipe.exists(k.job_samples(job_id))
        rec, smp = pipe.execute()
        state = rec.get(b"state", b"").decode()
        if not rec or state in FINAL_STATES or not smp:
            # Finished (its ack was lost) or its records are gone: nothing to run.
            if rec and state not in FINAL_STATES:
                self._finish_failed(job_id, stream_id, "job samples are missing")
            self.r.xack(k.jobs_stream, JOB_GROUP, stream_id)
            return None
        if deliveries > self.max_attempts:
            self._finish_failed(
                job_id,
                stream_id,
                f"worker stopped without finishing in each of {deliveries - 1} attempts"
                + (f"; last error: {rec[b'error'].decode()}" if rec.get(b"error") else ""),
            )
            return None
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(k.job(job_id), mapping={"attempts": deliveries, "stream_id": stream_id})
        pipe.hdel(k.job(job_id), "retry_at")
        pipe.execute()
        samples = read_samples(self.r, k.job_samples(job_id), self.sample_dir)
        if samples is None:  # gone between the two reads (finished elsewhere, expired)
            self._finish_failed(job_id, stream_id, "job samples are missing")
            return None
        labels = json.loads(rec[b"labels"])
        if b"class_indices" in rec:
            class_indices = {str(n): int(i) for n, i in json.loads(rec[b"class_indices"]).items()}
        else:  # queued before jobs carried their indices: register the names now
            order = json.loads(rec.get(b"classes", b"[]")) or list(dict.fromkeys(labels))
            class_indices = dict(zip(order, self.labels.get_or_add(order), strict=True))
        return Job(
            id=job_id,
            samples=samples,
            labels=labels,
            overrides=json.loads(rec.get(b"overrides", b"{}")),
            attempts=deliveries,
            stream_id=stream_id,
            submitted=_ts(rec.get(b"submitted")),
            class_indices=class_indices,
            validation=int(rec.get(b"validation", b"0")),
        )

    def _finish_failed(self, job_id: str, stream_id: str, error: str) -> None:
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            k.job(job_id),
            mapping={
                "state": "failed",
                "error": error,
                "finished": repr(time.time()),
                "stream_id": stream_id,
            },
        )
        pipe.xack(k.jobs_stream, JOB_GROUP, stream_id)
        pipe.hdel(k.jobs_retry, stream_id)
        pipe.pexpire(k.job_samples(job_id), self.failed_samples_ttl_s * 1000)
        pipe.execute()

    def heartbeat(self, job: Job, consumer: str) -> None:
        """Tell the group that `consumer` is still working on `job` (resets its idle time).

        A step longer than `min_idle_ms` must call this more often than that, or a standby
        worker takes the job over. Raises `JobStateError` when the job is no longer ours
        (finished, or taken over): the worker should then stop working on it.
        """
        res = self._heartbeat(
            keys=[self.keys.jobs_stream], args=[JOB_GROUP, consumer, job.stream_id]
        )
        if res == b"other":
            raise JobStateError(f"job {job.id} was taken over by another worker")
        if res != b"ok":
            raise JobStateError(f"job {job.id} is no longer pending")

    def set_progress(self, job_id: str, fraction: float, note: str = "") -> None:
        """Record how far the job's step is (shown in its status); only while it runs."""
        key = self.keys.job(job_id)
        # Not atomic with the state check: a late update on a finished job only rewrites
        # the progress fields, which the status of a done job ignores.
        if self.r.hget(key, "state") == b"running":
            self.r.hset(
                key,
                mapping={
                    "progress": repr(max(0.0, min(1.0, float(fraction)))),
                    "progress_note": note[:200],
                },
            )

    def mark_running(self, job_id: str) -> None:
        """Record that training started (state running, start time)."""
        res = self._mark_running(keys=[self.keys.job(job_id)], args=[repr(time.time())])
        if res == b"unknown":
            raise UnknownJobError(f"no job with id {job_id!r}")
        if res != b"ok":
            raise JobStateError(f"job {job_id} is already {res.decode()}")

    def complete(self, job_id: str, version: int) -> None:
        """Acknowledge the job and mark it done with the `version` it produced.

        Call only once that version is saved. Completing again with the same version is a
        no-op; with another version, or after the job failed, it raises `JobStateError`.
        """
        k = self.keys
        res = self._complete(
            keys=[k.job(job_id), k.job_samples(job_id), k.jobs_stream, k.jobs_retry],
            args=[JOB_GROUP, int(version), repr(time.time())],
        )
        if res[0] == b"unknown":
            raise UnknownJobError(f"no job with id {job_id!r}")
        if res[0] == b"done" and res[1] != str(int(version)).encode():
            raise JobStateError(f"job {job_id} is already done with version {res[1].decode()}")
        if res[0] == b"failed":
            raise JobStateError(f"job {job_id} has failed; it cannot be completed")

    # -- completing inside a bigger transaction (Storage.commit_step) --------------------

    def read_interim(self, pipe: redis.client.Pipeline, job_id: str) -> InterimRecord | None:
        """Under WATCH of `watch_keys` (immediate mode): the job's interim version, if any."""
        version, served = pipe.hmget(self.keys.job(job_id), ["interim_version", "interim_served"])
        return None if version is None else InterimRecord(int(version), served == b"1")

    def stage_fields(
        self, pipe: redis.client.Pipeline, job_id: str, fields: Mapping[str, str | int | float]
    ) -> None:
        """Queue status fields of a running job (the interim's record), inside MULTI."""
        pipe.hset(self.keys.job(job_id), mapping={k: str(v) for k, v in fields.items()})

    def watch_keys(self, job_id: str) -> builtins.list[str]:
        """The keys a caller of `check_completable` must WATCH."""
        return [self.keys.job(job_id)]

    def check_completable(self, pipe: redis.client.Pipeline, job_id: str) -> bytes | None:
        """Under WATCH (immediate mode): refuse a job that is unknown, done or failed; its
        stream entry id, for `stage_complete`."""
        state, stream_id = pipe.hmget(self.keys.job(job_id), ["state", "stream_id"])
        if state is None:
            raise UnknownJobError(f"no job with id {job_id!r}")
        if state is not None and state.decode() in FINAL_STATES:
            raise JobStateError(f"job {job_id} is already {state.decode()}")
        return stream_id

    def stage_complete(
        self,
        pipe: redis.client.Pipeline,
        job_id: str,
        stream_id: bytes | None,
        version: int,
        outcome: Mapping[str, str | int] | None = None,
    ) -> None:
        """Queue what `complete` does, inside MULTI (after `check_completable`); `outcome`
        adds status fields (`JobStatus.built_on`, ``pointer_moved`` as "1"/"0", ``note``)."""
        k = self.keys
        if stream_id:
            pipe.xack(k.jobs_stream, JOB_GROUP, stream_id)
            pipe.hdel(k.jobs_retry, stream_id)
        pipe.hset(
            k.job(job_id),
            mapping={
                "state": "done",
                "version": int(version),
                "finished": repr(time.time()),
                "progress": "1.0",
                **dict(outcome or {}),
            },
        )
        pipe.hdel(k.job(job_id), "error", "retry_at")
        pipe.delete(k.job_samples(job_id))

    def fail(
        self, job_id: str, error: str, *, retry_after_s: float = 0.0, permanent: bool = False
    ) -> JobState:
        """Record a failed attempt; the job's new state (queued again, or failed for good).

        A job queued again is not handed out (to any worker) for `retry_after_s` seconds,
        and nothing newer overtakes it meanwhile. `permanent`: no retry can succeed (e.g.
        the parent version cannot be loaded): the job fails now, whatever its attempts.
        """
        k = self.keys
        now_ms = _now_ms()
        at_ms = now_ms + max(0, round(retry_after_s * 1000))
        res = self._fail(
            keys=[k.job(job_id), k.job_samples(job_id), k.jobs_stream, k.jobs_retry],
            args=[
                JOB_GROUP,
                str(error)[:10_000],
                repr(now_ms / 1000),
                self.max_attempts,
                self.failed_samples_ttl_s * 1000,
                "1" if permanent else "0",
                str(at_ms) if at_ms > now_ms else "",
                repr(at_ms / 1000),
            ],
        )
        if res[0] == b"unknown":
            raise UnknownJobError(f"no job with id {job_id!r}")
        if res[0] == b"terminal":
            raise JobStateError(f"job {job_id} is already {res[1].decode()}")
        return "failed" if res[0] == b"failed" else "queued"

    def release(self, job_id: str) -> None:
        """Give a claimed job back unfinished (e.g. on SIGTERM) without spending an attempt.

        Any worker may claim it at once; it keeps its place at the head of the queue.
        """
        k = self.keys
        rec = self.r.hmget(k.job(job_id), ["state", "stream_id", "attempts"])
        if rec[0] is None:
            raise UnknownJobError(f"no job with id {job_id!r}")
        if rec[0] is not None and rec[0].decode() in FINAL_STATES or rec[1] is None:
            return
        self.r.hdel(k.jobs_retry, rec[1])
        pending = self.r.xpending_range(k.jobs_stream, JOB_GROUP, rec[1], rec[1], 1)
        if pending:
            self.r.xclaim(
                k.jobs_stream,
                JOB_GROUP,
                pending[0]["consumer"],
                0,
                [rec[1]],
                idle=_RELEASED_IDLE_MS,
                retrycount=max(0, int(rec[2] or 0) - 1),
                justid=True,
            )
        self.r.hset(
            k.job(job_id), mapping={"state": "queued", "attempts": max(0, int(rec[2] or 0) - 1)}
        )

    # -- inspection ----------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        rec = self.r.hgetall(self.keys.job(job_id))
        if not rec:
            raise UnknownJobError(f"no job with id {job_id!r}")
        return self._status(rec)

    @staticmethod
    def _status(rec: dict[bytes, bytes]) -> JobStatus:
        def s(name: str) -> str | None:
            v = rec.get(name.encode())
            return None if v is None else v.decode()

        version = s("version")
        return JobStatus(
            id=s("id") or "",
            state=s("state"),  # type: ignore[arg-type]
            submitted=_ts(rec.get(b"submitted")),  # type: ignore[arg-type]
            started=_ts(rec.get(b"started")),
            finished=_ts(rec.get(b"finished")),
            attempts=int(s("attempts") or 0),
            version=None if version in (None, "") else int(version),
            error=s("error"),
            num_samples=int(s("num_samples") or 0),
            validation=int(s("validation") or 0),
            classes=json.loads(s("classes") or "[]"),
            overrides=json.loads(s("overrides") or "{}") or None,
            progress=None if s("progress") is None else float(s("progress")),
            progress_note=s("progress_note"),
            retry_at=_ts(rec.get(b"retry_at")),
            built_on=None if s("built_on") is None else int(s("built_on")),
            pointer_moved=None if s("pointer_moved") is None else s("pointer_moved") == "1",
            note=s("note"),
            gate=None if s("gate") is None else json.loads(s("gate")),
            **_interim_fields(s),
        )

    def list(self, limit: int = 50) -> builtins.list[JobStatus]:
        """The newest `limit` jobs, newest first."""
        ids = self.r.zrevrange(self.keys.jobs_index, 0, max(0, int(limit)) - 1) if limit > 0 else []
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id.decode()))
        return [self._status(rec) for rec in pipe.execute() if rec]

    def counts_by_state(self) -> dict[str, int]:
        ids = self.r.zrange(self.keys.jobs_index, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.keys.job(job_id.decode()), "state")
        counts = dict.fromkeys(STATES, 0)
        for st in pipe.execute():
            if st is not None:
                counts[st.decode()] = counts.get(st.decode(), 0) + 1
        return counts

    def pending(self) -> int:
        """Jobs handed to a worker and not yet acknowledged (0 or 1, see the module doc)."""
        info = self.r.xpending(self.keys.jobs_stream, JOB_GROUP)
        return int(info["pending"])


def _interim_fields(s: Callable[[str], str | None]) -> dict[str, Any]:
    """The fast path's fields of a status record (absent: None)."""

    def num(name: str, kind: type) -> Any:
        v = s(name)
        return None if v in (None, "") else kind(v)

    def flag(name: str) -> bool | None:
        v = s(name)
        return None if v is None else v == "1"

    return {
        "interim_version": num("interim_version", int),
        "interim_served": flag("interim_served"),
        "interim_note": s("interim_note"),
        "interim_gate": s("interim_gate"),
        "interim_seconds": num("interim_seconds", float),
        "full_seconds": num("full_seconds", float),
        "interim_withdrawn": flag("interim_withdrawn"),
    }


def checked_overrides_json(overrides: dict[str, Any] | None) -> str:
    """A job's overrides as stored: a JSON object (the learner validates the knobs)."""
    if overrides is not None and not isinstance(overrides, dict):
        raise JobValidationError(f"overrides must be a dict, got {type(overrides).__name__}")
    try:
        return json.dumps(overrides or {}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise JobValidationError(f"overrides must be JSON-serialisable: {e}") from None


def _check_validation(labels: builtins.list[str], validation: int) -> None:
    """The explicit validation set: the last ``validation`` samples, after at least one
    training sample, of classes the training samples bring (a class with validation images
    and nothing to learn from would be judged on what it never saw)."""
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 0:
        raise JobValidationError("validation must be a count of samples, 0 or more")
    if validation >= len(labels):
        raise JobValidationError("a job needs training samples besides its validation set")
    trained = set(labels[: len(labels) - validation])
    stray = sorted(set(labels[len(labels) - validation :]) - trained)
    if stray:
        raise JobValidationError(
            f"validation images of {', '.join(stray)}, which the job brings no training "
            "images of; validation images must be of the job's own classes"
        )


def _checked_classes(
    classes: Sequence[str] | None, labels: builtins.list[str]
) -> builtins.list[str]:
    distinct = list(dict.fromkeys(labels))
    if classes is None:
        return distinct
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise JobValidationError("classes must be a sequence of class names")
    order = [validate_name(n) for n in classes]
    if len(set(order)) != len(order) or set(order) != set(distinct):
        raise JobValidationError("classes must be exactly the distinct labels, each once")
    return order


__all__ = ["Job", "JobQueue", "JobState", "JobStatus", "SubmittedJob"]
