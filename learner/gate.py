"""The promotion gate: hold out part of each posted class, and judge a trained version against
its parent on every held-out image before it is served.

The split is a function of the step's labels and the seed only, so the learner worker (on a
posted job) and the offline runner (on a protocol step) hold out the same images and the
HTTP replay still equals the offline run when the gate is on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from learner.core.config import AugmentConfig
from learner.core.evaluate import infer
from learner.core.gate import ClassAccuracy, GateConfig, GateReport
from learner.core.model import IncrementalNet


def holdout_count(n: int, config: GateConfig) -> int:
    """Images held out of a class that brings ``n``: the fraction rounded down, at least one
    where the class brings two or more (a fraction > 0), at most the cap."""
    if n < 2 or config.holdout_fraction <= 0 or config.holdout_max_per_class == 0:
        return 0
    return min(max(1, math.floor(n * config.holdout_fraction)), config.holdout_max_per_class)


def split_holdout(
    labels: torch.Tensor, config: GateConfig, seed: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Indices of the images to train on, and per class the indices held out.

    Each class draws its held-out images from its own generator (seed and class index), so a
    class's split does not depend on which other classes share the step or in what order the
    images were posted between classes.
    """
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    held: dict[int, torch.Tensor] = {}
    for c in sorted(int(c) for c in labels.unique()):
        idx = (labels == c).nonzero().squeeze(1)
        k = holdout_count(int(idx.numel()), config)
        if k == 0:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        chosen = idx[torch.randperm(idx.numel(), generator=g)[:k]].sort().values
        keep[chosen] = False
        held[c] = chosen
    return keep.nonzero().squeeze(1), held


def split_job(
    labels: torch.Tensor, validation: int, config: GateConfig, seed: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """`split_holdout` for a posted job whose last ``validation`` samples are the request's
    explicit validation set: those are the held-out images of their classes, and every
    training image of those classes trains (the user chose what to judge them on); the other
    classes are split as `split_holdout` splits them. Validation samples never train."""
    n = labels.shape[0] - validation
    train, held = split_holdout(labels[:n], config, seed)
    if validation == 0:
        return train, held
    given = {
        int(c): n + (labels[n:] == c).nonzero().squeeze(1)
        for c in sorted(int(c) for c in labels[n:].unique())
    }
    keep = torch.zeros(n, dtype=torch.bool)
    keep[train] = True
    for c in given:
        if c in held:
            keep[held.pop(c)] = True
    return keep.nonzero().squeeze(1), dict(sorted({**held, **given}.items()))


def accuracy_by_class(
    model: IncrementalNet,
    augment: AugmentConfig,
    heldout: Mapping[int, np.ndarray],
    device: torch.device,
) -> dict[int, float]:
    """Percent of each class's held-out images the model predicts right (classes outside its
    head are left out). NaN or inf logits count as wrong."""
    out = {}
    for c, images in heldout.items():
        if c >= model.num_classes or len(images) == 0:
            continue
        logits, _ = infer(model, torch.from_numpy(images), augment, device=device)
        right = torch.isfinite(logits).all(1) & (logits.argmax(1) == c)
        out[c] = 100.0 * float(right.float().mean())
    return out


def _finite(
    model: IncrementalNet,
    augment: AugmentConfig,
    heldout: Mapping[int, np.ndarray],
    device: torch.device,
) -> bool:
    """Finite and not constant: a diverged network often answers every image the same."""
    images = [im for im in heldout.values() if len(im)]
    if not images:
        return True
    logits, _ = infer(model, torch.from_numpy(np.concatenate(images)), augment, device=device)
    if not torch.isfinite(logits).all():
        return False
    return len(logits) < 2 or bool((logits.std(0) > 1e-6).any())


def judge(
    new: IncrementalNet,
    parent: IncrementalNet,
    augment: AugmentConfig,
    class_names: Sequence[str],
    heldout: Mapping[int, np.ndarray],
    new_classes: Sequence[int],
    config: GateConfig,
    device: torch.device,
    parent_version: int | None = None,
) -> GateReport:
    """Evaluate ``new`` and ``parent`` on ``heldout`` (uint8 images by class index) and decide.

    Old classes are the ones in the parent's head; ``new_classes`` the ones this job added;
    ``class_names`` name the new head's rows (for the report)."""
    t0 = time.monotonic()
    acc = accuracy_by_class(new, augment, heldout, device)
    parent_acc = accuracy_by_class(parent, augment, heldout, device)
    new_set = set(new_classes)
    old = [c for c in acc if c not in new_set and c in parent_acc]
    fresh = [c for c in acc if c in new_set]
    report = GateReport(
        verdict="promoted",
        parent_version=parent_version,
        classes=[_row(c, class_names, heldout, acc, parent_acc, new_set) for c in sorted(acc)],
        old_accuracy=_mean(acc, old),
        new_accuracy=_mean(acc, fresh),
        parent_old_accuracy=_mean(parent_acc, old),
        overall_accuracy=_pooled(acc, heldout, old),
        parent_overall_accuracy=_pooled(parent_acc, heldout, old),
        finite=_finite(new, augment, heldout, device),
        heldout_images=sum(len(heldout[c]) for c in acc),
        old_images=sum(len(heldout[c]) for c in old),
        thresholds=config,
    )
    if report.old_accuracy and report.new_accuracy is not None:
        report.balance = report.new_accuracy / report.old_accuracy
    report.reasons = _reasons(report, config)
    report.verdict = "rejected" if report.reasons else "promoted"
    report.seconds = time.monotonic() - t0
    return report


def drop_limit(limit: float, parent_accuracy: float, images: int, z: float) -> float:
    """``limit``, or ``z`` standard errors of a ``parent_accuracy`` percent measured on
    ``images`` held-out images where that is wider (the noise of a small held-out set)."""
    if images <= 0 or z <= 0:
        return limit
    p = min(max(parent_accuracy / 100.0, 0.0), 1.0)
    return max(limit, z * 100.0 * math.sqrt(p * (1.0 - p) / images))


def _reasons(r: GateReport, config: GateConfig) -> list[str]:
    reasons = []
    if not r.finite:
        reasons.append("the outputs are not finite, or the same for every image")
    if r.old_accuracy is not None and r.parent_old_accuracy is not None:
        drop = r.parent_old_accuracy - r.old_accuracy
        limit = drop_limit(config.max_old_drop, r.parent_old_accuracy, r.old_images, config.noise_z)
        r.old_drop_limit = limit
        if drop > limit:
            reasons.append(
                f"old classes' held-out accuracy fell {drop:.1f} points "
                f"({r.parent_old_accuracy:.1f} -> {r.old_accuracy:.1f}; limit {limit:.1f})"
            )
    if r.balance is not None and r.balance < config.min_balance:
        reasons.append(
            f"new classes reach {r.balance:.2f} of the old classes' held-out accuracy "
            f"({r.new_accuracy:.1f} vs {r.old_accuracy:.1f}; at least {config.min_balance:g})"
        )
    if r.overall_accuracy is not None and r.parent_overall_accuracy is not None:
        drop = r.parent_overall_accuracy - r.overall_accuracy
        limit = drop_limit(
            config.max_overall_drop, r.parent_overall_accuracy, r.old_images, config.noise_z
        )
        r.overall_drop_limit = limit
        if drop > limit:
            reasons.append(
                f"held-out accuracy over the parent's classes fell {drop:.1f} points "
                f"(limit {limit:.1f})"
            )
    return reasons


def _row(
    c: int,
    class_names: Sequence[str],
    heldout: Mapping[int, np.ndarray],
    acc: Mapping[int, float],
    parent_acc: Mapping[int, float],
    new_set: set[int],
) -> ClassAccuracy:
    return ClassAccuracy(
        index=c,
        name=class_names[c],
        images=len(heldout[c]),
        accuracy=acc[c],
        parent_accuracy=parent_acc.get(c),
        new=c in new_set,
    )


def _mean(acc: Mapping[int, float], classes: Sequence[int]) -> float | None:
    return float(np.mean([acc[c] for c in classes])) if classes else None


def _pooled(
    acc: Mapping[int, float], heldout: Mapping[int, np.ndarray], classes: Sequence[int]
) -> float | None:
    """Accuracy over every held-out image of ``classes`` (weighted by their images)."""
    n = sum(len(heldout[c]) for c in classes)
    if n == 0:
        return None
    return sum(acc[c] * len(heldout[c]) for c in classes) / n
