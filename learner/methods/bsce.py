"""Balanced Softmax Cross-Entropy (Jodelet, Liu and Murata, "Balanced softmax cross-entropy
for incremental learning with and without memory", CVIU 225, 2022; arXiv 2103.12532).

``CE(z + tau * log n, y)`` with ``n`` the samples per class in the step's training set (new
data plus exemplars). The prior is added in training only; prediction uses the raw logits.
``tau = 1`` and masked absent classes follow the paper; ``tau`` and a virtual count for
absent classes (``config.prior``) are ours, to measure the balance. No second stage: the
prior replaces the bias correction other methods add after training.
"""

from __future__ import annotations

import torch

from learner.losses import balanced_softmax_cross_entropy, log_prior

from .base import Method


class BalancedSoftmax(Method):
    name = "bsce"

    def logit_adjustment(self, counts: torch.Tensor) -> torch.Tensor:
        p = self.config.prior
        return log_prior(counts, p.tau, p.absent)

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert self.adjustment is not None, "before_training sets the prior"
        return balanced_softmax_cross_entropy(logits, targets, self.adjustment)
