"""Learning without Forgetting (Li and Hoiem, "Learning without forgetting", ECCV 2016; TPAMI
2018), in its class-incremental form: one head, cross-entropy on the new data plus logit
distillation from the previous model on the old classes' outputs, no exemplar memory.

From the paper: the loss ``CE + lambda_o * KD`` with ``lambda_o = 1`` (``lwf.weight``) and
temperature 2 (the shared ``distill.temperature``, default 2). Ours: the paper's warm-up stage
that trains the new head alone first is not done (every method here trains all weights from
the first batch); the multi-head, task-aware evaluation of the paper is replaced by the
class-incremental one. With a memory it also replays the exemplars; ``learner.compare`` runs
it only in the memory-free setting unless asked.
"""

from __future__ import annotations

import torch

from .ce import CrossEntropy


class LwF(CrossEntropy):
    name = "lwf"
    memory = "none"

    def distill_weight(self, old_classes: int, seen_classes: int) -> float:
        return self.config.lwf.weight

    def weigh(
        self, classification: torch.Tensor, distillation: torch.Tensor, distill_weight: float
    ) -> torch.Tensor:
        return classification + distill_weight * distillation
