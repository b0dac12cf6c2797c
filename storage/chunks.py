"""A job's samples as bounded chunks, so no one reads or writes them as one giant value.

``P:job:<id>:samples`` is a hash: ``header`` (JSON dtype and shape of all samples, (N, C, H,
W)), ``chunks`` (their number), ``store`` (``redis`` or ``dir``) and one field per chunk,
``c<n>``: in Redis the chunk's raw bytes (at most a few MiB), in a directory the name of the
file holding them (``<sample dir>/<dir>/<name>``, ``dir`` a field of the hash). A chunk holds
whole samples, in order. /learn submissions write the Redis layout; upload sessions
(storage/sessions.py) write either. The worker reads chunk by chunk into one array: the
process never holds the samples twice (bytes plus array), and Redis never answers one
reply of the whole job.

Jobs queued before this layout have a single ``data`` field; `read_samples` still reads them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import redis

from .arrays import header
from .errors import StorageError

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
STORE_REDIS = "redis"
STORE_DIR = "dir"
# File and directory names the directory store writes (never a path from elsewhere).
SAFE_NAME = re.compile(r"[0-9a-f]{1,64}(-[0-9a-f]{1,64})?(\.u8)?")


def chunk_field(n: int) -> str:
    return f"c{int(n)}"


def split(samples: np.ndarray, chunk_bytes: int) -> list[np.ndarray]:
    """``samples`` (N, ...) as consecutive slices of at most ``chunk_bytes`` each (at least
    one sample per slice, whatever its size)."""
    per = max(1, int(samples[0].nbytes) if len(samples) else 1)
    rows = max(1, int(chunk_bytes) // per)
    return [samples[i : i + rows] for i in range(0, len(samples), rows)]


def stage_redis_samples(
    pipe: redis.client.Pipeline, key: str, samples: np.ndarray, chunk_bytes: int
) -> None:
    """Queue ``samples`` as the chunked hash ``key`` (inside MULTI; replaces the key)."""
    parts = split(samples, chunk_bytes)
    mapping: dict[str, bytes | str | int] = {
        "header": header(samples),
        "chunks": len(parts),
        "store": STORE_REDIS,
    }
    for n, part in enumerate(parts):
        mapping[chunk_field(n)] = np.ascontiguousarray(part).tobytes()
    pipe.delete(key)
    pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]


def read_samples(r: redis.Redis, key: str, sample_dir: Path | None) -> np.ndarray | None:
    """The samples of the hash ``key``, read one chunk at a time into one uint8 array; None
    when the key (or a chunk of it) is gone (the job finished meanwhile, or expired)."""
    head, count, store, folder = r.hmget(key, ["header", "chunks", "store", "dir"])
    if head is None:
        return None
    meta = json.loads(head)
    dtype, shape = np.dtype(meta["dtype"]), tuple(int(s) for s in meta["shape"])
    if count is None:  # the single-value layout of older jobs
        data = r.hget(key, "data")
        if data is None:
            return None
        return _fill(np.empty(shape, dtype), [data])
    out = np.empty(shape, dtype)
    if store is not None and store.decode() == STORE_DIR:
        if sample_dir is None:
            raise StorageError(
                "this job's samples are in a directory (BSCE_SESSION_STORE), which this "
                "process is not configured with"
            )
        base = sample_dir / _safe(folder)

        def chunk(n: int) -> bytes | None:
            name = r.hget(key, chunk_field(n))
            if name is None:
                return None
            try:
                return (base / _safe(name)).read_bytes()
            except FileNotFoundError:
                return None
    else:

        def chunk(n: int) -> bytes | None:
            return r.hget(key, chunk_field(n))

    offset = 0
    flat = out.reshape(-1).view(np.uint8)
    for n in range(int(count)):
        data = chunk(n)
        if data is None:
            return None
        if offset + len(data) > flat.size:
            raise StorageError(f"stored samples are corrupt: chunk {n} runs past {shape}")
        flat[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        offset += len(data)
    if offset != flat.size:
        raise StorageError(
            f"stored samples are corrupt: {offset} bytes for shape {shape} {dtype} "
            f"({math.prod(shape) * dtype.itemsize} expected)"
        )
    return out


def _fill(out: np.ndarray, parts: list[bytes]) -> np.ndarray:
    data = b"".join(parts) if len(parts) > 1 else parts[0]
    if len(data) != out.nbytes:
        raise StorageError(
            f"stored array is corrupt: {len(data)} bytes for shape {out.shape} {out.dtype}"
        )
    out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
    return out


def _safe(name: bytes | str | None) -> str:
    text = name.decode() if isinstance(name, bytes) else (name or "")
    if not SAFE_NAME.fullmatch(text):
        raise StorageError(f"stored sample file name {text!r} is not one this store writes")
    return text
