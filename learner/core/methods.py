"""The catalogue of learning methods: one entry per method, the single source of every CLI
choice (bench, worker, replay) and of the ``method`` job override (server schema, OpenAPI).

An entry names the class that implements the method, as ``module:Class``. Only the learner
imports it (`learner.methods.get_method`), so the server can list and validate methods
without importing any training code. Adding a method is one module under
``learner/methods/`` plus one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    implementation: str  # "module:Class", imported lazily by learner.methods


METHODS = MappingProxyType(
    {
        m.name: m
        for m in (
            MethodInfo(
                "bsce",
                "Balanced Softmax Cross-Entropy + logit distillation (Jodelet, Liu and Murata, "
                "CVIU 2022)",
                "learner.methods.bsce:BalancedSoftmax",
            ),
            MethodInfo(
                "ce",
                "plain cross-entropy + logit distillation: the paper's baseline",
                "learner.methods.ce:CrossEntropy",
            ),
            MethodInfo(
                "finetune",
                "cross-entropy with replay, no distillation (ER; fine-tuning without memory)",
                "learner.methods.finetune:Finetune",
            ),
            MethodInfo(
                "lwf",
                "LwF: cross-entropy + logit distillation, no memory (Li and Hoiem, 2016)",
                "learner.methods.lwf:LwF",
            ),
            MethodInfo(
                "icarl",
                "iCaRL: sigmoid BCE + distillation, nearest-mean classifier (Rebuffi et al., 2017)",
                "learner.methods.icarl:ICaRL",
            ),
            MethodInfo(
                "eeil",
                "EEIL: CE + distillation, then class-balanced fine-tuning (Castro et al., 2018)",
                "learner.methods.eeil:EEIL",
            ),
            MethodInfo(
                "bic",
                "BiC: CE + distillation, then a bias layer on the new logits (Wu et al., 2019)",
                "learner.methods.bic:BiC",
            ),
            MethodInfo(
                "wa",
                "WA: CE + distillation, then weight aligning (Zhao et al., 2020)",
                "learner.methods.wa:WeightAligning",
            ),
            MethodInfo(
                "lucir",
                "LUCIR: cosine head, less-forget constraint, margin ranking (Hou et al., 2019)",
                "learner.methods.lucir:Lucir",
            ),
            MethodInfo(
                "bsce-lucir",
                "BSCE as the classification loss of LUCIR",
                "learner.methods.bsce_lucir:BalancedLucir",
            ),
            MethodInfo(
                "bsce-eeil",
                "BSCE + distillation, then EEIL's balanced fine-tuning (bsce: BSCE in its place)",
                "learner.methods.bsce_eeil:BalancedEEIL",
            ),
        )
    }
)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
DEFAULT_METHOD = "bsce"
# A typing.Literal built from the catalogue, so pydantic models (and the OpenAPI schema made
# from them) enumerate exactly the registered names.
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]
