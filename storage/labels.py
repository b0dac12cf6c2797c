"""The append-only label map: class name -> index, indices 0, 1, 2, ... in order of arrival.

Names are registered when a job is queued, in the same transaction (`JobQueue.submit`,
through `plan_add` and `stage_add` under WATCH); `get_or_add` does the same alone, as one
Lua script. Either way concurrent callers (API workers) never give two indices to one name
or one index to two names. A name posted again keeps its index: the class is then trained
as an old class with new data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from .boundary import guarded
from .connection import default_prefix
from .errors import LabelValidationError, UnknownLabelError
from .keys import Keys

MAX_NAME_LENGTH = 100

_GET_OR_ADD = """
local out = {}
for i, name in ipairs(ARGV) do
  local idx = redis.call('HGET', KEYS[1], name)
  if not idx then
    idx = redis.call('RPUSH', KEYS[2], name) - 1
    redis.call('HSET', KEYS[1], name, idx)
  end
  out[i] = tonumber(idx)
end
return out
"""


def validate_name(name: object) -> str:
    """Return `name` if it is a usable class name, else raise `LabelValidationError`."""
    if not isinstance(name, str):
        raise LabelValidationError(f"class name must be a string, got {type(name).__name__}")
    if not name:
        raise LabelValidationError("class name is empty")
    if name != name.strip():
        raise LabelValidationError(f"class name {name!r} has leading or trailing whitespace")
    if len(name) > MAX_NAME_LENGTH:
        raise LabelValidationError(
            f"class name is {len(name)} characters long, the limit is {MAX_NAME_LENGTH}"
        )
    if not name.isprintable():
        raise LabelValidationError(f"class name {name!r} has non-printable characters")
    return name


@dataclass(frozen=True)
class LabelPlan:
    """The indices a set of names gets, read under WATCH: known names keep theirs, new ones
    (`new`, in the order given) get the next free indices."""

    indices: dict[str, int]
    new: list[str]


@guarded
class LabelMap:
    def __init__(self, r: redis.Redis, prefix: str | None = None) -> None:
        self.r = r
        self.keys = Keys(prefix or default_prefix())
        self._script = r.register_script(_GET_OR_ADD)

    def get_or_add(self, names: Sequence[str]) -> list[int]:
        """The index of each name, adding new names at the end; all names validated first."""
        if isinstance(names, str):
            raise LabelValidationError("names must be a sequence of strings, not one string")
        checked = [validate_name(n) for n in names]
        if not checked:
            return []
        out = self._script(keys=[self.keys.labels_index, self.keys.labels_names], args=checked)
        return [int(i) for i in out]

    def watch_keys(self) -> list[str]:
        """The keys a caller of `plan_add` must WATCH."""
        return [self.keys.labels_index, self.keys.labels_names]

    def plan_add(self, pipe: redis.client.Pipeline, names: Sequence[str]) -> LabelPlan:
        """Under WATCH (immediate mode): the index of each name, new names numbered after
        the last one. Names must be validated and distinct; `stage_add` writes the plan."""
        known = pipe.hmget(self.keys.labels_index, list(names)) if names else []
        size = int(pipe.llen(self.keys.labels_names))
        indices: dict[str, int] = {}
        new: list[str] = []
        for name, idx in zip(names, known, strict=True):
            if idx is None:
                indices[name] = size + len(new)
                new.append(name)
            else:
                indices[name] = int(idx)
        return LabelPlan(indices, new)

    def stage_add(self, pipe: redis.client.Pipeline, plan: LabelPlan) -> None:
        """Queue the registration of the plan's new names (inside MULTI)."""
        if plan.new:
            pipe.rpush(self.keys.labels_names, *plan.new)
            pipe.hset(self.keys.labels_index, mapping={n: plan.indices[n] for n in plan.new})

    def names(self) -> list[str]:
        """All class names in index order."""
        return [n.decode() for n in self.r.lrange(self.keys.labels_names, 0, -1)]

    def index_of(self, name: str) -> int:
        idx = self.r.hget(self.keys.labels_index, name)
        if idx is None:
            raise UnknownLabelError(f"no class named {name!r}")
        return int(idx)

    def get(self, name: str) -> int | None:
        idx = self.r.hget(self.keys.labels_index, name)
        return None if idx is None else int(idx)

    def __len__(self) -> int:
        return int(self.r.llen(self.keys.labels_names))
