"""Model versions: weights in the BentoML model store, the serving pointer in Redis.

Files. Version N is the BentoML model ``bsce-classifier:vN`` (BentoML accepts ``3`` as well
as ``v3`` as a tag version; ``v3`` reads unambiguously in ``bentoml models list``). Its
directory holds ``weights.safetensors`` (never a pickle) and ``state.json`` (the full
metadata, including any JSON-able learner state); the model's BentoML metadata repeats the
standard fields (class names, counts, parent, step, metrics, created, job id) so that
``bentoml models get`` shows them. The store is ``$BENTOML_HOME/models`` as the environment
gives it when the `VersionStore` is made (or the `bentoml_home` argument).

Registry. A version exists once it is registered in Redis (``P:versions:registry``), which
happens after its files are complete; a crash in between leaves an unregistered directory
that the next save of that number replaces. `next_version` is one past the highest
registered version, so a job retried after a crash produces the same number again. A job's
version is found under ``P:versions:by_job``; the fast path's interim version of a job
(``interim`` in its entry) under ``P:versions:interim_by_job``.

Pointer. ``P:versions:current`` is the version being served. Every change is published as
JSON on the channel ``P:versions`` (see `Announcement`) and the value it replaced is pushed on
``P:versions:history``, so `rollback` returns to the version served before.

Pin. `pin(v)` serves v and freezes the pointer: the learner keeps saving new versions, but
`set_current` is skipped (returns False) while pinned, and `rollback` is refused
(`PinnedError`) because it would contradict the pin. `pin` again moves the pin; `unpin`
lifts it and, by default, moves the pointer to the newest version, which is where it would
be had there been no pin.

Memory generations. The exemplar memory lives in Redis only (storage/exemplars.py), as
generations: a version saved with a memory (every learner commit, and version 0) names
generation = its own number (``memory_generation`` in its metadata and `VersionInfo`), and
a step built on version v trains on v's generation (`memory`). Each commit collects the
generations that no version still needs, in the same transaction. Needed are those of the
current version, the pinned one, the newest one (what the learner builds on, pinned or
not) and the newest `MEMORY_HISTORY` (20) entries of the pointer
history (what `rollback` returns to first). Any other version still serves (its weights are in its files), but
`memory` refuses it with `MemoryGenerationError`: a step is never built on some other
memory. Pointer moves collect nothing, so a version pinned or set current again before the
next commit keeps its generation.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import bentoml
import numpy as np
import redis
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file

from .boundary import guarded
from .connection import default_prefix
from .errors import (
    MemoryGenerationError,
    MetadataError,
    NoPreviousVersionError,
    NotRejectedError,
    PinnedError,
    RejectedVersionError,
    StorageError,
    UnknownVersionError,
    VersionExistsError,
    VersionLockedError,
)
from .exemplars import ExemplarStore, MemoryInfo, PreparedMemory
from .holdout import HoldoutStore
from .keys import Keys

# Saving a model must not phone home: with no network each save would wait on BentoML's
# usage-tracking request. Users can still opt in by setting the variable to "false".
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

MODEL_NAME = "bsce-classifier"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
SAVE_LOCK_MS = 10 * 60 * 1000
HISTORY_MAX = 1000
# The pointer history entries whose memory generations are kept: a memory of 2,000 CIFAR
# exemplars is about 6 MB, and keeping one for every entry of a long history would grow
# Redis without bound. Older rollback targets still serve; a step on them is refused.
MEMORY_HISTORY = 20

# Take the save lock of a version when it is free, or when the holder is an earlier attempt
# of the same job: the queue hands a job out again only once its previous worker is taken
# for dead, and that worker's late commit then fails on the changed lock value (fencing).
_ACQUIRE_LOCK = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or (ARGV[2] ~= '' and string.sub(cur, 1, #ARGV[2] + 1) == ARGV[2] .. ':') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class VersionInfo(BaseModel):
    """A saved version, as listed (the learner state stays in the model directory)."""

    version: int
    tag: str
    parent_version: int | None = None
    step: int | None = None
    class_names: list[str] = []
    counts: list[int] | dict[str, int] = []
    metrics: dict[str, Any] = {}
    created: datetime
    job_id: str | None = None
    sha256: str
    size_bytes: int
    memory_generation: int | None = None  # its exemplar memory; None: saved without one
    # The promotion gate's verdict: "promoted", "rejected" (saved, never served unless an
    # operator promotes it), "promoted by operator" (rejected, then promoted), or None (saved
    # without the gate: version 0, a deployment with the gate off).
    gate: str | None = None
    # The fast path's interim version of a job (learner/fast_path.py): the parent's feature
    # extractor with a refitted head, served until the job's full version replaces it.
    interim: bool = False

    @property
    def servable(self) -> bool:
        return self.gate != "rejected"


class PointerState(BaseModel):
    current: int | None
    pinned: int | None
    history: list[int]  # earlier values of current, newest first

    def after_set(self, version: int, push_history: bool = True) -> PointerState:
        """The state after a "set" move to `version` (what `stage_move` queues)."""
        history = list(self.history)
        if push_history and self.current is not None and self.current != version:
            history = [self.current, *history][:HISTORY_MAX]
        return PointerState(current=version, pinned=self.pinned, history=history)


class Announcement(BaseModel):
    """What `set_current`, `rollback`, `pin` and `unpin` publish on ``P:versions``."""

    event: Literal["set", "rollback", "pin", "unpin"]
    version: int | None  # the current version after the change
    previous: int | None
    pinned: int | None
    reason: str
    time: float
    tag: str | None

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Announcement:
        """Parse a pub/sub message dict as given by `redis.client.PubSub.get_message`."""
        return cls.model_validate_json(message["data"])


class _KnownMetadata(BaseModel):
    # Standard fields are type-checked; anything else is learner state, kept as given.
    model_config = ConfigDict(extra="allow")

    class_names: list[str] = []
    counts: list[int] | dict[str, int] = []
    parent_version: int | None = None
    step: int | None = None
    metrics: dict[str, Any] = {}
    job_id: str | None = None
    memory_generation: int | None = None
    gate: dict[str, Any] | None = None
    interim: bool = False


@dataclass(frozen=True)
class PendingVersion:
    """A version whose files are written but which is not registered yet, and the memory
    generation to write with it."""

    info: VersionInfo
    lock_token: str
    memory: PreparedMemory | None = None


Version0 = (
    tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]
    | tuple[Mapping[str, torch.Tensor], Mapping[str, Any], Mapping[int, np.ndarray]]
    | tuple[
        Mapping[str, torch.Tensor],
        Mapping[str, Any],
        Mapping[int, np.ndarray],
        Mapping[int, np.ndarray],
    ]
)
"""What `ensure_initial`'s factory returns: tensors, metadata and optionally the memory
(class index -> uint8 (n, C, H, W); empty when left out)."""


@guarded
class Subscription:
    """Announcements of pointer changes, from `VersionStore.subscribe`."""

    def __init__(self, pubsub: redis.client.PubSub) -> None:
        self._pubsub = pubsub

    def next(self, timeout_s: float) -> Announcement | None:
        """The next announcement within `timeout_s`, else None."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = self._pubsub.get_message(timeout=left)
            if msg is not None and msg["type"] == "message":
                return Announcement.from_message(msg)

    def close(self) -> None:
        self._pubsub.close()


def tag_for(version: int, model_name: str = MODEL_NAME) -> str:
    return f"{model_name}:v{int(version)}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _for_bentoml(value: Any) -> Any:
    # BentoML metadata takes basic types only, and no None.
    if isinstance(value, dict):
        return {str(k): _for_bentoml(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_for_bentoml(v) for v in value if v is not None]
    return value


def _jsonable(o: object) -> Any:
    # Learners hand over numpy scalars and arrays (counts, metrics); JSON takes their values.
    if isinstance(o, np.generic | np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise MetadataError(f"version must be an integer >= 0, got {version!r}")
    return version


def _check_tensors(tensors: object) -> None:
    if not isinstance(tensors, Mapping) or not tensors:
        raise MetadataError("tensors must be a non-empty mapping name -> torch.Tensor")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise MetadataError(
                f"tensors must map str to torch.Tensor; got {name!r}: {type(t).__name__}"
            )


def _checked_metadata(
    version: int, metadata: object, memory_generation: int | None, created: datetime
) -> tuple[dict[str, Any], _KnownMetadata]:
    """The metadata as saved (through JSON once: what is saved is exactly what `load`
    gives back) and its standard fields, type-checked."""
    if not isinstance(metadata, Mapping):
        raise MetadataError(f"metadata must be a dict, got {type(metadata).__name__}")
    # The store owns these keys: a memory_generation copied from another version's metadata
    # must never name a memory this version was not saved with.
    own = {"version": version, "created": created.isoformat()}
    if memory_generation is not None:
        own["memory_generation"] = memory_generation
    given = {k: v for k, v in metadata.items() if k != "memory_generation"}
    try:
        full = json.loads(json.dumps({**given, **own}, default=_jsonable))
    except (TypeError, ValueError) as e:
        raise MetadataError(f"metadata must be JSON-serialisable: {e}") from None
    try:
        known = _KnownMetadata.model_validate(full)
    except ValidationError as e:
        raise MetadataError(f"bad version metadata: {e}") from None
    return full, known


def _bento_metadata(version: int, known: _KnownMetadata, created: datetime) -> dict[str, Any]:
    """The standard fields, for ``bentoml models get``."""
    return _for_bentoml(
        {
            "version": version,
            "parent_version": known.parent_version,
            "step": known.step,
            "class_names": known.class_names,
            "counts": known.counts,
            "metrics": {
                k: v for k, v in known.metrics.items() if isinstance(v, int | float | str | bool)
            },
            "created": created.isoformat(),
            "job_id": known.job_id,
            "memory_generation": known.memory_generation,
            "interim": known.interim or None,
        }
    )


@guarded
class VersionStore:
    def __init__(
        self,
        r: redis.Redis,
        prefix: str | None = None,
        bentoml_home: Path | str | None = None,
        model_name: str = MODEL_NAME,
        exemplars: ExemplarStore | None = None,
    ) -> None:
        self.r = r
        self.keys = Keys(prefix or default_prefix())
        self.exemplars = exemplars if exemplars is not None else ExemplarStore(r, self.keys.prefix)
        home = bentoml_home or os.environ.get("BENTOML_HOME") or Path.home() / "bentoml"
        self.bentoml_home = Path(home)
        self.model_name = model_name
        self._release_lock = r.register_script(_RELEASE_LOCK)
        self._acquire_lock = r.register_script(_ACQUIRE_LOCK)
        # Our own handle on $BENTOML_HOME/models: BentoML resolves its default store once per
        # process, so a store chosen per VersionStore (tests, several deployments) needs this.
        from bentoml._internal.models import ModelStore

        self.model_store = ModelStore(self.bentoml_home / "models")

    # -- registry ------------------------------------------------------------------------

    def tag(self, version: int) -> str:
        return tag_for(version, self.model_name)

    def info(self, version: int) -> VersionInfo:
        raw = self.r.hget(self.keys.versions_registry, str(int(version)))
        if raw is None:
            raise UnknownVersionError(f"no model version {version}")
        return VersionInfo.model_validate_json(raw)

    def exists(self, version: int) -> bool:
        return bool(self.r.hexists(self.keys.versions_registry, str(int(version))))

    def list(self) -> builtins.list[VersionInfo]:
        raw = self.r.hgetall(self.keys.versions_registry)
        return sorted(
            (VersionInfo.model_validate_json(v) for v in raw.values()), key=lambda i: i.version
        )

    def latest_servable(self) -> int | None:
        """The newest version the gate did not reject, interims aside (what `unpin` serves)."""
        return max((i.version for i in self.list() if i.servable and not i.interim), default=None)

    def latest(self) -> int | None:
        return max((int(k) for k in self.r.hkeys(self.keys.versions_registry)), default=None)

    def next_version(self) -> int:
        latest = self.latest()
        return 0 if latest is None else latest + 1

    def fallbacks(self, version: int) -> builtins.list[int]:
        """What to serve while `version` cannot be loaded, best first: its ancestors
        (``parent_version`` links, nearest first), then the other earlier versions, newest
        first. An ancestor has the classes `version` was built from; any other version is
        a last resort (it may have classes the pointer's lineage never learned)."""
        infos = {i.version: i for i in self.list() if i.servable or i.version == version}
        lineage: builtins.list[int] = []
        parent = infos[version].parent_version if version in infos else None
        while parent in infos and parent != version and parent not in lineage:
            lineage.append(parent)
            parent = infos[parent].parent_version
        rest = sorted((v for v in infos if v < version and v not in lineage), reverse=True)
        return lineage + rest

    def version_for_job(self, job_id: str) -> int | None:
        """The version a job produced, if it got that far (a retried job must not redo it)."""
        v = self.r.hget(self.keys.versions_by_job, job_id)
        return None if v is None else int(v)

    def interim_for_job(self, job_id: str) -> int | None:
        """The interim version a job's fast path committed, if any (a retry makes none)."""
        v = self.r.hget(self.keys.versions_interim_by_job, job_id)
        return None if v is None else int(v)

    # -- saving --------------------------------------------------------------------------

    def save(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        memory: Mapping[int, np.ndarray] | None = None,
        holdout: Mapping[int, np.ndarray] | None = None,
    ) -> str:
        """Write and register version `version`; its tag.

        `metadata`: class_names, counts, parent_version, step, metrics, job_id (all
        optional), plus any other JSON-able keys (learner state). With `memory` (class
        index -> uint8 (n, C, H, W)), it is written as the version's memory generation in
        the registering transaction. Raises `VersionExistsError` for a saved number,
        `MetadataError` / `ExemplarValidationError` for bad input (nothing written),
        `VersionLockedError` while another process saves the same number. `holdout` (class
        index -> held-out images) becomes the version's held-out chunk (storage/holdout.py).
        """
        pending = self.write(version, tensors, metadata, memory)

        def txn(pipe: redis.client.Pipeline) -> None:
            self.check_register(pipe, pending)
            pipe.multi()
            self.stage_register(pipe, pending)
            if holdout:
                HoldoutStore(self.r, self.keys.prefix).stage_write(
                    pipe, pending.info.version, holdout
                )

        try:
            self.r.transaction(txn, *self.register_watches(pending))
        except BaseException:
            self.discard(pending)
            raise
        finally:
            self.release_lock(pending)
        return pending.info.tag

    def write(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any],
        memory: Mapping[int, np.ndarray] | None = None,
    ) -> PendingVersion:
        """Write the files of `version` under a save lock, without registering it.

        For callers that register it in a bigger transaction (`Storage.commit_step`). The
        save lock expires after 10 minutes if never released; a later attempt of the same
        job (metadata ``job_id``) takes it over at once. `memory`, when given, is validated
        here and becomes generation `version`, written by `stage_register`.
        """
        version = _check_version(version)
        _check_tensors(tensors)
        prepared = None if memory is None else self.exemplars.prepare(memory, version)
        created = datetime.now(UTC)
        full, known = _checked_metadata(
            version, metadata, None if prepared is None else version, created
        )
        self._refuse_saved(version)
        token = self._take_save_lock(version, known.job_id)
        try:
            # Again under the lock: registration happens while its writer holds the lock, so
            # only now is "not registered" final.
            self._refuse_saved(version)
            digest, size = self._write_files(version, tensors, full, known, created)
        except BaseException:
            self._release_lock(keys=[self.keys.version_lock(version)], args=[token])
            raise
        info = VersionInfo(
            version=version,
            tag=self.tag(version),
            parent_version=known.parent_version,
            step=known.step,
            class_names=known.class_names,
            counts=known.counts,
            metrics=known.metrics,
            created=created,
            job_id=known.job_id,
            sha256=digest,
            size_bytes=size,
            memory_generation=known.memory_generation,
            gate=None if known.gate is None else known.gate.get("verdict"),
            interim=known.interim,
        )
        return PendingVersion(info=info, lock_token=token, memory=prepared)

    def _refuse_saved(self, version: int) -> None:
        if self.exists(version):
            raise VersionExistsError(
                f"model version {version} is already saved; versions are immutable"
            )

    def _take_save_lock(self, version: int, job_id: str | None) -> str:
        token = f"{job_id or ''}:{uuid.uuid4().hex}"
        lock = self.keys.version_lock(version)
        if not self._acquire_lock(keys=[lock], args=[token, job_id or "", SAVE_LOCK_MS]):
            raise VersionLockedError(f"another process is saving model version {version}")
        return token

    def _write_files(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        full: Mapping[str, Any],
        known: _KnownMetadata,
        created: datetime,
    ) -> tuple[str, int]:
        """The BentoML model of `version` (weights and state.json); the weights' digest and
        size. Registered versions are never rewritten, so a directory already there is what
        a crashed writer left: it is replaced."""
        tag = self.tag(version)
        if self.model_store.list(tag):
            self.model_store.delete(tag)
        # Own copies: safetensors refuses views that share storage (tied weights).
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        with bentoml.models.create(
            tag,
            labels={"app": "bsce-serve", "version": str(version)},
            metadata=_bento_metadata(version, known, created),
            _model_store=self.model_store,
        ) as model:
            weights = Path(model.path_of(WEIGHTS_FILE))
            save_file(plain, str(weights), metadata={"version": str(version)})
            Path(model.path_of(STATE_FILE)).write_text(json.dumps(full, indent=1))
            return _sha256(weights), weights.stat().st_size

    # -- registering inside a transaction (here and in Storage.commit_step) --------------

    def register_watches(self, pending: PendingVersion) -> builtins.list[str]:
        """The keys a caller of `check_register` must WATCH."""
        return [self.keys.versions_registry, self.keys.version_lock(pending.info.version)]

    def check_register(self, pipe: redis.client.Pipeline, pending: PendingVersion) -> None:
        """Under WATCH (immediate mode): refuse when the number got taken or the lock lost."""
        v = pending.info.version
        if pipe.hexists(self.keys.versions_registry, str(v)):
            raise VersionExistsError(f"model version {v} is already saved; versions are immutable")
        if pipe.get(self.keys.version_lock(v)) != pending.lock_token.encode():
            raise VersionLockedError(
                f"the save lock of model version {v} expired or was taken over"
            )

    def stage_register(self, pipe: redis.client.Pipeline, pending: PendingVersion) -> None:
        """Queue the registration and the version's memory generation (inside MULTI)."""
        info = pending.info
        pipe.hset(self.keys.versions_registry, str(info.version), info.model_dump_json())
        if info.job_id:
            by_job = (
                self.keys.versions_interim_by_job if info.interim else self.keys.versions_by_job
            )
            pipe.hset(by_job, info.job_id, info.version)
        if pending.memory is not None:
            self.exemplars.stage_write(pipe, pending.memory)

    def discard(self, pending: PendingVersion) -> None:
        """Remove the files of a version that was written but will not be registered
        (only while we still hold its save lock, so another writer's files stay)."""
        v = pending.info.version
        try:
            mine = self.r.get(self.keys.version_lock(v)) == pending.lock_token.encode()
            if not mine or self.exists(v):
                return
        except (redis.RedisError, StorageError):
            return  # cannot tell whether it got registered: keep the files
        with contextlib.suppress(bentoml.exceptions.NotFound):
            self.model_store.delete(pending.info.tag)

    def release_lock(self, pending: PendingVersion) -> None:
        self._release_lock(
            keys=[self.keys.version_lock(pending.info.version)], args=[pending.lock_token]
        )

    # -- loading -------------------------------------------------------------------------

    def model_dir(self, version: int) -> Path:
        info = self.info(version)
        try:
            return Path(self.model_store.get(info.tag).path)
        except bentoml.exceptions.NotFound:
            raise StorageError(
                f"model version {version} is registered but {info.tag} is missing from the "
                f"BentoML store at {self.model_store._path}"
            ) from None

    def metadata(self, version: int) -> dict[str, Any]:
        """The full learner metadata of `version` (its state.json), without the weights."""
        return json.loads((self.model_dir(version) / STATE_FILE).read_text())

    def load(self, version: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights (on CPU) and the full metadata of `version`; checks the weights' digest."""
        info = self.info(version)
        path = self.model_dir(version)
        weights = path / WEIGHTS_FILE
        if _sha256(weights) != info.sha256:
            raise StorageError(
                f"weights of model version {version} do not match their recorded digest"
            )
        metadata = json.loads((path / STATE_FILE).read_text())
        return load_file(str(weights), device="cpu"), metadata

    # -- memory generations --------------------------------------------------------------

    def memory(self, version: int) -> dict[int, np.ndarray]:
        """The exemplar memory `version` was saved with (its generation), in class order.

        Raises `MemoryGenerationError` when it names none or its generation was collected.
        """
        generation = self._generation_of(version)
        try:
            return self.exemplars.read(generation)
        except MemoryGenerationError:
            raise MemoryGenerationError(
                f"the exemplar memory of model version {version} (generation {generation}) "
                "was garbage-collected: generations are kept for the current, pinned and "
                "newest versions and the pointer history only, so no step can be built on "
                "this version"
            ) from None

    def memory_info(self, version: int) -> MemoryInfo | None:
        """Counts and size of `version`'s memory; None when it has none (any more)."""
        generation = self.info(version).memory_generation
        if generation is None:
            return None
        try:
            return self.exemplars.info(generation)
        except MemoryGenerationError:
            return None

    def _generation_of(self, version: int) -> int:
        generation = self.info(version).memory_generation
        if generation is None:
            raise MemoryGenerationError(
                f"model version {version} was saved without an exemplar memory; no step can "
                "be built on it"
            )
        return generation

    def memory_watches(self) -> builtins.list[str]:
        """The keys a caller of `unneeded_generations` must WATCH (with `pointer_watches`)."""
        return [self.keys.versions_registry, self.keys.mem_generations]

    def unneeded_generations(
        self,
        pipe: redis.client.Pipeline,
        after: PointerState,
        new: VersionInfo | None = None,
    ) -> builtins.list[int]:
        """Under WATCH (immediate mode): the stored generations no version needs once the
        pointer is `after` and `new` (being registered) is saved; see the module doc."""
        registered = {int(v) for v in pipe.hkeys(self.keys.versions_registry)}
        if new is not None:
            registered.add(new.version)
        # Rollback is a stack: only its top MEMORY_HISTORY entries keep a memory to build on.
        recent = after.history[:MEMORY_HISTORY]
        keep = {after.current, after.pinned, max(registered, default=None), *recent}
        keep.discard(None)
        needed = set() if new is None else {new.memory_generation}
        lookup = sorted(v for v in keep if new is None or v != new.version)
        if lookup:
            for raw in pipe.hmget(self.keys.versions_registry, [str(v) for v in lookup]):
                if raw is not None:
                    needed.add(VersionInfo.model_validate_json(raw).memory_generation)
        stored = {int(g) for g in pipe.smembers(self.keys.mem_generations)}
        return sorted(stored - needed)

    def stage_collect(self, pipe: redis.client.Pipeline, generations: Iterable[int]) -> None:
        """Queue the removal of `generations` (inside MULTI)."""
        self.exemplars.stage_delete(pipe, generations)

    def collect_memory(self) -> builtins.list[int]:
        """Remove the generations no version needs now (commits do this themselves); the
        generations removed."""

        def txn(pipe: redis.client.Pipeline) -> builtins.list[int]:
            drop = self.unneeded_generations(pipe, self.read_pointer(pipe))
            pipe.multi()
            self.stage_collect(pipe, drop)
            return drop

        watches = {*self.pointer_watches(), *self.memory_watches()}
        return self.r.transaction(txn, *watches, value_from_callable=True)

    # -- pointer -------------------------------------------------------------------------

    def current(self) -> int | None:
        v = self.r.get(self.keys.version_current)
        return None if v is None else int(v)

    def pinned(self) -> int | None:
        v = self.r.get(self.keys.version_pinned)
        return None if v is None else int(v)

    def pointer(self) -> PointerState:
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.keys.version_current)
        pipe.get(self.keys.version_pinned)
        pipe.lrange(self.keys.version_history, 0, -1)
        cur, pin, hist = pipe.execute()
        return _pointer_state(cur, pin, hist)

    def pointer_watches(self) -> builtins.list[str]:
        """The keys a caller of `read_pointer` must WATCH."""
        k = self.keys
        return [k.version_current, k.version_pinned, k.version_history, k.versions_registry]

    def read_pointer(self, pipe: redis.client.Pipeline) -> PointerState:
        """Under WATCH (immediate mode): the pointer state."""
        k = self.keys
        cur, pin = pipe.get(k.version_current), pipe.get(k.version_pinned)
        return _pointer_state(cur, pin, pipe.lrange(k.version_history, 0, -1))

    def _require(self, pipe: redis.client.Pipeline, version: int) -> None:
        if not pipe.hexists(self.keys.versions_registry, str(int(version))):
            raise UnknownVersionError(f"no model version {version}")

    def stage_move(
        self,
        pipe: redis.client.Pipeline,
        event: str,
        new: int | None,
        prev: int | None,
        pinned: int | None,
        reason: str,
        push_history: bool = True,
    ) -> Announcement:
        """Queue a pointer change and its announcement (inside MULTI)."""
        k = self.keys
        if push_history and prev is not None and prev != new:
            pipe.lpush(k.version_history, prev)
            pipe.ltrim(k.version_history, 0, HISTORY_MAX - 1)
        if new is not None:
            pipe.set(k.version_current, new)
        msg = Announcement(
            event=event,  # type: ignore[arg-type]
            version=new,
            previous=prev,
            pinned=pinned,
            reason=reason,
            time=time.time(),
            tag=None if new is None else self.tag(new),
        )
        pipe.publish(k.versions_channel, msg.model_dump_json())
        return msg

    def set_current(self, version: int, reason: str = "", *, respect_pin: bool = True) -> bool:
        """Serve `version`; False (nothing changed) when the pointer is pinned.

        `respect_pin=False` is for operators: it moves the pointer and the pin with it.
        """

        def txn(pipe: redis.client.Pipeline) -> bool:
            self._require_servable(pipe, version)
            state = self.read_pointer(pipe)
            cur, pin = state.current, state.pinned
            if pin is not None and respect_pin:
                return False
            pipe.multi()
            if pin is not None:
                pipe.set(self.keys.version_pinned, int(version))
            self.stage_move(
                pipe, "set", int(version), cur, None if pin is None else int(version), reason
            )
            return True

        return self.r.transaction(txn, *self.pointer_watches(), value_from_callable=True)

    def rollback(self, reason: str = "rollback") -> int:
        """Serve the version served before the current one; the new current version."""

        def txn(pipe: redis.client.Pipeline) -> int:
            state = self.read_pointer(pipe)
            cur, hist = state.current, state.history
            if state.pinned is not None:
                raise PinnedError(
                    f"the pointer is pinned to version {state.pinned}; unpin it before a rollback"
                )
            # Skip entries equal to the current version (a set to the same version twice).
            drop = 0
            while drop < len(hist) and hist[drop] == cur:
                drop += 1
            if drop == len(hist):
                raise NoPreviousVersionError("no earlier version to roll back to")
            target = hist[drop]
            pipe.multi()
            for _ in range(drop + 1):
                pipe.lpop(self.keys.version_history)
            self.stage_move(pipe, "rollback", target, cur, None, reason, push_history=False)
            return target

        return self.r.transaction(txn, *self.pointer_watches(), value_from_callable=True)

    def promote(self, version: int, reason: str = "promote") -> None:
        """Serve a version the promotion gate rejected: an operator overrules the gate. Its
        registry entry says so from then on (``gate = "promoted by operator"``)."""

        def txn(pipe: redis.client.Pipeline) -> None:
            self._require(pipe, version)
            state = self.read_pointer(pipe)
            raw = pipe.hget(self.keys.versions_registry, str(int(version)))
            info = VersionInfo.model_validate_json(raw)
            if info.gate != "rejected":
                raise NotRejectedError(
                    f"version {version} was not rejected by the promotion gate "
                    f"(gate: {info.gate}); serve it with a pin"
                )
            if state.pinned is not None:
                raise PinnedError(
                    f"the pointer is pinned to version {state.pinned}; unpin it before a promote"
                )
            pipe.multi()
            entry = info.model_copy(update={"gate": "promoted by operator"})
            pipe.hset(self.keys.versions_registry, str(int(version)), entry.model_dump_json())
            self.stage_move(pipe, "set", int(version), state.current, None, reason)

        self.r.transaction(txn, *self.pointer_watches(), self.keys.versions_registry)

    def _require_servable(self, pipe: redis.client.Pipeline, version: int) -> None:
        self._require(pipe, version)
        raw = pipe.hget(self.keys.versions_registry, str(int(version)))
        if not VersionInfo.model_validate_json(raw).servable:
            raise RejectedVersionError(
                f"version {version} was rejected by the promotion gate; promote it to serve it"
            )

    def pin(self, version: int, reason: str = "pin") -> None:
        """Serve `version` and keep serving it until `unpin`."""

        def txn(pipe: redis.client.Pipeline) -> None:
            self._require_servable(pipe, version)
            cur = self.read_pointer(pipe).current
            pipe.multi()
            pipe.set(self.keys.version_pinned, int(version))
            self.stage_move(pipe, "pin", int(version), cur, int(version), reason)

        self.r.transaction(txn, *self.pointer_watches())

    def unpin(self, to_latest: bool = True, reason: str = "unpin") -> int | None:
        """Lift the pin; with `to_latest`, serve the newest version (not rejected, not an
        interim). The current version."""

        def txn(pipe: redis.client.Pipeline) -> int | None:
            cur = self.read_pointer(pipe).current
            entries = pipe.hvals(self.keys.versions_registry)
            # An interim stands in for its job's full version while the job runs; it is
            # never where an unpin lands (after a rejected full version, the parent is).
            infos = map(VersionInfo.model_validate_json, entries)
            latest = max((i.version for i in infos if i.servable and not i.interim), default=None)
            new = latest if to_latest and latest is not None else cur
            pipe.multi()
            pipe.delete(self.keys.version_pinned)
            self.stage_move(pipe, "unpin", new, cur, None, reason)
            return new

        return self.r.transaction(txn, *self.pointer_watches(), value_from_callable=True)

    def subscribe(self, timeout_s: float = 5.0) -> Subscription:
        """A subscription to the announcements (read them with `next_announcement`).

        Returns once the server confirmed the subscription, so no later change is missed.
        Announcements are hints (pub/sub drops messages while a subscriber is disconnected):
        readers should also compare `current()` now and then.
        """
        ps = self.r.pubsub()
        ps.subscribe(self.keys.versions_channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = ps.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg["type"] == "subscribe":
                ps.ignore_subscribe_messages = True
                return Subscription(ps)
        ps.close()
        raise StorageError("no subscription confirmation from Redis")

    # -- first start ---------------------------------------------------------------------

    def ensure_initial(
        self,
        version0_factory: Callable[[], Version0],
        timeout_s: float = 300.0,
    ) -> int:
        """Create version 0 from `version0_factory()` unless it exists, and serve it if
        nothing is served yet. Safe when several processes start at once: one builds it,
        the others wait for it. Returns 0.

        The factory returns ``(tensors, metadata)`` or ``(tensors, metadata, memory)``;
        version 0 is saved with that memory as its generation (empty when left out).
        """
        lock, token = self.keys.versions_init_lock, uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        while not self.exists(0):
            if self.r.set(lock, token, nx=True, px=max(1, math.ceil(timeout_s * 1000))):
                try:
                    if not self.exists(0):
                        self._save_initial(version0_factory())
                finally:
                    self._release_lock(keys=[lock], args=[token])
                break
            if time.monotonic() > deadline:
                raise StorageError(
                    "timed out waiting for another process to create model version 0"
                )
            time.sleep(0.05)

        def txn(pipe: redis.client.Pipeline) -> None:
            cur = self.read_pointer(pipe).current
            pipe.multi()
            if cur is None:
                self.stage_move(pipe, "set", 0, None, None, "initial version")

        self.r.transaction(txn, *self.pointer_watches())
        return 0

    def _save_initial(self, payload: Version0) -> None:
        if not isinstance(payload, tuple) or len(payload) not in (2, 3, 4):
            raise MetadataError(
                "the version 0 factory must return (tensors, metadata), "
                "(tensors, metadata, memory) or (tensors, metadata, memory, holdout)"
            )
        tensors, metadata = payload[0], payload[1]
        memory = payload[2] if len(payload) >= 3 else {}
        holdout = payload[3] if len(payload) == 4 else None
        meta = {"parent_version": None, "step": 0, **dict(metadata)}
        self.save(0, tensors, meta, memory, holdout)


def _pointer_state(cur: bytes | None, pin: bytes | None, hist: Iterable[bytes]) -> PointerState:
    return PointerState(
        current=None if cur is None else int(cur),
        pinned=None if pin is None else int(pin),
        history=[int(h) for h in hist],
    )


def next_announcement(subscription: Subscription, timeout_s: float) -> Announcement | None:
    """The next announcement on `subscription` within `timeout_s`, else None."""
    return subscription.next(timeout_s)


__all__ = [
    "Announcement",
    "PendingVersion",
    "PointerState",
    "Subscription",
    "Version0",
    "VersionInfo",
    "VersionStore",
    "next_announcement",
    "tag_for",
]
