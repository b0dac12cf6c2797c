"""Redis and model-store access for bsce-serve: exemplar memory, label map, update jobs and
model versions. Knows nothing of training or HTTP; every store takes a Redis client from
`connect` and a key prefix (`storage.keys` has the layout).

A learner worker, in outline::

    st = open_storage()                                   # REDIS_URL or embedded Redis
    st.versions.ensure_initial(make_version0)             # once per deployment, race-safe
    while running:
        job = st.jobs.claim("learner-1", block_ms=5000, min_idle_ms=10 * 60_000)
        if job is None:
            continue
        st.jobs.mark_running(job.id)
        indices = st.labels.get_or_add(job.labels)        # a known name keeps its index
        parent = st.versions.current()
        tensors, meta = st.versions.load(parent)
        memory = st.exemplars.read_all()
        try:
            ...train (calling st.jobs.heartbeat(job, "learner-1") every epoch),
               select exemplars...
            st.commit_step(job.id, st.versions.next_version(), new_tensors,
                           {"class_names": ..., "counts": ..., "parent_version": parent,
                            "step": ..., "metrics": ...}, new_memory)
        except Exception as e:
            st.jobs.fail(job.id, repr(e))                 # retried; failed after 3 attempts
    # on SIGTERM mid-step: st.jobs.release(job.id)

`commit_step` is the one transaction that makes a step visible (version registered, memory
replaced, pointer moved and announced unless pinned, job acknowledged): a worker killed
before it leaves nothing half-written, and the retried job saves the same version number.
"""

from .connection import close, connect, default_data_dir, default_prefix, rewrite_aof
from .errors import (
    ExemplarValidationError,
    InvalidInputError,
    JobStateError,
    JobTooLargeError,
    JobValidationError,
    LabelValidationError,
    MetadataError,
    NoPreviousVersionError,
    PinnedError,
    StorageError,
    UnknownJobError,
    UnknownLabelError,
    UnknownVersionError,
    VersionExistsError,
    VersionLockedError,
)
from .exemplars import ExemplarStore, MemoryInfo
from .jobs import Job, JobQueue, JobState, JobStatus
from .keys import Keys
from .labels import LabelMap, validate_name
from .store import StepResult, Storage, open_storage
from .versions import (
    Announcement,
    PendingVersion,
    PointerState,
    VersionInfo,
    VersionStore,
    next_announcement,
    tag_for,
)

__all__ = [
    "Announcement",
    "ExemplarStore",
    "ExemplarValidationError",
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
    "MemoryInfo",
    "MetadataError",
    "NoPreviousVersionError",
    "PendingVersion",
    "PinnedError",
    "PointerState",
    "StepResult",
    "Storage",
    "StorageError",
    "UnknownJobError",
    "UnknownLabelError",
    "UnknownVersionError",
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
