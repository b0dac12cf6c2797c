"""What a single job may change of the deployment's recipe, validated where it is posted
(the server) and applied where it is trained (the worker): one schema for both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from learner.core.config import StepConfig
from learner.core.methods import MethodName


class JobOverrides(BaseModel):
    """What a job may change for its own step; anything else is refused at submit time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: MethodName | None = None
    epochs: int | None = Field(None, ge=1, le=200)
    min_steps: int | None = Field(None, ge=0, le=100_000)
    lr: float | None = Field(None, gt=0, le=10)
    batch_size: int | None = Field(None, ge=1, le=4096)
    distill: bool | None = None
    # The worker's time bound on this job's training loop, in seconds (0: none), for a user
    # who would rather wait for the whole budget (learner.step.TimeBudget).
    train_seconds: float | None = Field(None, ge=0, le=86_400)


def train_seconds_for(default: float, overrides: Mapping[str, Any] | None) -> float:
    """The job's time bound on training: its override, else the worker's ``default``."""
    o = JobOverrides.model_validate(dict(overrides or {}))
    return default if o.train_seconds is None else o.train_seconds


def apply_overrides(config: StepConfig, overrides: Mapping[str, Any] | None) -> StepConfig:
    """The job's step config; raises ``ValueError`` (pydantic's) for unknown or bad fields."""
    o = JobOverrides.model_validate(dict(overrides or {}))
    optim = {
        k: v
        for k, v in {
            "epochs": o.epochs,
            "min_steps": o.min_steps,
            "lr": o.lr,
            "batch_size": o.batch_size,
        }.items()
        if v is not None
    }
    update: dict[str, Any] = {"optim": config.optim.model_copy(update=optim)}
    if o.method is not None:
        update["method"] = o.method
    if o.distill is not None:
        update["distill"] = config.distill.model_copy(update={"enabled": o.distill})
    return config.model_copy(update=update)
