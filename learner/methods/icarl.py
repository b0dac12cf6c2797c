"""iCaRL (Rebuffi, Kolesnikov, Sperl and Lampert, "iCaRL: Incremental classifier and
representation learning", CVPR 2017).

From the paper: sigmoid binary cross-entropy over every output, where the targets of the old
classes are the previous model's sigmoid outputs (distillation replaces their labels, for new
data and exemplars alike) and those of the new classes are one-hot; exemplars by herding
(the shared memory's default); classification by the nearest mean of exemplars (NME), which
every run evaluates where there are exemplars: ``classifier = "nme"`` tells
``learner.compare`` to report it. Ours: the loss is summed over outputs and averaged over the
batch, so that its gradient per logit has the scale of cross-entropy and iCaRL trains with
the shared schedule (lr 0.1, cosine) instead of its own (lr 2.0, step decay); ``distill.enabled``
off gives plain BCE. The reported ``distill_weight`` is the share of outputs whose targets
come from the teacher (old / seen classes); no other weight exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method


def _bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


class ICaRL(Method):
    name = "icarl"
    memory = "required"
    classifier = "nme"

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _bce(logits, F.one_hot(targets, logits.shape[1]).to(logits.dtype))

    def distill_weight(self, old_classes: int, seen_classes: int) -> float:
        return old_classes / seen_classes

    def loss(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        targets: torch.Tensor,
        teacher: tuple[torch.Tensor, torch.Tensor] | None,
        distill_weight: float,
    ) -> torch.Tensor:
        if teacher is None:
            return self.classification_loss(logits, targets)
        target = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        old = teacher[0].shape[1]
        target[:, :old] = torch.sigmoid(teacher[0].to(logits.dtype))
        return _bce(logits, target)
