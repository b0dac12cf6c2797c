"""The base of every method: hooks around the shared training loop (learner.step).

Order of the hooks in a step:

1. ``prepare_model`` on the student, once its head has grown (a cosine head, a bias layer,
   new rows imprinted from the new data);
2. ``split_training_set`` (a held-out split that the loop never sees; none by default);
3. ``before_training`` with the class counts of what is trained on;
4. per batch ``loss``, which calls ``classification_loss`` and ``distillation_loss``, weighted
   by ``distill_weight``;
5. ``after_training``: a second stage (bias correction, balanced fine-tuning); none by default.
   Its wall time is reported apart from the loop's (``stage_seconds``).

A subclass overrides only what differs; its hyperparameters are its section of the typed
config (``learner.core.config``), which every result records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from learner.core.config import OptimConfig, StepConfig
from learner.core.model import IncrementalNet
from learner.losses import feature_distillation, logit_distillation

# What a method needs of the exemplar memory: "any" setting; "required": exemplars of the old
# classes (a step with old classes and none is refused); "none": designed for the memory-free
# setting (with a memory it still replays it). learner.compare picks methods by it.
MemoryUse = Literal["any", "required", "none"]


@dataclass(frozen=True)
class HeldOut:
    """Samples kept out of the training loop for a second stage (BiC's validation split)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class Stage:
    """What a stage after the training loop may use. ``train`` runs the shared loop again
    (same student, teacher, loss, augmentation and random stream) on other samples with
    another optimiser setting, and returns the loss per epoch."""

    student: IncrementalNet
    teacher: IncrementalNet | None
    images: torch.Tensor  # the step's training set as trained (uint8), held-out split removed
    labels: torch.Tensor
    held_out: HeldOut | None
    old_classes: int
    config: StepConfig
    device: torch.device
    generator: torch.Generator
    train: Callable[[torch.Tensor, torch.Tensor, OptimConfig], list[float]]


class Method:
    name: ClassVar[str]
    memory: ClassVar[MemoryUse] = "any"
    # The classifier a method is read from: its CNN head, or iCaRL's nearest mean of
    # exemplars (every run evaluates both where there are exemplars).
    classifier: ClassVar[Literal["cnn", "nme"]] = "cnn"
    # False: no teacher is built and no distillation computed (replay alone).
    distills: ClassVar[bool] = True

    def __init__(self, config: StepConfig) -> None:
        self.config = config
        self.adjustment: torch.Tensor | None = None

    def prepare_model(
        self,
        student: IncrementalNet,
        images: torch.Tensor,
        labels: torch.Tensor,
        old_classes: int,
        device: torch.device,
    ) -> None:
        """Change the student before training: its head has grown to the step's classes and
        it is on ``device``; ``images`` and ``labels`` are the step's new data."""

    def split_training_set(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        old_classes: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, HeldOut | None]:
        """The samples the loop trains on, and any held out for a later stage."""
        return images, labels, None

    def logit_adjustment(self, counts: torch.Tensor) -> torch.Tensor | None:
        """An additive term on the logits in training only (None: none)."""
        return None

    def before_training(self, counts: torch.Tensor, device: torch.device) -> None:
        adjustment = self.logit_adjustment(counts)
        self.adjustment = None if adjustment is None else adjustment.to(device)

    def distill_weight(self, old_classes: int, seen_classes: int) -> float:
        """lambda of the step (reported with it)."""
        return self.config.distill.weight_for(old_classes, seen_classes)

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
        """``weigh(classification, KD, lambda) (+ w * feature KD)``."""
        loss = self.classification_loss(logits, targets)
        if teacher is None:
            return loss
        kd, feature_kd = self.distillation_loss(logits, features, *teacher)
        loss = self.weigh(loss, kd, distill_weight)
        if feature_kd is not None:
            loss = loss + self.config.distill.feature_weight * feature_kd
        return loss

    def weigh(
        self, classification: torch.Tensor, distillation: torch.Tensor, distill_weight: float
    ) -> torch.Tensor:
        """How the two terms add up: the convex combination of EEIL and BiC."""
        return (1.0 - distill_weight) * classification + distill_weight * distillation

    def after_training(self, stage: Stage) -> dict[str, Any] | None:
        """A stage after the training loop; returns what it did, for the step's report
        (None: no stage ran)."""
        return None
