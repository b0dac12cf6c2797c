"""Adaptive batching of single-image predict requests.

This is BentoML's own adaptive batcher (``CorkDispatcher``, the class behind
``@bentoml.api(batchable=True)``), driven directly instead of through a batchable endpoint.
Why: a batchable endpoint hands the batch function bare inputs, so (a) a request could be
split across two batches and so across a version swap, (b) one bad image would fail every
request merged with it, and (c) per-request status codes are out of reach. Here each
request is decoded and validated first, on its own, and enters the batcher with the
`ServedVersion` it grabbed; a merged batch runs one forward pass per version present
(almost always one). Same algorithm, same latency cap: a request that would wait longer
than ``max_latency_ms`` is refused (`Overloaded`, answered with 503).

Pinned to bentoml 1.4 (pyproject): ``CorkDispatcher`` lives in ``bentoml._internal``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio.to_thread
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher

from .holder import Score, ServedVersion
from .metrics import Metrics


class Overloaded(RuntimeError):
    """The request would have waited past the latency cap."""


@dataclass(frozen=True, eq=False)
class _Item:
    served: ServedVersion
    image: np.ndarray  # uint8 (C, H, W)
    top_k: int


def _overloaded() -> list[Score]:
    raise Overloaded("the server is overloaded: the request would wait past its latency cap")


class SingleImageBatcher:
    """Merges concurrent single-image requests of one worker into model batches."""

    def __init__(self, max_batch_size: int, max_latency_ms: int, metrics: Metrics) -> None:
        self.metrics = metrics
        self._dispatcher: CorkDispatcher[_Item, list[Score]] = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=_overloaded,
            get_batch_size=lambda _item: 1,  # never split: one item is one image
        )
        self._call = self._dispatcher(self._run)

    async def classify(self, served: ServedVersion, image: np.ndarray, top_k: int) -> list[Score]:
        """Top-k of one (C, H, W) image on `served`; raises `Overloaded` past the cap."""
        return await self._call(_Item(served, image, top_k))

    async def _run(self, items: Sequence[_Item]) -> list[list[Score]]:
        return await anyio.to_thread.run_sync(self._run_sync, items)

    def _run_sync(self, items: Sequence[_Item]) -> list[list[Score]]:
        out: list[list[Score] | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.served), []).append(i)
        for idx in groups.values():
            served = items[idx[0]].served
            start = time.perf_counter()
            probs = served.probabilities(np.stack([items[i].image for i in idx]))
            k = max(items[i].top_k for i in idx)
            scores = served.top_k(probs, k)
            self.metrics.inference_seconds.labels("single").observe(time.perf_counter() - start)
            self.metrics.batch_size.labels("single").observe(len(idx))
            for i, s in zip(idx, scores, strict=True):
                out[i] = s[: items[i].top_k]
        return [s if s is not None else [] for s in out]

    def shutdown(self) -> None:
        self._dispatcher.shutdown()
