"""The fast path: an interim version within seconds of a job, before the full step.

The parent's feature extractor stays frozen. Its head is grown for the job's new classes
(fresh rows drawn from the interim's own generator, never the lineage's random stream) and
the rows of the job's classes are fit with the Balanced Softmax on the features of the job's
training images and of the parent's exemplars: the prior is the log of those counts, so it
corrects the imbalance (a few new images against the whole memory) where it matters. The
fit is full batch, L-BFGS on CPU tensors, with a small L2 penalty on the rows it fits (a
class whose few images are separable would otherwise grow without bound); every other row
(the old classes) stays as the parent has it. Deterministic given the generator and the
thread count.

The exemplars' features under a version's network are the same for every job built on that
version, so `ExemplarFeatures` computes them once per version (an in-process cache; the
worker fills it while idle).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.core.config import AugmentConfig
from learner.core.evaluate import class_means_from_features, infer
from learner.core.model import IncrementalNet
from learner.exemplars import ExemplarMemory
from learner.losses import balanced_softmax_cross_entropy, log_prior


class InterimFitConfig(BaseModel):
    """The interim fit's knobs (ours): full-batch L-BFGS iterations, and the L2 weight on the
    rows it fits (what keeps 20 posted images from fitting a row of any norm)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iterations: int = Field(100, ge=1)
    weight_decay: float = Field(5e-4, ge=0)


@dataclass(frozen=True)
class Features:
    """Features (n, d) and their class indices (n,), on CPU, usable by autograd."""

    x: torch.Tensor
    y: torch.Tensor

    @staticmethod
    def of(
        model: IncrementalNet,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: AugmentConfig,
        device: torch.device,
        batch_size: int = 512,
    ) -> Features:
        _, x = infer(model, images, augment, device=device, batch_size=batch_size)
        # infer runs in inference mode; a plain copy can take part in the fit's graph.
        return Features(x.clone(), labels.clone())

    def __len__(self) -> int:
        return int(self.y.shape[0])


def memory_features(
    model: IncrementalNet,
    memory: ExemplarMemory,
    augment: AugmentConfig,
    device: torch.device,
    batch_size: int = 512,
) -> Features:
    images = list(memory.images.values())
    labels = [torch.full((len(x),), c, dtype=torch.int64) for c, x in memory.images.items()]
    if not images:
        return Features(torch.empty(0, model.feature_dim), torch.empty(0, dtype=torch.int64))
    return Features.of(model, torch.cat(images), torch.cat(labels), augment, device, batch_size)


class ExemplarFeatures:
    """The features of each version's exemplars under that version's network, by version
    number (versions are immutable), for the few versions a job may build on next."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._cache: OrderedDict[int, Features] = OrderedDict()

    def __contains__(self, version: int) -> bool:
        return version in self._cache

    def get(self, version: int) -> Features | None:
        found = self._cache.get(version)
        if found is not None:
            self._cache.move_to_end(version)
        return found

    def put(self, version: int, features: Features) -> None:
        self._cache[version] = features
        self._cache.move_to_end(version)
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)


def interim_generator(seed: int, job_id: str) -> torch.Generator:
    """The interim's own random stream (its fresh head rows), seeded from the job: the
    lineage's stream, which the full step continues, is never drawn from."""
    digest = hashlib.sha256(f"{seed}:{job_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


@dataclass(frozen=True)
class InterimFit:
    model: IncrementalNet  # the parent's network, its head grown and refit
    counts: torch.Tensor  # int64 (seen,): samples per class in the fit (the prior's counts)
    class_means: torch.Tensor  # (seen, d) NME means, NaN rows for classes without samples
    report: dict[str, Any]


def fit_interim(
    parent: IncrementalNet,
    job: Features,
    exemplars: Features,
    generator: torch.Generator,
    config: InterimFitConfig | None = None,
) -> InterimFit:
    """The interim network: ``parent`` with its head grown to the job's classes and the rows
    of the job's classes fit with BSCE on ``job`` and ``exemplars`` (features under
    ``parent``). ``parent`` is left untouched."""
    config = config or InterimFitConfig()
    t0 = time.perf_counter()
    seen = max(parent.num_classes, int(job.y.max()) + 1)
    model = copy.deepcopy(parent).cpu().eval()
    model.grow(seen, generator)
    x, y = torch.cat([job.x, exemplars.x]), torch.cat([job.y, exemplars.y])
    counts = torch.bincount(y, minlength=seen)
    rows = sorted(int(c) for c in job.y.unique())
    losses = _fit_rows(model, x, y, counts, rows, config)
    model.requires_grad_(True)
    report = {
        "fast_path": True,
        "fit": "BSCE on frozen features, L-BFGS",
        "fit_config": config.model_dump(),
        "fit_rows": rows,
        "counts": counts.tolist(),
        "job_images": len(job),
        "exemplars": len(exemplars),
        "loss_before": losses[0],
        "loss_after": losses[1],
        "fit_seconds": time.perf_counter() - t0,
    }
    return InterimFit(model, counts, _class_means(x, y, seen), report)


def _fit_rows(
    model: IncrementalNet,
    x: torch.Tensor,
    y: torch.Tensor,
    counts: torch.Tensor,
    rows: list[int],
    config: InterimFitConfig,
) -> tuple[float, float]:
    """Fit the head's weight (and bias) rows ``rows`` in place; the loss before and after."""
    prior = log_prior(counts)
    params = [p for n, p in model.head.named_parameters() if n in ("weight", "bias")]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    frozen = torch.ones(model.num_classes, dtype=torch.bool)
    frozen[rows] = False
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=config.iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        penalty = sum((p[~frozen] ** 2).sum() for p in params)
        fit = balanced_softmax_cross_entropy(model.logits(x), y, prior)
        return fit + 0.5 * config.weight_decay * penalty

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        for p in params:
            p.grad[frozen] = 0.0
        return value

    with torch.no_grad():
        before = float(loss())
    optimizer.step(closure)
    with torch.no_grad():
        after = float(loss())
    return before, after


def _class_means(x: torch.Tensor, y: torch.Tensor, seen: int) -> torch.Tensor:
    """iCaRL's means of every class in the fit (the exemplars' under the frozen network are
    the parent's own means), NaN for classes without a sample."""
    means = torch.full((seen, x.shape[1]), float("nan"))
    for c in y.unique().tolist():
        means[c] = class_means_from_features(x[y == c])
    return means
