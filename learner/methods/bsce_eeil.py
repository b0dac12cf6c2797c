"""BSCE in EEIL's host, with EEIL's class-balanced fine-tuning kept: the Balanced Softmax
(Jodelet, Liu and Murata, CVIU 2022) trains the step, then the stage of ``learner.methods.eeil``
fine-tunes on a balanced subset (where BSCE's prior is flat, i.e. plain cross-entropy).

The paper's variant, BSCE *in place of* the balanced fine-tuning (no second stage), is the
method ``bsce`` itself (BSCE + the same logit distillation); this one measures whether the
stage adds anything once BSCE is used, and what it costs. Hyperparameters: ``prior`` (BSCE)
and ``balanced_finetune`` (EEIL), as documented in those modules.
"""

from __future__ import annotations

from .bsce import BalancedSoftmax
from .eeil import EEIL


class BalancedEEIL(BalancedSoftmax, EEIL):
    name = "bsce-eeil"
