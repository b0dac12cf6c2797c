"""Classification and distillation losses.

Balanced Softmax Cross-Entropy (Jodelet, Liu and Murata): ``CE(z + log n, y)`` where ``n`` counts
the samples of each class in the current step's training set. The log-prior is a training-time
term only; prediction uses the raw logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_prior(
    counts: torch.Tensor, tau: float = 1.0, absent: float | str = "masked"
) -> torch.Tensor:
    """``tau * log n_j``; a class with no sample this step gets ``-inf`` ("masked") or the log
    of a virtual count ``absent``.

    ``-inf`` removes the class from the softmax, so new data neither pushes its logit down nor
    receives gradient through it (the memory-free setting). ``tau = 1`` is the paper's prior,
    ``tau = 0`` turns BSCE into plain cross-entropy over the classes present.
    """
    counts = counts.to(torch.float32)
    if (counts < 0).any():
        raise ValueError("class counts must be non-negative")
    if absent != "masked":
        counts = torch.where(counts > 0, counts, torch.full_like(counts, float(absent)))
    return torch.where(counts > 0, tau * counts.log(), torch.full_like(counts, float("-inf")))


def balanced_softmax_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor
) -> torch.Tensor:
    """BSCE given ``prior = log_prior(counts)`` (precomputed once per step, not per batch)."""
    return F.cross_entropy(logits + prior, targets)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def logit_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the teacher's classes.

    ``T^2`` keeps the gradient scale independent of the temperature (Hinton et al.).
    """
    t = temperature
    student = F.log_softmax(student_logits / t, dim=1)
    teacher = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


def feature_distillation(
    student_features: torch.Tensor, teacher_features: torch.Tensor
) -> torch.Tensor:
    """LUCIR's less-forget constraint: 1 - cos between L2-normalised features."""
    return (1.0 - F.cosine_similarity(student_features, teacher_features, dim=1)).mean()
