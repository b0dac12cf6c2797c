"""Redis and model-store access for bsce-serve: exemplar memory, label map, update jobs and
model versions. Knows nothing of training or HTTP; every store takes a Redis client from
`connect` and a key prefix (`storage.keys` has the layout).

The interface. `Storage` (from `open_storage`) holds the four stores; callers type against
it and catch `storage.errors` types only: a Redis failure arrives as `StoreUnavailableError`
or `StoreResponseError` (storage/boundary.py), bad input as an `InvalidInputError` (also a
`ValueError`), an unknown id as a `KeyError` kind. Nothing outside this package imports
redis.

A learner worker, in outline::

    st = open_storage()                                   # REDIS_URL or embedded Redis
    st.versions.ensure_initial(make_version0)             # once per deployment, race-safe;
                                                          # returns (tensors, meta[, memory])
    while running:
        job = st.jobs.claim("learner-1", block_ms=5000, min_idle_ms=10 * 60_000)
        if job is None:
            continue
        st.jobs.mark_running(job.id)
        parent = st.versions.current()                    # (the newest while pinned)
        tensors, meta = st.versions.load(parent)          # weights, metadata, rng.state
        memory = st.versions.memory(parent)               # the parent's memory generation
        try:
            ...train on job.samples with labels job.indices (registered when the job was
               queued), calling st.jobs.heartbeat(job, "learner-1") every epoch, select
               exemplars...
            st.commit_step(job.id, st.versions.next_version(), new_tensors,
                           {"class_names": ..., "counts": ..., "parent_version": parent,
                            "step": ..., "metrics": ...}, new_memory)
        except Exception as e:
            st.jobs.fail(job.id, repr(e), retry_after_s=5)  # retried after 5 s; failed
                                                          # after 3 attempts
    # on SIGTERM mid-step: st.jobs.release(job.id)

`jobs.submit` (`submit_job`) registers the job's class names and queues it in one
transaction. `commit_step` is the one transaction that makes a step visible (version
registered with its memory generation, pointer moved and announced unless pinned, memory
generations no version needs collected, job acknowledged): a worker killed before it
leaves nothing half-written, and the retried job saves the same version number. Memory
generations and the rule that keeps them: storage/versions.py.
"""

from . import connection as _connection
from .boundary import boundary
from .connection import default_data_dir, default_prefix
from .errors import (
    ExemplarValidationError,
    IdempotencyConflictError,
    InvalidInputError,
    JobStateError,
    JobTooLargeError,
    JobValidationError,
    LabelValidationError,
    MemoryGenerationError,
    MetadataError,
    NoPreviousVersionError,
    NotRejectedError,
    PinnedError,
    RejectedVersionError,
    StorageError,
    StoreResponseError,
    StoreUnavailableError,
    UnknownJobError,
    UnknownLabelError,
    UnknownVersionError,
    VersionExistsError,
    VersionLockedError,
)
from .exemplars import ExemplarStore, MemoryInfo
from .jobs import Job, JobQueue, JobState, JobStatus, SubmittedJob
from .keys import Keys
from .labels import LabelMap, validate_name
from .sessions import (
    SessionConflictError,
    SessionInfo,
    SessionSettings,
    SessionStateError,
    SessionStore,
    SessionTooLargeError,
    UnknownSessionError,
)
from .store import StepResult, Storage, open_storage
from .versions import (
    Announcement,
    PendingVersion,
    PointerState,
    Subscription,
    Version0,
    VersionInfo,
    VersionStore,
    next_announcement,
    tag_for,
)

# The connection functions, behind the storage boundary (storage/connection.py stays free of
# package imports so that it loads on its own).
connect = boundary(_connection.connect)
close = boundary(_connection.close)
rewrite_aof = boundary(_connection.rewrite_aof)

__all__ = [
    "Announcement",
    "ExemplarStore",
    "ExemplarValidationError",
    "IdempotencyConflictError",
    "InvalidInputError",
    "Job",
    "JobQueue",
    "JobState",
    "JobStateError",
    "JobStatus",
    "JobTooLargeError",
    "JobValidationError",
    "Keys",
    "LabelMap",
    "LabelValidationError",
    "MemoryGenerationError",
    "MemoryInfo",
    "MetadataError",
    "NoPreviousVersionError",
    "PendingVersion",
    "NotRejectedError",
    "PinnedError",
    "RejectedVersionError",
    "SessionConflictError",
    "SessionInfo",
    "SessionSettings",
    "SessionStateError",
    "SessionStore",
    "SessionTooLargeError",
    "UnknownSessionError",
    "PointerState",
    "StepResult",
    "Storage",
    "StorageError",
    "StoreResponseError",
    "StoreUnavailableError",
    "SubmittedJob",
    "Subscription",
    "UnknownJobError",
    "UnknownLabelError",
    "UnknownVersionError",
    "Version0",
    "VersionExistsError",
    "VersionInfo",
    "VersionLockedError",
    "VersionStore",
    "close",
    "connect",
    "default_data_dir",
    "default_prefix",
    "next_announcement",
    "open_storage",
    "rewrite_aof",
    "tag_for",
    "validate_name",
]
