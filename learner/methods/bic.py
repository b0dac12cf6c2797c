"""Bias Correction (Wu, Chen, Wang, Ye, Liu, Guo and Fu, "Large scale incremental learning",
CVPR 2019).

From the paper: cross-entropy plus logit distillation (temperature 2) from the previous model;
the new data and the exemplars are split into training and a balanced validation set (9:1,
``bic.held_out_fraction``; as many held-out samples per new class as per old class), the
loop never sees the held-out part, and after it a two-parameter layer ``alpha * z + beta`` on
the new classes' logits is fitted on the held-out set with the network frozen. Old classes'
logits pass unchanged. The layer is part of the network (``IncrementalNet.bias_correction``,
one pair per class, saved with the weights), so it applies at inference and in the next
step's teacher; the pairs of earlier steps stay fixed. Ours: the distillation weight is the
shared one (``distill``; the paper uses lambda = old / seen classes, i.e. ``--distill-cap 1``);
the pair is fitted by L-BFGS on the held-out logits (the problem is convex; full batch) rather
than by SGD epochs; the penalty ``0.1 * beta^2 / 2`` of the BiC authors' code (as FACIL
reproduces it) is extended to ``0.1 * ((alpha - 1)^2 + beta^2) / 2`` (``bic.penalty``),
because a held-out set of a few samples a class can be separated by a threshold on the new
logits, and the fit then runs off to extreme values (measured on the bundled subset: a step
fell to chance without it); no augmentation on the held-out set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from learner.core.evaluate import infer
from learner.core.model import IncrementalNet

from .base import HeldOut, Stage
from .ce import CrossEntropy


def fit_bias(
    logits: torch.Tensor, labels: torch.Tensor, old_classes: int, max_iter: int, penalty: float
) -> tuple[float, float]:
    """``(alpha, beta)`` minimising the cross-entropy of ``[z_old, alpha * z_new + beta]``
    plus ``penalty * ((alpha - 1)^2 + beta^2) / 2``."""
    alpha = torch.ones((), requires_grad=True)
    beta = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([alpha, beta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = torch.cat([logits[:, :old_classes], logits[:, old_classes:] * alpha + beta], dim=1)
        loss = F.cross_entropy(z, labels) + penalty * ((alpha - 1) ** 2 + beta**2) / 2
        loss.backward()
        return loss

    opt.step(closure)
    return float(alpha.detach()), float(beta.detach())


def held_out_split(
    labels: torch.Tensor, old_classes: int, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """A mask of the samples to hold out: ``fraction`` of the smallest old class's count from
    every class (at least one; never a class's last sample)."""
    counts = torch.bincount(labels)
    old = counts[:old_classes]
    per_class = max(1, int(fraction * int(old[old > 0].min())))
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        take = min(per_class, members.numel() - 1)
        mask[members[torch.randperm(members.numel(), generator=generator)[:take]]] = True
    return mask


class BiC(CrossEntropy):
    name = "bic"
    memory = "required"

    def prepare_model(
        self,
        student: IncrementalNet,
        images: torch.Tensor,
        labels: torch.Tensor,
        old_classes: int,
        device: torch.device,
    ) -> None:
        student.add_bias_correction()

    def split_training_set(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        old_classes: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, HeldOut | None]:
        if old_classes == 0 or int(labels.max()) < old_classes:
            return images, labels, None  # no old classes to correct against, or no new ones
        held = held_out_split(labels, old_classes, self.config.bic.held_out_fraction, generator)
        return images[~held], labels[~held], HeldOut(images[held], labels[held])

    def after_training(self, stage: Stage) -> dict[str, Any] | None:
        held, old = stage.held_out, stage.old_classes
        layer = stage.student.bias_correction
        if held is None or layer is None or stage.student.num_classes == old:
            return None
        c = self.config
        logits, _ = infer(
            stage.student, held.images, c.augment, device=stage.device, batch_size=c.eval_batch_size
        )
        logits = logits.clone()  # out of inference mode, so autograd may use it
        alpha, beta = fit_bias(logits, held.labels, old, c.bic.max_iter, c.bic.penalty)
        with torch.no_grad():
            layer.alpha[old:] = alpha
            layer.beta[old:] = beta
        corrected = torch.cat([logits[:, :old], logits[:, old:] * alpha + beta], dim=1)
        return {
            "alpha": alpha,
            "beta": beta,
            "held_out": int(held.labels.shape[0]),
            "held_out_accuracy_before": _accuracy(logits, held.labels),
            "held_out_accuracy_after": _accuracy(corrected, held.labels),
        }


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).double().mean())
