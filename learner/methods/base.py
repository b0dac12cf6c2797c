"""The base of every method: hooks around the shared training loop (learner.step).

Order of the hooks in a step: ``before_training`` (once, with the step's class counts),
then per batch ``loss`` (which calls ``classification_loss`` and ``distillation_loss``),
then ``after_training`` (a second stage, e.g. bias correction; none by default).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from learner.core.config import StepConfig
from learner.core.model import IncrementalNet
from learner.losses import feature_distillation, logit_distillation


class Method:
    name: ClassVar[str]

    def __init__(self, config: StepConfig) -> None:
        self.config = config
        self.adjustment: torch.Tensor | None = None

    def logit_adjustment(self, counts: torch.Tensor) -> torch.Tensor | None:
        """An additive term on the logits in training only (None: none)."""
        return None

    def before_training(self, counts: torch.Tensor, device: torch.device) -> None:
        adjustment = self.logit_adjustment(counts)
        self.adjustment = None if adjustment is None else adjustment.to(device)

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distillation_loss(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logit distillation over the teacher's (old) classes, and feature distillation
        when ``distill.feature_weight`` asks for it (None otherwise)."""
        d = self.config.distill
        old = teacher_logits.shape[1]
        kd = logit_distillation(logits[:, :old], teacher_logits, d.temperature)
        if d.feature_weight > 0:
            return kd, feature_distillation(features, teacher_features)
        return kd, None

    def loss(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        targets: torch.Tensor,
        teacher: tuple[torch.Tensor, torch.Tensor] | None,
        distill_weight: float,
    ) -> torch.Tensor:
        """``(1 - lambda) * classification + lambda * KD (+ w * feature KD)``."""
        loss = self.classification_loss(logits, targets)
        if teacher is None:
            return loss
        kd, feature_kd = self.distillation_loss(logits, features, *teacher)
        loss = (1.0 - distill_weight) * loss + distill_weight * kd
        if feature_kd is not None:
            loss = loss + self.config.distill.feature_weight * feature_kd
        return loss

    def after_training(self, student: IncrementalNet) -> None:
        """A stage after the training loop (bias correction, say); none by default."""
