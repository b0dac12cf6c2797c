"""BSCE in LUCIR's host: LUCIR's cosine classifier, less-forget constraint and margin ranking
(``learner.methods.lucir``) with its cross-entropy replaced by the Balanced Softmax (Jodelet,
Liu and Murata, CVIU 2022), the log-prior added to the scaled cosine logits in training.
Hyperparameters: ``lucir`` and ``prior``, as documented in those modules.
"""

from __future__ import annotations

from .bsce import BalancedSoftmax
from .lucir import Lucir


class BalancedLucir(BalancedSoftmax, Lucir):
    name = "bsce-lucir"
