"""Exemplar memory in generations: per class, uint8 images (n, C, H, W) as raw bytes with
their dtype and shape (never pickle).

The memory a learning step trains on and the one it selects are generations: generation g
is the memory written together with model version g (`Storage.commit_step`, or version 0's
in `VersionStore.ensure_initial`), and a version names its generation in its metadata
(``memory_generation``). Generations are immutable once their version is committed; which
ones are kept is `VersionStore`'s rule (storage/versions.py).

One generation is four hashes keyed by class index (data, shapes, counts) plus a meta
hash, and its number is in the ``P:mem:generations`` set. Writing one runs inside one
MULTI/EXEC (with the version's registration, when committed): Redis runs it as one unit,
and with the append-only file on, a transaction cut short by a crash is dropped when the
file is loaded again, so a reader sees the generation whole or not at all. Reads run in a
MULTI too.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterable, Mapping
from numbers import Integral

import numpy as np
import redis
from pydantic import BaseModel

from .arrays import check_images, from_bytes, header, to_bytes
from .boundary import guarded
from .connection import default_prefix
from .errors import ExemplarValidationError, MemoryGenerationError, StorageError
from .keys import Keys


class MemoryInfo(BaseModel):
    """What one generation holds, without the images."""

    generation: int
    updated: float | None
    counts: dict[int, int]
    total_bytes: int


class PreparedMemory:
    """A validated, encoded memory ready to be written as `generation`."""

    __slots__ = ("generation", "data", "shapes", "counts")

    def __init__(
        self,
        generation: int,
        data: dict[str, bytes],
        shapes: dict[str, bytes],
        counts: dict[str, int],
    ) -> None:
        self.generation = generation
        self.data = data
        self.shapes = shapes
        self.counts = counts

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for b in self.data.values())


def _check_generation(generation: object) -> int:
    if isinstance(generation, bool) or not isinstance(generation, Integral) or generation < 0:
        raise ExemplarValidationError(f"generation must be an integer >= 0, got {generation!r}")
    return int(generation)


@guarded
class ExemplarStore:
    def __init__(self, r: redis.Redis, prefix: str | None = None) -> None:
        self.r = r
        self.keys = Keys(prefix or default_prefix())

    # -- reading -----------------------------------------------------------------------

    def read(self, generation: int) -> dict[int, np.ndarray]:
        """Class index -> uint8 array (n, C, H, W), in class order; {} for an empty memory.

        Raises `MemoryGenerationError` when the generation does not exist.
        """
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.sismember(k.mem_generations, int(generation))
        pipe.hgetall(k.mem_data(generation))
        pipe.hgetall(k.mem_shapes(generation))
        present, data, shapes = pipe.execute()
        if not present:
            raise MemoryGenerationError(f"no exemplar memory generation {generation}")
        if set(data) != set(shapes):
            raise StorageError(
                f"exemplar memory generation {generation} is inconsistent: data and shapes "
                "name different classes"
            )
        return {int(c): from_bytes(data[c], shapes[c]) for c in sorted(data, key=int)}

    def read_class(self, generation: int, index: int) -> np.ndarray | None:
        """One class's exemplars in `generation`, or None when it has none there."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(self.keys.mem_data(generation), str(index))
        pipe.hget(self.keys.mem_shapes(generation), str(index))
        data, shape = pipe.execute()
        return None if data is None else from_bytes(data, shape)

    def exists(self, generation: int) -> bool:
        return bool(self.r.sismember(self.keys.mem_generations, int(generation)))

    def generations(self) -> builtins.list[int]:
        """The generations stored, in order."""
        return sorted(int(g) for g in self.r.smembers(self.keys.mem_generations))

    def counts(self, generation: int) -> dict[int, int]:
        """Class index -> exemplars in `generation` ({} when it does not exist)."""
        raw = self.r.hgetall(self.keys.mem_counts(generation))
        return {int(c): int(n) for c, n in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    def info(self, generation: int) -> MemoryInfo:
        """Counts and size of `generation`; `MemoryGenerationError` when it does not exist."""
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.sismember(k.mem_generations, int(generation))
        pipe.hgetall(k.mem_meta(generation))
        pipe.hgetall(k.mem_counts(generation))
        present, meta, counts = pipe.execute()
        if not present:
            raise MemoryGenerationError(f"no exemplar memory generation {generation}")
        return MemoryInfo(
            generation=int(generation),
            updated=float(meta[b"updated"]) if b"updated" in meta else None,
            counts={int(c): int(n) for c, n in sorted(counts.items(), key=lambda kv: int(kv[0]))},
            total_bytes=int(meta.get(b"total_bytes", 0)),
        )

    # -- writing -----------------------------------------------------------------------

    def write(self, generation: int, memory: Mapping[int, np.ndarray]) -> None:
        """Write `memory` as `generation`, atomically, replacing that generation whole.

        For tools and tests (an operator's edit of a memory): the learner's generations are
        written by `Storage.commit_step`. Raises `ExemplarValidationError` (nothing written)
        unless every value is uint8 (n, C, H, W) with the same C, H, W and every key a class
        index >= 0. A class with n = 0 is kept with count 0 (a budget that rounds to nothing).
        """
        prepared = self.prepare(memory, generation)
        pipe = self.r.pipeline(transaction=True)
        self.stage_write(pipe, prepared)
        pipe.execute()

    def delete(self, generation: int) -> None:
        """Remove `generation` (a no-op when it does not exist)."""
        pipe = self.r.pipeline(transaction=True)
        self.stage_delete(pipe, [generation])
        pipe.execute()

    def prepare(self, memory: Mapping[int, np.ndarray], generation: int) -> PreparedMemory:
        """Validate and encode; split from `stage_write` so a caller can join a bigger MULTI."""
        if not isinstance(memory, Mapping):
            raise ExemplarValidationError(
                f"memory must be a mapping class index -> array, got {type(memory).__name__}"
            )
        generation = _check_generation(generation)
        chw: tuple[int, ...] | None = None
        data: dict[str, bytes] = {}
        shapes: dict[str, bytes] = {}
        counts: dict[str, int] = {}
        for key, arr in memory.items():
            if isinstance(key, bool) or not isinstance(key, Integral) or key < 0:
                raise ExemplarValidationError(f"class index must be an integer >= 0, got {key!r}")
            what = f"exemplars of class {int(key)}"
            check_images(arr, what, ExemplarValidationError, chw=chw, allow_empty=True)
            chw = chw or tuple(arr.shape[1:])
            data[str(int(key))] = to_bytes(arr)
            shapes[str(int(key))] = header(arr)
            counts[str(int(key))] = int(arr.shape[0])
        return PreparedMemory(generation, data, shapes, counts)

    def stage_write(self, pipe: redis.client.Pipeline, prepared: PreparedMemory) -> None:
        """Queue the writing of a generation on a transaction pipeline (inside MULTI)."""
        k, g = self.keys, prepared.generation
        pipe.delete(*k.mem_keys(g))
        if prepared.data:
            pipe.hset(k.mem_data(g), mapping=prepared.data)
            pipe.hset(k.mem_shapes(g), mapping=prepared.shapes)
            pipe.hset(k.mem_counts(g), mapping=prepared.counts)
        pipe.hset(
            k.mem_meta(g),
            mapping={
                "generation": g,
                "updated": repr(time.time()),
                "num_classes": len(prepared.data),
                "total_bytes": prepared.total_bytes,
                "classes": json.dumps(sorted(int(c) for c in prepared.data)),
            },
        )
        pipe.sadd(k.mem_generations, g)

    def stage_delete(self, pipe: redis.client.Pipeline, generations: Iterable[int]) -> None:
        """Queue the removal of `generations` on a transaction pipeline (inside MULTI)."""
        gens = [int(g) for g in generations]
        if not gens:
            return
        pipe.delete(*(key for g in gens for key in self.keys.mem_keys(g)))
        pipe.srem(self.keys.mem_generations, *gens)
