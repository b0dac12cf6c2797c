"""The recipe's command-line flags, shared by the offline runner and the learner worker.

Every flag defaults to None, meaning "the base config's value": the base is the typed config
(`learner.core.config`), or a protocol's preset in the runner, so each knob has one default,
in one place. The worker also reads each flag from an environment variable (``env``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from learner.core.config import StepConfig
from learner.core.methods import METHOD_NAMES


def _weight(raw: str) -> float | str:
    return raw if raw == "adaptive" else float(raw)


def _count(raw: str) -> float | str:
    return raw if raw == "masked" else float(raw)


@dataclass(frozen=True)
class Flag:
    name: str  # --name; the config field is `path` (section.field)
    path: str
    type: Callable[[str], Any]
    env: str
    help: str
    choices: tuple[str, ...] | None = None


FLAGS: tuple[Flag, ...] = (
    Flag("method", "method", str, "BSCE_METHOD", "learning method", METHOD_NAMES),
    Flag(
        "backbone",
        "model.backbone",
        str,
        "BSCE_BACKBONE",
        "network",
        ("resnet32", "resnet18", "resnet8"),
    ),
    Flag("epochs", "optim.epochs", int, "BSCE_EPOCHS", "epochs per step (at least)"),
    Flag(
        "min-steps",
        "optim.min_steps",
        int,
        "BSCE_MIN_STEPS",
        "optimizer steps per step at least (whole epochs, rounded up); 0: epochs alone",
    ),
    Flag("batch-size", "optim.batch_size", int, "BSCE_BATCH_SIZE", "batch size"),
    Flag("lr", "optim.lr", float, "BSCE_LR", "learning rate"),
    Flag(
        "precision",
        "optim.precision",
        str,
        "BSCE_PRECISION",
        "training arithmetic: auto (bf16 autocast on CUDA where supported, else fp32), fp32, bf16",
        ("auto", "fp32", "bf16"),
    ),
    Flag(
        "schedule",
        "optim.schedule",
        str,
        "BSCE_SCHEDULE",
        "lr schedule over the step",
        ("cosine", "multistep", "constant"),
    ),
    Flag(
        "distill-weight",
        "distill.weight",
        _weight,
        "BSCE_DISTILL_WEIGHT",
        "lambda: a float in [0, 1] or 'adaptive' (old / seen classes)",
    ),
    Flag(
        "distill-cap",
        "distill.weight_cap",
        float,
        "BSCE_DISTILL_CAP",
        "upper bound on the adaptive lambda",
    ),
    Flag(
        "temperature", "distill.temperature", float, "BSCE_TEMPERATURE", "distillation temperature"
    ),
    Flag(
        "feature-distill",
        "distill.feature_weight",
        float,
        "BSCE_FEATURE_DISTILL",
        "weight of LUCIR's cosine feature distillation (0: off)",
    ),
    Flag(
        "tau",
        "prior.tau",
        float,
        "BSCE_TAU",
        "strength of BSCE's log-prior (1: the paper's, 0: cross-entropy)",
    ),
    Flag(
        "absent-count",
        "prior.absent",
        _count,
        "BSCE_ABSENT_COUNT",
        "what an old class without samples counts for in the prior: 'masked' or a number",
    ),
    Flag("memory", "memory.size", int, "BSCE_MEMORY", "exemplar budget; 0: no memory"),
    Flag(
        "memory-mode",
        "memory.mode",
        str,
        "BSCE_MEMORY_MODE",
        "exemplar budget mode",
        ("fixed_total", "fixed_per_class"),
    ),
    Flag(
        "selection",
        "memory.selection",
        str,
        "BSCE_SELECTION",
        "exemplar selection",
        ("herding", "random"),
    ),
)


def add_recipe_arguments(parser: argparse.ArgumentParser, *, from_env: bool = False) -> None:
    """Add every recipe flag (default: the base config's value, or the flag's environment
    variable with ``from_env``), plus ``--no-distill``."""
    group = parser.add_argument_group("recipe (default: the config's value)")
    for f in FLAGS:
        raw = os.environ.get(f.env) if from_env else None
        group.add_argument(
            f"--{f.name}",
            type=f.type,
            choices=f.choices,
            default=None if raw is None else f.type(raw),
            help=f.help + (f" (env {f.env})" if from_env else ""),
        )
    group.add_argument("--no-distill", action="store_true", help="turn distillation off")


def recipe_from_args(args: argparse.Namespace, base: StepConfig) -> StepConfig:
    """``base`` with every flag that was given applied; raises pydantic's ValidationError."""
    data = base.model_dump()
    for f in FLAGS:
        value = getattr(args, f.name.replace("-", "_"))
        if value is None:
            continue
        section, _, field = f.path.rpartition(".")
        (data[section] if section else data)[field] = value
    if getattr(args, "no_distill", False):
        data["distill"]["enabled"] = False
    if data["memory"]["size"] != 0 and data["memory"]["mode"] == "none":
        # A memory-free preset given a budget: the mode it means is the default one.
        data["memory"]["mode"] = args.memory_mode or "fixed_total"
    return StepConfig.model_validate(data)
