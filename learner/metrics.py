"""Class-incremental metrics from the accuracy matrix.

Conventions (shared/class-orders.md, DESIGN.md section 2):

- a[t][k]: accuracy in percent on the test samples of the classes learnt in step k, measured
  after training step t (k <= t; entries with k > t are None). Predictions are
  task-agnostic: over all classes seen so far, never restricted to step k's classes.
- Labels are in learning order: the classes of step k are the contiguous range
  [sum(sizes[:k]), sum(sizes[:k + 1])). Steps may have any number of classes.
- Accuracy after a step is computed on all its test samples, not as a mean of matrix cells,
  so steps with more test samples weigh more (as iCaRL, PODNet and PyCIL report it).
- Average incremental accuracy: mean of those accuracies over all steps, the first included.
- Forgetting: mean over k < T of (best accuracy on step k before the last step - accuracy
  on step k after the last step), as FACIL, Continuum and Mammoth define it.
  Avalanche's first-minus-last variant is offered separately, under its own name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, computed_field, model_validator

TOP_K = 5

Matrix = list[list[float | None]]


class IncrementalMetrics(BaseModel, frozen=True):
    """Metrics of one protocol run. All accuracies in percent; step t is 0-based."""

    step_sizes: list[int]
    accuracy_matrix: Matrix
    # Accuracy on the test samples of all classes seen after each step.
    accuracy_per_step: list[float]
    avg_incremental_accuracy: float
    last_accuracy: float
    # None when there is only one step.
    forgetting: float | None
    # Accuracy on the classes of earlier steps (None for step 0) and of the step's own classes.
    old_accuracy_per_step: list[float | None]
    new_accuracy_per_step: list[float]
    # None where a step was evaluated without top-k predictions.
    top5_accuracy_per_step: list[float | None]
    # None unless every step has a top-5 accuracy.
    avg_incremental_top5: float | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def harmonic_mean_per_step(self) -> list[float | None]:
        """Harmonic mean of old and new accuracy (None for the first step): high only when
        both are, so a step that learns its classes by forgetting the rest (or the reverse)
        cannot hide behind a good average."""
        return [
            None if o is None else harmonic_mean(o, n)
            for o, n in zip(self.old_accuracy_per_step, self.new_accuracy_per_step, strict=True)
        ]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def balance_per_step(self) -> list[float | None]:
        """The lower of old and new accuracy over the higher (1 = balanced; None for the
        first step)."""
        return [
            None if o is None else balance(o, n)
            for o, n in zip(self.old_accuracy_per_step, self.new_accuracy_per_step, strict=True)
        ]

    @model_validator(mode="after")
    def _check_lengths(self) -> IncrementalMetrics:
        n = len(self.step_sizes)
        per_step = {
            "accuracy_matrix": self.accuracy_matrix,
            "accuracy_per_step": self.accuracy_per_step,
            "old_accuracy_per_step": self.old_accuracy_per_step,
            "new_accuracy_per_step": self.new_accuracy_per_step,
            "top5_accuracy_per_step": self.top5_accuracy_per_step,
        }
        for field, values in per_step.items():
            if len(values) != n:
                raise ValueError(f"{field} has {len(values)} entries for {n} steps")
        for t, row in enumerate(self.accuracy_matrix):
            if len(row) != n:
                raise ValueError(f"accuracy_matrix row {t} has {len(row)} entries, expected {n}")
        return self


class IncrementalEvaluation:
    """Accumulates one evaluation per step and turns them into IncrementalMetrics.

    After training step t, call ``add_step(y_true, y_pred, step_sizes[:t + 1])`` with the
    labels and predictions (in learning order) of the test samples of every class seen so far.
    Use one instance per classifier (e.g. the CNN head and nearest-mean-of-exemplars).
    """

    def __init__(self) -> None:
        self._step_sizes: list[int] = []
        self._rows: list[list[float]] = []
        self._accuracy: list[float] = []
        self._old: list[float | None] = []
        self._top5: list[float | None] = []

    @property
    def num_steps(self) -> int:
        return len(self._rows)

    def add_step(
        self,
        y_true: np.ndarray,
        y_pred: np.ndarray,
        step_sizes_so_far: Sequence[int],
        topk_pred: np.ndarray | None = None,
    ) -> None:
        """Record the evaluation after the next step.

        `step_sizes_so_far`: classes per step, for every step up to and including this one.
        `topk_pred`: optional (N, k) best-first predicted labels with k >= min(5, seen
        classes); only the first 5 columns count.
        """
        t = self.num_steps
        sizes = _check_step_sizes(step_sizes_so_far)
        if len(sizes) != t + 1:
            raise ValueError(
                f"step {t}: step_sizes_so_far must list the sizes of steps 0..{t} "
                f"({t + 1} entries), got {len(sizes)}"
            )
        if sizes[:t] != self._step_sizes:
            raise ValueError(
                f"step {t}: step_sizes_so_far {sizes} does not extend the earlier sizes "
                f"{self._step_sizes}"
            )
        y_true = _labels(y_true, "y_true")
        y_pred = _labels(y_pred, "y_pred")
        if y_true.shape != y_pred.shape:
            raise ValueError(f"y_true has {y_true.size} samples but y_pred has {y_pred.size}")
        if y_true.size == 0:
            raise ValueError(f"step {t}: no test samples")
        seen = sum(sizes)
        if y_true.min() < 0 or y_true.max() >= seen:
            raise ValueError(
                f"step {t}: y_true must be learning-order labels in 0..{seen - 1}, found "
                f"{int(y_true.min())}..{int(y_true.max())}"
            )

        correct = y_true == y_pred
        bounds = np.cumsum([0, *sizes])
        row: list[float] = []
        for k in range(t + 1):
            in_step = (y_true >= bounds[k]) & (y_true < bounds[k + 1])
            if not in_step.any():
                raise ValueError(
                    f"step {t}: no test samples for the classes of step {k} "
                    f"(labels {bounds[k]}..{bounds[k + 1] - 1})"
                )
            row.append(_percent(correct[in_step]))
        old = y_true < bounds[t]
        top5 = None if topk_pred is None else _topk_accuracy(y_true, topk_pred, seen)

        self._step_sizes = sizes
        self._rows.append(row)
        self._accuracy.append(_percent(correct))
        self._old.append(_percent(correct[old]) if t > 0 else None)
        self._top5.append(top5)

    def result(self) -> IncrementalMetrics:
        if not self._rows:
            raise ValueError("no step has been evaluated yet")
        n = self.num_steps
        matrix: Matrix = [[*row, *([None] * (n - len(row)))] for row in self._rows]
        avg_top5 = None
        if all(v is not None for v in self._top5):
            avg_top5 = float(np.mean(self._top5))
        return IncrementalMetrics(
            step_sizes=list(self._step_sizes),
            accuracy_matrix=matrix,
            accuracy_per_step=list(self._accuracy),
            avg_incremental_accuracy=average_incremental_accuracy(self._accuracy),
            last_accuracy=self._accuracy[-1],
            forgetting=forgetting(matrix),
            old_accuracy_per_step=list(self._old),
            new_accuracy_per_step=[row[-1] for row in self._rows],
            top5_accuracy_per_step=list(self._top5),
            avg_incremental_top5=avg_top5,
        )


def incremental_metrics(
    step_sizes: Sequence[int],
    per_step_predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    per_step_topk: Sequence[np.ndarray | None] | None = None,
) -> IncrementalMetrics:
    """All metrics at once; per_step_predictions[t] = (y_true, y_pred) after step t.

    `step_sizes` may list more steps than were evaluated (a run stopped early); the metrics
    cover the evaluated steps only.
    """
    if len(per_step_predictions) > len(step_sizes):
        raise ValueError(
            f"{len(per_step_predictions)} evaluations for {len(step_sizes)} step sizes"
        )
    if per_step_topk is not None and len(per_step_topk) != len(per_step_predictions):
        raise ValueError("per_step_topk must have one entry (or None) per evaluated step")
    evaluation = IncrementalEvaluation()
    for t, (y_true, y_pred) in enumerate(per_step_predictions):
        topk = None if per_step_topk is None else per_step_topk[t]
        evaluation.add_step(y_true, y_pred, step_sizes[: t + 1], topk)
    return evaluation.result()


def accuracy_matrix(
    step_sizes: Sequence[int],
    per_step_predictions: Sequence[tuple[np.ndarray, np.ndarray]],
) -> Matrix:
    """The T x T accuracy matrix a[t][k] (None for k > t); arguments as incremental_metrics."""
    return incremental_metrics(step_sizes, per_step_predictions).accuracy_matrix


def harmonic_mean(old: float, new: float) -> float:
    return 0.0 if old + new == 0 else 2.0 * old * new / (old + new)


def balance(old: float, new: float) -> float:
    high = max(old, new)
    return 1.0 if high == 0 else min(old, new) / high


def average_incremental_accuracy(accuracy_per_step: Sequence[float]) -> float:
    """Mean accuracy over all steps, the first included."""
    if not accuracy_per_step:
        raise ValueError("no steps")
    return float(np.mean(accuracy_per_step))


def forgetting(matrix: Matrix) -> float | None:
    """Mean over k < T of max_{k <= t < T} a[t][k] - a[T][k]; None for a single step."""
    last = len(matrix) - 1
    if last < 1:
        return None
    drops = [
        max(_cell(matrix, t, k) for t in range(k, last)) - _cell(matrix, last, k)
        for k in range(last)
    ]
    return float(np.mean(drops))


def forgetting_first_minus_last(matrix: Matrix) -> float | None:
    """Avalanche's forgetting: mean over k < T of a[k][k] - a[T][k]; None for a single step.

    It differs from `forgetting` when a step's accuracy rises after it was learnt.
    """
    last = len(matrix) - 1
    if last < 1:
        return None
    drops = [_cell(matrix, k, k) - _cell(matrix, last, k) for k in range(last)]
    return float(np.mean(drops))


def _cell(matrix: Matrix, t: int, k: int) -> float:
    value = matrix[t][k]
    if value is None:
        raise ValueError(f"accuracy matrix entry [{t}][{k}] is missing")
    return value


def _check_step_sizes(step_sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in step_sizes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"every step must have at least one class, got {sizes}")
    return sizes


def _labels(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    # A float array here usually means logits or probabilities were passed by mistake.
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _topk_accuracy(y_true: np.ndarray, topk_pred: np.ndarray, seen: int) -> float:
    topk = np.asarray(topk_pred)
    if topk.ndim != 2 or topk.shape[0] != y_true.size:
        raise ValueError(f"topk_pred must have shape ({y_true.size}, k), got {topk.shape}")
    if not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"topk_pred must hold integer labels, got dtype {topk.dtype}")
    # With fewer than 5 classes seen, top-5 is top-(seen) (trivially 100 %). Fewer columns
    # than that come from a model that predicts fewer classes than were seen (a step the
    # promotion gate rejected leaves the previous model): its top-5 is what it can answer.
    hits = (topk[:, :TOP_K] == y_true[:, None]).any(axis=1)
    return _percent(hits)


def _percent(hits: np.ndarray) -> float:
    return 100.0 * float(np.count_nonzero(hits)) / hits.size
