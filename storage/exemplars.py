"""Exemplar memory: per class, uint8 images (n, C, H, W) as raw bytes with dtype and shape.

The whole memory lives in three hashes keyed by class index (data, shapes, counts) plus a
meta hash. A replacement deletes and rewrites all four inside one MULTI/EXEC: Redis runs it
as one unit, and with the append-only file on, a transaction cut short by a crash is
dropped when the file is loaded again, so a reader sees the previous memory or the new one,
whole. Reads run in a MULTI too, so they never mix two generations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from numbers import Integral

import numpy as np
import redis
from pydantic import BaseModel

from .arrays import check_images, from_bytes, header, to_bytes
from .connection import default_prefix
from .errors import ExemplarValidationError, StorageError
from .keys import Keys


class MemoryInfo(BaseModel):
    """What the memory holds, without the images."""

    version: int | None
    updated: float | None
    counts: dict[int, int]
    total_bytes: int


class ExemplarStore:
    def __init__(self, r: redis.Redis, prefix: str | None = None) -> None:
        self.r = r
        self.keys = Keys(prefix or default_prefix())

    # -- reading -----------------------------------------------------------------------

    def read_all(self) -> dict[int, np.ndarray]:
        """Class index -> uint8 array (n, C, H, W), in class order; {} when empty."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.keys.mem_data)
        pipe.hgetall(self.keys.mem_shapes)
        data, shapes = pipe.execute()
        if set(data) != set(shapes):
            raise StorageError(
                "exemplar memory is inconsistent: data and shapes name different classes"
            )
        return {int(k): from_bytes(data[k], shapes[k]) for k in sorted(data, key=int)}

    def read_class(self, index: int) -> np.ndarray | None:
        """One class's exemplars, or None when the class has none in memory."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(self.keys.mem_data, str(index))
        pipe.hget(self.keys.mem_shapes, str(index))
        data, shape = pipe.execute()
        return None if data is None else from_bytes(data, shape)

    def counts(self) -> dict[int, int]:
        raw = self.r.hgetall(self.keys.mem_counts)
        return {int(k): int(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    def total_bytes(self) -> int:
        return int(self.r.hget(self.keys.mem_meta, "total_bytes") or 0)

    def version(self) -> int | None:
        """The model version this memory was saved with, or None before the first save."""
        v = self.r.hget(self.keys.mem_meta, "version")
        return None if v is None else int(v)

    def info(self) -> MemoryInfo:
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.keys.mem_meta)
        pipe.hgetall(self.keys.mem_counts)
        meta, counts = pipe.execute()
        return MemoryInfo(
            version=int(meta[b"version"]) if b"version" in meta else None,
            updated=float(meta[b"updated"]) if b"updated" in meta else None,
            counts={int(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))},
            total_bytes=int(meta.get(b"total_bytes", 0)),
        )

    # -- writing -----------------------------------------------------------------------

    def replace_all(self, memory: Mapping[int, np.ndarray], version: int) -> None:
        """Replace the whole memory with `memory`, saved with model `version`, atomically.

        Raises `ExemplarValidationError` (nothing written) unless every value is uint8
        (n, C, H, W) with the same C, H, W and every key a class index >= 0. A class with
        n = 0 is kept with count 0 (a budget that rounds down to nothing).
        """
        prepared = self.prepare(memory, version)
        pipe = self.r.pipeline(transaction=True)
        self.stage(pipe, prepared)
        pipe.execute()

    def prepare(self, memory: Mapping[int, np.ndarray], version: int) -> PreparedMemory:
        """Validate and encode; split from `stage` so a caller can join a bigger MULTI."""
        if not isinstance(memory, Mapping):
            raise ExemplarValidationError(
                f"memory must be a mapping class index -> array, got {type(memory).__name__}"
            )
        if isinstance(version, bool) or not isinstance(version, Integral) or version < 0:
            raise ExemplarValidationError(f"version must be an integer >= 0, got {version!r}")
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
        return PreparedMemory(int(version), data, shapes, counts)

    def stage(self, pipe: redis.client.Pipeline, prepared: PreparedMemory) -> None:
        """Queue the replacement on a transaction pipeline (no command runs yet)."""
        k = self.keys
        pipe.delete(k.mem_data, k.mem_shapes, k.mem_counts, k.mem_meta)
        if prepared.data:
            pipe.hset(k.mem_data, mapping=prepared.data)
            pipe.hset(k.mem_shapes, mapping=prepared.shapes)
            pipe.hset(k.mem_counts, mapping=prepared.counts)
        pipe.hset(
            k.mem_meta,
            mapping={
                "version": prepared.version,
                "updated": repr(time.time()),
                "num_classes": len(prepared.data),
                "total_bytes": prepared.total_bytes,
                "classes": json.dumps(sorted(int(c) for c in prepared.data)),
            },
        )


class PreparedMemory:
    """A validated, encoded memory ready to be written."""

    __slots__ = ("version", "data", "shapes", "counts")

    def __init__(
        self, version: int, data: dict[str, bytes], shapes: dict[str, bytes], counts: dict[str, int]
    ) -> None:
        self.version = version
        self.data = data
        self.shapes = shapes
        self.counts = counts

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for b in self.data.values())
