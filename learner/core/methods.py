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
        )
    }
)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
DEFAULT_METHOD = "bsce"
# A typing.Literal built from the catalogue, so pydantic models (and the OpenAPI schema made
# from them) enumerate exactly the registered names.
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]
