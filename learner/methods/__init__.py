"""Learning methods as strategies. `learner.core.methods.METHODS` lists them; this package
holds their implementations, one module each, imported on demand.

A method (`Method`, FACIL's "approach") says what differs between recipes and nothing else:
the head it trains (LUCIR's cosine classifier, BiC's bias layer), a held-out split, the logit
adjustment it trains with, its classification loss, its distillation terms and any stage after
training (``base`` lists the hooks). The training loop, data, augmentation, schedule, memory
and random stream are shared (learner.step), so two methods run with one seed differ only
where their classes differ. Every run evaluates the CNN head and, with exemplars, the nearest
mean of exemplars; ``Method.classifier`` says which one a method is read from (iCaRL: NME).
Each module's docstring cites its paper and says which hyperparameters follow it and which
are ours; the hyperparameters are sections of ``StepConfig`` (``lwf``, ``balanced_finetune``,
``bic``, ``lucir``), so every result records them.
"""

from __future__ import annotations

import importlib

from learner.core.config import StepConfig
from learner.core.methods import METHODS

from .base import Method


def get_method(name: str) -> type[Method]:
    """The class that implements method ``name`` (a key of ``METHODS``)."""
    try:
        info = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
    module, _, cls_name = info.implementation.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name != name:
        raise TypeError(f"{info.implementation} is not the Method named {name!r}")
    return cls


def build_method(config: StepConfig) -> Method:
    return get_method(config.method)(config)


__all__ = ["Method", "build_method", "get_method"]
