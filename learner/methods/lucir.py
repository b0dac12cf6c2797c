"""LUCIR (Hou, Pan, Loy, Wang and Lin, "Learning a unified classifier incrementally via
rebalancing", CVPR 2019).

From the paper (its CIFAR-100 settings, ``lucir`` in the config): a cosine-normalised
classifier ``sigma * cos(w_j, f)`` with one learnt scale sigma (starting at 1); cross-entropy
on it; the less-forget constraint ``1 - cos(f, f_old)`` on the features of every sample,
weighted by ``lambda = lambda_base * sqrt(old / new classes)`` with ``lambda_base = 5``; and
the inter-class separation, a margin ranking loss on the exemplars of old classes that puts
their ground-truth cosine ``margin = 0.5`` above each of the ``K = 2`` highest new-class
cosines (weight 1). No logit distillation. From the LUCIR code: the new classes' rows are
imprinted (their class's normalised mean feature under the previous model, at the old rows'
mean norm), ``lucir.imprint``. Ours: the last ReLU of the backbone is kept; LUCIR's optional
class-balanced fine-tuning is not run; with ``distill.enabled`` off (no previous model) only
the cross-entropy on the cosine head remains; a linear head (a base model, or a deployment trained
by another method) becomes a cosine head at the first LUCIR step, keeping the rows'
directions and dropping their biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from learner.core.config import StepConfig
from learner.core.evaluate import class_means_from_features, infer
from learner.core.model import CosineHead, IncrementalNet
from learner.losses import feature_distillation

from .ce import CrossEntropy


def margin_ranking(
    cosine: torch.Tensor, targets: torch.Tensor, old_classes: int, k: int, margin: float
) -> torch.Tensor:
    """Mean over (old-class sample, hard new class) pairs of
    ``max(0, margin - cos_true + cos_hard)``; 0 when the batch has no old-class sample."""
    is_old = targets < old_classes
    true = cosine.gather(1, targets[:, None])
    hard = cosine[:, old_classes:].topk(min(k, cosine.shape[1] - old_classes), dim=1).values
    per_pair = F.relu(margin - true + hard) * is_old[:, None]
    # Divided by the count without reading it on the host: no synchronisation per batch.
    return per_pair.sum() / (is_old.sum() * hard.shape[1]).clamp(min=1)


def imprint(
    student: IncrementalNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    old_classes: int,
    config: StepConfig,
    device: torch.device,
) -> None:
    """LUCIR's initialisation of the new classes' rows: the normalised mean of the class's
    normalised features (before training), scaled to the old rows' mean norm. A random row
    starts far from its class on the unit sphere; an imprinted one starts at its class mean,
    which matters most when a step trains for few epochs."""
    new = (labels >= old_classes).nonzero().squeeze(1)
    _, feats = infer(
        student, images[new], config.augment, device=device, batch_size=config.eval_batch_size
    )
    weight = student.head.weight
    with torch.no_grad():
        scale = weight[:old_classes].norm(dim=1).mean()
        for c in labels[new].unique().tolist():
            mean = class_means_from_features(feats[labels[new] == c])
            weight[c] = mean.to(weight) * scale


class Lucir(CrossEntropy):
    name = "lucir"
    memory = "required"

    def prepare_model(
        self,
        student: IncrementalNet,
        images: torch.Tensor,
        labels: torch.Tensor,
        old_classes: int,
        device: torch.device,
    ) -> None:
        student.use_cosine_head(self.config.lucir.sigma)
        assert isinstance(student.head, CosineHead)
        self.head = student.head
        if old_classes > 0 and self.config.lucir.imprint:
            imprint(student, images, labels, old_classes, self.config, device)

    def distill_weight(self, old_classes: int, seen_classes: int) -> float:
        new = max(seen_classes - old_classes, 1)  # a job may post only known classes
        return self.config.lucir.lambda_base * math.sqrt(old_classes / new)

    def loss(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        targets: torch.Tensor,
        teacher: tuple[torch.Tensor, torch.Tensor] | None,
        distill_weight: float,
    ) -> torch.Tensor:
        loss = self.classification_loss(logits, targets)
        old = 0 if teacher is None else teacher[0].shape[1]
        if teacher is None or logits.shape[1] == old:
            return loss
        p = self.config.lucir
        # The cosines themselves (the logits over sigma), whatever the scale has learnt.
        cosine = F.linear(F.normalize(features, dim=1), F.normalize(self.head.weight, dim=1))
        ranking = margin_ranking(cosine, targets, old, p.hard_negatives, p.margin)
        return (
            loss
            + distill_weight * feature_distillation(features, teacher[1])
            + p.margin_weight * ranking
        )
