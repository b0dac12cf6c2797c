"""Arrays as raw bytes plus an explicit dtype and shape (never pickle)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from .errors import InvalidInputError, StorageError


def check_images(
    a: object,
    what: str,
    error: type[InvalidInputError],
    chw: Sequence[int] | None = None,
    allow_empty: bool = False,
) -> np.ndarray:
    """Return `a` if it is a uint8 array (N, C, H, W), else raise `error` saying why."""
    if not isinstance(a, np.ndarray):
        raise error(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.uint8:
        raise error(f"{what} must have dtype uint8, got {a.dtype}")
    if a.ndim != 4:
        raise error(f"{what} must have 4 dimensions (N, C, H, W), got shape {tuple(a.shape)}")
    if not allow_empty and a.shape[0] == 0:
        raise error(f"{what} is empty (N = 0)")
    if min(a.shape[1:]) <= 0:
        raise error(f"{what} has an empty image dimension: shape {tuple(a.shape)}")
    if chw is not None and tuple(a.shape[1:]) != tuple(chw):
        raise error(
            f"{what} must have images of shape (C, H, W) = {tuple(chw)}, got {tuple(a.shape[1:])}"
        )
    return a


def header(a: np.ndarray) -> bytes:
    # dtype.str carries byte order ("|u1", "<f4"), so a reader on any machine decodes it right.
    return json.dumps({"dtype": a.dtype.str, "shape": list(a.shape)}).encode()


def to_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes(order="C")


def from_bytes(data: bytes, head: bytes | str) -> np.ndarray:
    """Decode bytes written by `to_bytes` with their `header`; a writable copy."""
    meta = json.loads(head)
    dtype = np.dtype(meta["dtype"])
    shape = tuple(int(s) for s in meta["shape"])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise StorageError(
            f"stored array is corrupt: {len(data)} bytes for shape {shape} {dtype} ({expected} expected)"
        )
    # bytearray makes the result writable (np.frombuffer over bytes is read-only).
    return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
