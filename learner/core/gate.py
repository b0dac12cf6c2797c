"""The promotion gate's settings and report (the server shows reports, the learner makes them).

A job's version is served only when, on held-out images of every class it knows, it is not
clearly worse than the version it was trained from (`learner.gate.judge`). The held-out images
are a fraction of each posted class's images that no step trains on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Verdict = Literal["promoted", "rejected", "skipped"]


class GateConfig(BaseModel):
    """Deployment settings of the gate (``BSCE_GATE_<FIELD>`` for the worker).

    The thresholds are ours. With 10-50 held-out images a class, one image is 2-10 points of a
    class's accuracy, so the limits leave room for that noise and catch what they are for: a
    diverged job (non-finite or constant outputs), one that wipes out the old classes, and one
    whose new classes are not learnt next to the old ones (the balance the Balanced Softmax
    exists for).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # Fraction of each class's posted images held out (rounded down; at least one image where
    # a class brings two or more, so a post of 2 images still gets one to check).
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    holdout_max_per_class: int = Field(50, ge=0)
    # Old classes' mean held-out accuracy may fall this many points below the parent's.
    max_old_drop: float = Field(15.0, ge=0, le=100)
    # The new classes' mean held-out accuracy must reach this fraction of the old classes'.
    min_balance: float = Field(0.3, ge=0, le=1)
    # Held-out accuracy over every image of the classes the parent knew may fall this much.
    max_overall_drop: float = Field(10.0, ge=0, le=100)
    # Ours: both drop limits widen to this many standard errors of the parent's held-out
    # accuracy on those images (100 * sqrt(p (1 - p) / n)), so that with 10-20 held-out
    # images (one image is 5-10 points) noise alone does not reject a post; a version that
    # forgets (a drop of tens of points) still fails. 0 keeps the fixed limits.
    noise_z: float = Field(2.0, ge=0)


class ClassAccuracy(BaseModel):
    index: int
    name: str
    images: int
    accuracy: float  # percent, the new version
    parent_accuracy: float | None  # percent, the parent (None: the parent did not know it)
    new: bool


class GateReport(BaseModel):
    """What the gate measured and decided for one version."""

    verdict: Verdict
    reasons: list[str] = Field(default_factory=list, description="why it was rejected")
    parent_version: int | None = None
    classes: list[ClassAccuracy] = Field(default_factory=list)
    old_accuracy: float | None = None
    new_accuracy: float | None = None
    parent_old_accuracy: float | None = None
    overall_accuracy: float | None = None
    parent_overall_accuracy: float | None = None
    balance: float | None = Field(None, description="new / old held-out accuracy")
    finite: bool = True
    heldout_images: int = 0
    old_images: int = Field(0, description="held-out images of the old classes")
    old_drop_limit: float | None = Field(None, description="the old-class limit applied")
    overall_drop_limit: float | None = Field(None, description="the overall limit applied")
    seconds: float = 0.0
    thresholds: GateConfig | None = None
