"""The Redis key layout, in one place.

Every key starts with the deployment prefix (`BSCE_PREFIX`, default ``bsce``), so several
deployments or test runs can share one Redis database. With prefix ``P``:

==========================  ======  ==========================================================
key                         type    content
==========================  ======  ==========================================================
P:mem:<g>:data              hash    memory generation g: class index -> raw exemplar bytes
P:mem:<g>:shapes            hash    class index -> JSON {"dtype": "|u1", "shape": [n,c,h,w]}
P:mem:<g>:counts            hash    class index -> n
P:mem:<g>:meta              hash    generation, updated (epoch s), num_classes, total_bytes
P:mem:generations           set     the generations stored (written, not yet collected)
P:holdout:<v>:data          hash    held-out images version v's job added: class -> raw bytes
P:holdout:<v>:shapes        hash    class index -> JSON {"dtype", "shape"}
P:labels:index              hash    class name -> index
P:labels:names              list    class names in index order
P:jobs                      stream  one entry per update job: {job_id}; group ``learners``
P:jobs:index                zset    job id scored by submit time (for listing)
P:jobs:retry                hash    stream entry id -> epoch ms before which a failed job
                                    waits for its next attempt (retry backoff)
P:job:<id>                  hash    job status record (state, times, class indices, ...)
P:job:<id>:samples          hash    header (dtype, shape), chunks, store, c<n>: chunk n (raw
                                    bytes, or its file name; storage/chunks.py)
P:session:<sid>             hash    an upload session: state (open, committed), classes, counts,
                                    num_samples, num_chunks, bytes, shape, overrides, job
                                    (after commit); expires BSCE_SESSION_TTL_S after its last
                                    change (storage/sessions.py)
P:session:<sid>:chunks      hash    its samples so far: c<n> (as in P:job:<id>:samples) and
                                    l<n>: chunk n's labels (uint16 indices into classes);
                                    same expiry; renamed to P:job:<id>:samples on commit
P:idem:<sha256 of key>      string  JSON {digest, job}: a submission's idempotency key (24 h)
P:versions:registry         hash    version -> VersionInfo JSON (the saved, complete ones)
P:versions:by_job           hash    job id -> version it produced
P:versions:interim_by_job   hash    job id -> its interim version (the fast path)
P:versions:current          string  the version being served
P:versions:history          list    earlier values of current, newest first (rollback stack)
P:versions:pinned           string  the pinned version; absent when not pinned
P:versions:lock:<v>         string  save lock of version v (token, with expiry)
P:versions:init             string  lock taken while version 0 is being created
P:versions   (channel)      pubsub  JSON announcement of every pointer change
==========================  ======  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidInputError

JOB_GROUP = "learners"


@dataclass(frozen=True)
class Keys:
    prefix: str

    def __post_init__(self) -> None:
        if not self.prefix or any(ch.isspace() for ch in self.prefix):
            raise InvalidInputError(
                f"key prefix must be non-empty without spaces, got {self.prefix!r}"
            )

    def _k(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    # exemplar memory, one set of keys per generation
    def mem_data(self, generation: int) -> str:
        return self._k("mem", int(generation), "data")

    def mem_shapes(self, generation: int) -> str:
        return self._k("mem", int(generation), "shapes")

    def mem_counts(self, generation: int) -> str:
        return self._k("mem", int(generation), "counts")

    def mem_meta(self, generation: int) -> str:
        return self._k("mem", int(generation), "meta")

    def mem_keys(self, generation: int) -> tuple[str, str, str, str]:
        """All keys of one generation."""
        g = int(generation)
        return self.mem_data(g), self.mem_shapes(g), self.mem_counts(g), self.mem_meta(g)

    @property
    def mem_generations(self) -> str:
        return self._k("mem", "generations")

    # held-out images of the promotion gate, one chunk per version that added some
    def holdout_data(self, version: int) -> str:
        return self._k("holdout", int(version), "data")

    def holdout_shapes(self, version: int) -> str:
        return self._k("holdout", int(version), "shapes")

    # label map
    @property
    def labels_index(self) -> str:
        return self._k("labels", "index")

    @property
    def labels_names(self) -> str:
        return self._k("labels", "names")

    # jobs
    @property
    def jobs_stream(self) -> str:
        return self._k("jobs")

    @property
    def jobs_index(self) -> str:
        return self._k("jobs", "index")

    @property
    def jobs_retry(self) -> str:
        return self._k("jobs", "retry")

    def idempotency(self, key_digest: str) -> str:
        """The record of an idempotency key, named by the key's digest (any client string
        is then a safe key name)."""
        return self._k("idem", key_digest)

    # upload sessions
    def session(self, session_id: str) -> str:
        return self._k("session", session_id)

    def session_chunks(self, session_id: str) -> str:
        return self._k("session", session_id, "chunks")

    def job(self, job_id: str) -> str:
        return self._k("job", job_id)

    def job_samples(self, job_id: str) -> str:
        return self._k("job", job_id, "samples")

    # versions
    @property
    def versions_registry(self) -> str:
        return self._k("versions", "registry")

    @property
    def versions_by_job(self) -> str:
        return self._k("versions", "by_job")

    @property
    def versions_interim_by_job(self) -> str:
        return self._k("versions", "interim_by_job")

    @property
    def version_current(self) -> str:
        return self._k("versions", "current")

    @property
    def version_history(self) -> str:
        return self._k("versions", "history")

    @property
    def version_pinned(self) -> str:
        return self._k("versions", "pinned")

    def version_lock(self, version: int) -> str:
        return self._k("versions", "lock", version)

    @property
    def versions_init_lock(self) -> str:
        return self._k("versions", "init")

    @property
    def versions_channel(self) -> str:
        return self._k("versions")
