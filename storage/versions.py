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
registered version, so a job retried after a crash produces the same number again.

Pointer. ``P:versions:current`` is the version being served. Every change is published as
JSON on the channel ``P:versions`` (see `Announcement`) and the value it replaced is pushed on
``P:versions:history``, so `rollback` returns to the version served before.

Pin. `pin(v)` serves v and freezes the pointer: the learner keeps saving new versions, but
`set_current` is skipped (returns False) while pinned, and `rollback` is refused
(`PinnedError`) because it would contradict the pin. `pin` again moves the pin; `unpin`
lifts it and, by default, moves the pointer to the newest version, which is where it would
be had there been no pin.
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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import bentoml
import numpy as np
import redis
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file

from .connection import default_prefix
from .errors import (
    MetadataError,
    NoPreviousVersionError,
    PinnedError,
    StorageError,
    UnknownVersionError,
    VersionExistsError,
    VersionLockedError,
)
from .keys import Keys

# Saving a model must not phone home: with no network each save would wait on BentoML's
# usage-tracking request. Users can still opt in by setting the variable to "false".
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

MODEL_NAME = "bsce-classifier"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
SAVE_LOCK_MS = 10 * 60 * 1000
HISTORY_MAX = 1000

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


class PointerState(BaseModel):
    current: int | None
    pinned: int | None
    history: list[int]  # earlier values of current, newest first


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


class PendingVersion(BaseModel):
    """A version whose files are written but which is not registered yet."""

    info: VersionInfo
    lock_token: str


def tag_for(version: int, model_name: str = MODEL_NAME) -> str:
    return f"{model_name}:v{int(version)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


class VersionStore:
    def __init__(
        self,
        r: redis.Redis,
        prefix: str | None = None,
        bentoml_home: Path | str | None = None,
        model_name: str = MODEL_NAME,
    ) -> None:
        self.r = r
        self.keys = Keys(prefix or default_prefix())
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

    def latest(self) -> int | None:
        return max((int(k) for k in self.r.hkeys(self.keys.versions_registry)), default=None)

    def next_version(self) -> int:
        latest = self.latest()
        return 0 if latest is None else latest + 1

    def version_for_job(self, job_id: str) -> int | None:
        """The version a job produced, if it got that far (a retried job must not redo it)."""
        v = self.r.hget(self.keys.versions_by_job, job_id)
        return None if v is None else int(v)

    # -- saving and loading --------------------------------------------------------------

    def save(
        self, version: int, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> str:
        """Write and register version `version`; its tag.

        `metadata`: class_names, counts, parent_version, step, metrics, job_id (all
        optional), plus any other JSON-able keys (learner state). Raises
        `VersionExistsError` for a saved number, `MetadataError` for bad input (nothing
        written), `VersionLockedError` while another process saves the same number.
        """
        pending = self.write(version, tensors, metadata)
        try:
            self.r.transaction(
                lambda pipe: self._register_txn(pipe, pending), *self._register_watches(pending)
            )
        except BaseException:
            self.discard(pending)
            raise
        finally:
            self.release_lock(pending)
        return pending.info.tag

    def write(
        self, version: int, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> PendingVersion:
        """Write the files of `version` under a save lock, without registering it.

        For callers that register it in a bigger transaction (`Storage.commit_step`). The
        save lock expires after 10 minutes if never released; a later attempt of the same
        job (metadata ``job_id``) takes it over at once.
        """
        version = _check_version(version)
        if not isinstance(tensors, Mapping) or not tensors:
            raise MetadataError("tensors must be a non-empty mapping name -> torch.Tensor")
        for name, t in tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise MetadataError(
                    f"tensors must map str to torch.Tensor; got {name!r}: {type(t).__name__}"
                )
        if not isinstance(metadata, Mapping):
            raise MetadataError(f"metadata must be a dict, got {type(metadata).__name__}")
        created = datetime.now(UTC)
        try:
            # Through JSON once: what is saved is exactly what `load` gives back.
            full = json.loads(
                json.dumps(
                    {**dict(metadata), "version": version, "created": created.isoformat()},
                    default=_jsonable,
                )
            )
        except (TypeError, ValueError) as e:
            raise MetadataError(f"metadata must be JSON-serialisable: {e}") from None
        try:
            known = _KnownMetadata.model_validate(full)
        except ValidationError as e:
            raise MetadataError(f"bad version metadata: {e}") from None
        state_json = json.dumps(full, indent=1)
        if self.exists(version):
            raise VersionExistsError(
                f"model version {version} is already saved; versions are immutable"
            )

        token = f"{known.job_id or ''}:{uuid.uuid4().hex}"
        lock = self.keys.version_lock(version)
        if not self._acquire_lock(keys=[lock], args=[token, known.job_id or "", SAVE_LOCK_MS]):
            raise VersionLockedError(f"another process is saving model version {version}")
        try:
            # Again under the lock: registration happens while its writer holds the lock, so
            # only now is "not registered" final.
            if self.exists(version):
                raise VersionExistsError(
                    f"model version {version} is already saved; versions are immutable"
                )
            tag = self.tag(version)
            # Registered versions are never rewritten, so a directory here is what a crashed
            # writer left: replace it.
            if self.model_store.list(tag):
                self.model_store.delete(tag)
            # Own copies: safetensors refuses views that share storage (tied weights).
            plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            bento_meta = _for_bentoml(
                {
                    "version": version,
                    "parent_version": known.parent_version,
                    "step": known.step,
                    "class_names": known.class_names,
                    "counts": known.counts,
                    "metrics": {
                        k: v
                        for k, v in known.metrics.items()
                        if isinstance(v, int | float | str | bool)
                    },
                    "created": created.isoformat(),
                    "job_id": known.job_id,
                }
            )
            with bentoml.models.create(
                tag,
                labels={"app": "bsce-serve", "version": str(version)},
                metadata=bento_meta,
                _model_store=self.model_store,
            ) as model:
                weights = Path(model.path_of(WEIGHTS_FILE))
                save_file(plain, str(weights), metadata={"version": str(version)})
                Path(model.path_of(STATE_FILE)).write_text(state_json)
                digest, size = _sha256(weights), weights.stat().st_size
        except BaseException:
            self._release_lock(keys=[lock], args=[token])
            raise
        info = VersionInfo(
            version=version,
            tag=tag,
            parent_version=known.parent_version,
            step=known.step,
            class_names=known.class_names,
            counts=known.counts,
            metrics=known.metrics,
            created=created,
            job_id=known.job_id,
            sha256=digest,
            size_bytes=size,
        )
        return PendingVersion(info=info, lock_token=token)

    def _register_watches(self, pending: PendingVersion) -> builtins.list[str]:
        return [self.keys.versions_registry, self.keys.version_lock(pending.info.version)]

    def _check_register(self, pipe: redis.client.Pipeline, pending: PendingVersion) -> None:
        """Under WATCH (immediate mode): refuse when the number got taken or the lock lost."""
        v = pending.info.version
        if pipe.hexists(self.keys.versions_registry, str(v)):
            raise VersionExistsError(f"model version {v} is already saved; versions are immutable")
        if pipe.get(self.keys.version_lock(v)) != pending.lock_token.encode():
            raise VersionLockedError(
                f"the save lock of model version {v} expired or was taken over"
            )

    def _stage_register(self, pipe: redis.client.Pipeline, pending: PendingVersion) -> None:
        info = pending.info
        pipe.hset(self.keys.versions_registry, str(info.version), info.model_dump_json())
        if info.job_id:
            pipe.hset(self.keys.versions_by_job, info.job_id, info.version)

    def _register_txn(self, pipe: redis.client.Pipeline, pending: PendingVersion) -> None:
        self._check_register(pipe, pending)
        pipe.multi()
        self._stage_register(pipe, pending)

    def discard(self, pending: PendingVersion) -> None:
        """Remove the files of a version that was written but will not be registered
        (only while we still hold its save lock, so another writer's files stay)."""
        v = pending.info.version
        try:
            mine = self.r.get(self.keys.version_lock(v)) == pending.lock_token.encode()
            if not mine or self.exists(v):
                return
        except redis.RedisError:
            return  # cannot tell whether it got registered: keep the files
        with contextlib.suppress(bentoml.exceptions.NotFound):
            self.model_store.delete(pending.info.tag)

    def release_lock(self, pending: PendingVersion) -> None:
        self._release_lock(
            keys=[self.keys.version_lock(pending.info.version)], args=[pending.lock_token]
        )

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
        return PointerState(
            current=None if cur is None else int(cur),
            pinned=None if pin is None else int(pin),
            history=[int(h) for h in hist],
        )

    def _pointer_watches(self) -> builtins.list[str]:
        k = self.keys
        return [k.version_current, k.version_pinned, k.version_history, k.versions_registry]

    def _read_pointer(self, pipe: redis.client.Pipeline) -> tuple[int | None, int | None]:
        cur, pin = pipe.get(self.keys.version_current), pipe.get(self.keys.version_pinned)
        return (None if cur is None else int(cur)), (None if pin is None else int(pin))

    def _require(self, pipe: redis.client.Pipeline, version: int) -> None:
        if not pipe.hexists(self.keys.versions_registry, str(int(version))):
            raise UnknownVersionError(f"no model version {version}")

    def _stage_move(
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
            self._require(pipe, version)
            cur, pin = self._read_pointer(pipe)
            if pin is not None and respect_pin:
                return False
            pipe.multi()
            if pin is not None:
                pipe.set(self.keys.version_pinned, int(version))
            self._stage_move(
                pipe, "set", int(version), cur, None if pin is None else int(version), reason
            )
            return True

        return self.r.transaction(txn, *self._pointer_watches(), value_from_callable=True)

    def rollback(self, reason: str = "rollback") -> int:
        """Serve the version served before the current one; the new current version."""

        def txn(pipe: redis.client.Pipeline) -> int:
            cur, pin = self._read_pointer(pipe)
            if pin is not None:
                raise PinnedError(
                    f"the pointer is pinned to version {pin}; unpin it before a rollback"
                )
            hist = [int(h) for h in pipe.lrange(self.keys.version_history, 0, -1)]
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
            self._stage_move(pipe, "rollback", target, cur, None, reason, push_history=False)
            return target

        return self.r.transaction(txn, *self._pointer_watches(), value_from_callable=True)

    def pin(self, version: int, reason: str = "pin") -> None:
        """Serve `version` and keep serving it until `unpin`."""

        def txn(pipe: redis.client.Pipeline) -> None:
            self._require(pipe, version)
            cur, _ = self._read_pointer(pipe)
            pipe.multi()
            pipe.set(self.keys.version_pinned, int(version))
            self._stage_move(pipe, "pin", int(version), cur, int(version), reason)

        self.r.transaction(txn, *self._pointer_watches())

    def unpin(self, to_latest: bool = True, reason: str = "unpin") -> int | None:
        """Lift the pin; with `to_latest`, serve the newest version. The current version."""

        def txn(pipe: redis.client.Pipeline) -> int | None:
            cur, _ = self._read_pointer(pipe)
            keys = pipe.hkeys(self.keys.versions_registry)
            latest = max((int(v) for v in keys), default=None)
            new = latest if to_latest and latest is not None else cur
            pipe.multi()
            pipe.delete(self.keys.version_pinned)
            self._stage_move(pipe, "unpin", new, cur, None, reason)
            return new

        return self.r.transaction(txn, *self._pointer_watches(), value_from_callable=True)

    def subscribe(self, timeout_s: float = 5.0) -> redis.client.PubSub:
        """A pub/sub subscribed to the announcements (read them with `next_announcement`).

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
                return ps
        ps.close()
        raise StorageError("no subscription confirmation from Redis")

    # -- first start ---------------------------------------------------------------------

    def ensure_initial(
        self,
        version0_factory: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
        timeout_s: float = 300.0,
    ) -> int:
        """Create version 0 from `version0_factory()` unless it exists, and serve it if
        nothing is served yet. Safe when several processes start at once: one builds it,
        the others wait for it. Returns 0.
        """
        lock, token = self.keys.versions_init_lock, uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        while not self.exists(0):
            if self.r.set(lock, token, nx=True, px=max(1, math.ceil(timeout_s * 1000))):
                try:
                    if not self.exists(0):
                        tensors, metadata = version0_factory()
                        self.save(0, tensors, {"parent_version": None, "step": 0, **dict(metadata)})
                finally:
                    self._release_lock(keys=[lock], args=[token])
                break
            if time.monotonic() > deadline:
                raise StorageError(
                    "timed out waiting for another process to create model version 0"
                )
            time.sleep(0.05)

        def txn(pipe: redis.client.Pipeline) -> None:
            cur, _ = self._read_pointer(pipe)
            pipe.multi()
            if cur is None:
                self._stage_move(pipe, "set", 0, None, None, "initial version")

        self.r.transaction(txn, *self._pointer_watches())
        return 0


def next_announcement(ps: redis.client.PubSub, timeout_s: float) -> Announcement | None:
    """The next announcement on `ps` within `timeout_s`, else None."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        msg = ps.get_message(timeout=left)
        if msg is not None and msg["type"] == "message":
            return Announcement.from_message(msg)


__all__ = [
    "Announcement",
    "PendingVersion",
    "PointerState",
    "VersionInfo",
    "VersionStore",
    "next_announcement",
    "tag_for",
]
