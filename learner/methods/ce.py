"""Plain cross-entropy with the same distillation, memory and schedule: the baseline the
paper measures the Balanced Softmax against (its gap is the paper's claim)."""

from __future__ import annotations

import torch

from learner.losses import cross_entropy

from .base import Method


class CrossEntropy(Method):
    name = "ce"

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets)
