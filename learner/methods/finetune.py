"""Fine-tuning with replay: cross-entropy on the new data plus the exemplars, no distillation.

Experience replay (ER; e.g. Chaudhry et al., "On tiny episodic memories in continual
learning", 2019) when there is a memory, plain fine-tuning (the lower bound every
class-incremental paper reports) when there is none. No hyperparameters of its own: the
shared schedule, memory and augmentation.
"""

from __future__ import annotations

from .ce import CrossEntropy


class Finetune(CrossEntropy):
    name = "finetune"
    # No teacher is built: the step costs only the student's forward and backward.
    distills = False
