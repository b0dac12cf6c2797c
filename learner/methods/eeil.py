"""End-to-End Incremental Learning (Castro, Marín-Jiménez, Guil, Schmid and Alahari, ECCV 2018).

From the paper: cross-entropy plus logit distillation (temperature 2) from the previous model
on the old classes, exemplars by herding, then a class-balanced fine-tuning stage: the whole
network trained again on a subset with as many samples of each class as an old class has
exemplars, at a tenth of the learning rate (``balanced_finetune.lr_factor``). Ours: the
distillation weight is the shared one (``distill``; EEIL adds the two terms); the stage runs
for the step's epochs (``balanced_finetune.epochs`` overrides them; EEIL: 30 after 40), at
least ``optim.min_steps`` optimizer steps as a step does, with the shared schedule; it keeps
the previous model as its teacher (EEIL distils the new classes there too, from the model
before the stage) and uses the shared augmentation (EEIL adds brightness, contrast and
crops). The stage's wall time is reported apart (``stage_seconds``).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Stage
from .ce import CrossEntropy


def balanced_subset(
    labels: torch.Tensor, old_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Indices of as many samples per class as the smallest old class has (its exemplars),
    drawn at random; and that number."""
    labels = labels.cpu()
    counts = torch.bincount(labels)
    old = counts[:old_classes]
    quota = int(old[old > 0].min())
    picks = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        picks.append(members[torch.randperm(members.numel(), generator=generator)[:quota]])
    return torch.cat(picks), quota


class EEIL(CrossEntropy):
    name = "eeil"
    memory = "required"

    def after_training(self, stage: Stage) -> dict[str, Any] | None:
        if stage.old_classes == 0:
            return None  # the first step is balanced already
        idx, quota = balanced_subset(stage.labels, stage.old_classes, stage.generator)
        idx = idx.to(stage.labels.device)
        x, y = stage.images[idx], stage.labels[idx]
        # The subset's counts: equal, so a logit adjustment (BSCE's prior) is flat here.
        self.before_training(torch.bincount(y, minlength=stage.student.num_classes), stage.device)
        p, optim = self.config.balanced_finetune, self.config.optim
        # The stage's budget resolves as a step's does: epochs, at least min_steps steps.
        optim = optim.model_copy(
            update={"lr": optim.lr * p.lr_factor, "epochs": p.epochs or optim.epochs}
        )
        losses = stage.train(x, y, optim)
        return {
            "images": int(y.shape[0]),
            "per_class": quota,
            "epochs": len(losses),
            "lr": optim.lr,
            "images_trained": len(losses) * int(y.shape[0]),
            "loss_per_epoch": losses,
        }
