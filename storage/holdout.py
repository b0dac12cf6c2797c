"""Held-out images of the promotion gate: per class, uint8 images no step trains on.

Version v's job adds a chunk (``P:holdout:<v>:*``), written in the same MULTI/EXEC that
commits v, so a chunk exists exactly when its version does. A version's metadata names the
chunks of its lineage (``heldout_chunks``: its parent's plus its own), so the gate of a job
built on a rolled-back-to version reads exactly the held-out images of that lineage. Chunks are
small (a tenth of each post, capped per class) and are kept: a held-out image stays valid for
every later version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import redis

from .arrays import check_images, from_bytes, header, to_bytes
from .boundary import guarded
from .connection import default_prefix
from .errors import ExemplarValidationError
from .keys import Keys


@guarded
class HoldoutStore:
    def __init__(self, r: redis.Redis, prefix: str | None = None) -> None:
        self.r = r
        self.keys = Keys(prefix or default_prefix())

    def read(self, chunks: Iterable[int]) -> dict[int, np.ndarray]:
        """Class index -> the held-out images of ``chunks`` together, in chunk order."""
        chunks = [int(c) for c in chunks]
        if not chunks:
            return {}
        pipe = self.r.pipeline(transaction=True)
        for c in chunks:
            pipe.hgetall(self.keys.holdout_data(c))
            pipe.hgetall(self.keys.holdout_shapes(c))
        replies = pipe.execute()
        parts: dict[int, list[np.ndarray]] = {}
        for data, shapes in zip(replies[::2], replies[1::2], strict=True):
            for cls in sorted(data, key=int):
                parts.setdefault(int(cls), []).append(from_bytes(data[cls], shapes[cls]))
        return {c: np.concatenate(parts[c]) for c in sorted(parts)}

    def stage_write(
        self, pipe: redis.client.Pipeline, version: int, images: Mapping[int, np.ndarray]
    ) -> None:
        """Queue version ``version``'s chunk on a transaction pipeline (nothing when empty)."""
        data, shapes = {}, {}
        for cls, arr in images.items():
            check_images(arr, f"held-out images of class {cls}", ExemplarValidationError)
            data[str(int(cls))] = to_bytes(arr)
            shapes[str(int(cls))] = header(arr)
        pipe.delete(self.keys.holdout_data(version), self.keys.holdout_shapes(version))
        if data:
            pipe.hset(self.keys.holdout_data(version), mapping=data)
            pipe.hset(self.keys.holdout_shapes(version), mapping=shapes)
