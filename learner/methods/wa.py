"""Weight Aligning (Zhao, Xiao, Gan, Zhang and Xia, "Maintaining discrimination and fairness
in class incremental learning", CVPR 2020).

From the paper: cross-entropy plus logit distillation from the previous model, then, after
training, the new classes' head rows are scaled by ``gamma = mean ||w_old|| / mean ||w_new||``
so that old and new weight norms are equal on average. Ours: the distillation weight is the
shared one (``distill``; the paper uses lambda = old / seen classes, i.e. ``--distill-cap 1``);
the paper also clips the head weights to be non-negative after every update, which is not
done here; the head here has biases, and the new rows' biases are scaled by the same gamma, so
that the new classes' logits scale as a whole (implementations differ on this point; in a
short cifar10-b0-s5 run, ResNet-8 on 300 images a class, it changed little against scaling
the weights alone). On a cosine head (a deployment that ran LUCIR) the norms do not enter
the logits, so the alignment changes nothing. Without a memory it still applies (alignment
is the only correction then).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Stage
from .ce import CrossEntropy


def align_weights(weight: torch.Tensor, bias: torch.Tensor | None, old_classes: int) -> float:
    """Scale rows ``old_classes:`` in place so their mean norm is that of the rows before,
    and their biases by the same factor; returns the factor."""
    with torch.no_grad():
        norms = weight.norm(dim=1)
        gamma = norms[:old_classes].mean() / norms[old_classes:].mean()
        weight[old_classes:] *= gamma
        if bias is not None:
            bias[old_classes:] *= gamma
    return float(gamma)


class WeightAligning(CrossEntropy):
    name = "wa"

    def after_training(self, stage: Stage) -> dict[str, Any] | None:
        head = stage.student.head
        if stage.old_classes == 0 or head.out_features == stage.old_classes:
            return None  # nothing old to align to, or no new class
        bias = getattr(head, "bias", None)  # a cosine head has none
        return {"gamma": align_weights(head.weight, bias, stage.old_classes)}
