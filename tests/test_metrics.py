import numpy as np
import pytest

from learner.metrics import (
    IncrementalEvaluation,
    IncrementalMetrics,
    accuracy_matrix,
    forgetting,
    forgetting_first_minus_last,
    incremental_metrics,
)


def evaluation_after_step(
    step_sizes: list[int],
    samples_per_class: list[int],
    correct_per_step: list[int],
    shuffle_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Test labels of the steps seen so far and predictions with a chosen number of hits.

    Step k has step_sizes[k] classes with samples_per_class[k] samples each; the first
    correct_per_step[k] of them are predicted right, the others as the next class.
    """
    seen = sum(step_sizes)
    bounds = np.cumsum([0, *step_sizes])
    y_true_parts, y_pred_parts = [], []
    for k, n_correct in enumerate(correct_per_step):
        labels = np.repeat(np.arange(bounds[k], bounds[k + 1]), samples_per_class[k])
        assert n_correct <= labels.size
        wrong = (labels + 1) % seen
        y_true_parts.append(labels)
        y_pred_parts.append(np.where(np.arange(labels.size) < n_correct, labels, wrong))
    y_true = np.concatenate(y_true_parts)
    y_pred = np.concatenate(y_pred_parts)
    if shuffle_seed is not None:
        perm = np.random.RandomState(shuffle_seed).permutation(y_true.size)
        y_true, y_pred = y_true[perm], y_pred[perm]
    return y_true, y_pred


def assert_matrix(actual: list[list[float | None]], expected: list[list[float | None]]) -> None:
    # pytest.approx does not nest; compare row by row.
    assert actual == [pytest.approx(row) for row in expected]


# 50 base classes, then 3 steps of 5 classes. 1 test sample per base class (50 samples),
# 2 per incremental class (10 samples per incremental step).
B50_SIZES = [50, 5, 5, 5]
B50_SAMPLES = [1, 2, 2, 2]
B50_CORRECT = [
    [30],  # after step 0: base 30/50
    [40, 9],  # after step 1: base 40/50, step 1 9/10
    [35, 6, 10],  # after step 2
    [25, 7, 5, 8],  # after step 3
]


def b50_evaluation() -> IncrementalEvaluation:
    evaluation = IncrementalEvaluation()
    for t, correct in enumerate(B50_CORRECT):
        sizes = B50_SIZES[: t + 1]
        y_true, y_pred = evaluation_after_step(sizes, B50_SAMPLES, correct, shuffle_seed=t)
        evaluation.add_step(y_true, y_pred, sizes)
    return evaluation


def test_b50_three_steps_of_5() -> None:
    m = b50_evaluation().result()
    assert m.step_sizes == [50, 5, 5, 5]
    assert_matrix(
        m.accuracy_matrix,
        [
            [60.0, None, None, None],  # 30/50
            [80.0, 90.0, None, None],  # 40/50, 9/10
            [70.0, 60.0, 100.0, None],  # 35/50, 6/10, 10/10
            [50.0, 70.0, 50.0, 80.0],  # 25/50, 7/10, 5/10, 8/10
        ],
    )
    # On all samples seen so far, not the mean of the row's cells.
    expected_all = [
        100 * 30 / 50,  # 60
        100 * (40 + 9) / 60,  # 81.67 (cell mean would be 85)
        100 * (35 + 6 + 10) / 70,  # 72.86
        100 * (25 + 7 + 5 + 8) / 80,  # 56.25
    ]
    assert m.accuracy_per_step == pytest.approx(expected_all)
    assert m.avg_incremental_accuracy == pytest.approx(sum(expected_all) / 4)
    assert m.last_accuracy == pytest.approx(56.25)
    assert m.old_accuracy_per_step == pytest.approx(
        [None, 80.0, 100 * (35 + 6) / 60, 100 * (25 + 7 + 5) / 70]
    )
    assert m.new_accuracy_per_step == pytest.approx([60.0, 90.0, 100.0, 80.0])
    # Forgetting uses the BEST earlier accuracy: for step 0 it is 80 (after step 1), not the
    # 60 measured right after step 0.
    #   k=0: max(60, 80, 70) - 50 = 30
    #   k=1: max(90, 60) - 70 = 20
    #   k=2: max(100) - 50 = 50
    assert m.forgetting == pytest.approx((30 + 20 + 50) / 3)
    # Avalanche's first-minus-last: (60-50) + (90-70) + (100-50) = 10 + 20 + 50.
    assert forgetting_first_minus_last(m.accuracy_matrix) == pytest.approx((10 + 20 + 50) / 3)
    assert m.top5_accuracy_per_step == [None] * 4
    assert m.avg_incremental_top5 is None


def test_uneven_steps_4_2_3() -> None:
    sizes = [4, 2, 3]
    per_class = [2, 2, 2]  # step sizes in samples: 8, 4, 6
    correct = [[6], [5, 3], [4, 1, 3]]
    predictions = [
        evaluation_after_step(sizes[: t + 1], per_class, c) for t, c in enumerate(correct)
    ]
    m = incremental_metrics(sizes, predictions)
    assert_matrix(
        m.accuracy_matrix,
        [
            [75.0, None, None],  # 6/8
            [62.5, 75.0, None],  # 5/8, 3/4
            [50.0, 25.0, 50.0],  # 4/8, 1/4, 3/6
        ],
    )
    # 6/8; (5+3)/12 (cell mean would be 68.75); (4+1+3)/18
    expected_all = [75.0, 100 * 8 / 12, 100 * 8 / 18]
    assert m.accuracy_per_step == pytest.approx(expected_all)
    assert m.avg_incremental_accuracy == pytest.approx((75 + 800 / 12 + 800 / 18) / 3)
    assert m.old_accuracy_per_step == pytest.approx([None, 62.5, 100 * 5 / 12])
    assert m.new_accuracy_per_step == pytest.approx([75.0, 75.0, 50.0])
    # k=0: max(75, 62.5) - 50 = 25; k=1: 75 - 25 = 50
    assert m.forgetting == pytest.approx(37.5)
    assert accuracy_matrix(sizes, predictions) == m.accuracy_matrix


def test_forgetting_functions_on_a_literal_matrix() -> None:
    matrix = [
        [70.0, None, None],
        [90.0, 60.0, None],
        [40.0, 65.0, 80.0],
    ]
    # best earlier: k=0: 90 - 40 = 50; k=1: 60 - 65 = -5 -> 22.5
    assert forgetting(matrix) == pytest.approx(22.5)
    # first minus last: k=0: 70 - 40 = 30; k=1: 60 - 65 = -5 -> 12.5
    assert forgetting_first_minus_last(matrix) == pytest.approx(12.5)
    assert forgetting([[55.0]]) is None
    assert forgetting_first_minus_last([[55.0]]) is None


def test_single_step() -> None:
    evaluation = IncrementalEvaluation()
    evaluation.add_step(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), [2])
    m = evaluation.result()
    assert m.accuracy_matrix == [[75.0]]
    assert m.forgetting is None
    assert m.old_accuracy_per_step == [None]
    assert m.avg_incremental_accuracy == m.last_accuracy == 75.0


def top5_rows(y_true: np.ndarray, hit: np.ndarray, seen: int) -> np.ndarray:
    """Five best-first guesses per sample; the true label is 5th where `hit`, else absent."""
    guesses = np.stack([(y_true + j) % seen for j in range(1, 6)], axis=1)
    guesses[hit, 4] = y_true[hit]
    return guesses


def test_top5() -> None:
    evaluation = IncrementalEvaluation()
    # Step 0: 4 classes, so top-5 is top-4 and always right, whatever the top-1 is.
    y0 = np.array([0, 1, 2, 3])
    top0 = np.stack([(y0 + j) % 4 for j in range(1, 5)], axis=1)
    evaluation.add_step(y0, top0[:, 0], [4], topk_pred=top0)
    # Step 1: 6 classes seen, 12 samples, true label among the 5 guesses for 9 of them.
    y1 = np.repeat(np.arange(6), 2)
    hit = np.arange(12) < 9
    top1 = top5_rows(y1, hit, 6)
    # Extra columns beyond 5 are ignored.
    top1_wide = np.concatenate([top1, y1[:, None]], axis=1)
    evaluation.add_step(y1, top1[:, 0], [4, 2], topk_pred=top1_wide)
    m = evaluation.result()
    assert m.top5_accuracy_per_step == pytest.approx([100.0, 75.0])
    assert m.avg_incremental_top5 == pytest.approx(87.5)
    assert m.accuracy_per_step == [0.0, 0.0]


def test_top5_partial_and_invalid() -> None:
    evaluation = IncrementalEvaluation()
    y = np.repeat(np.arange(6), 2)
    # A model with fewer classes than were seen (a step the promotion gate rejected) answers
    # fewer than 5 columns: its top-k is what it has (here right for classes 0-2 only).
    narrow = IncrementalEvaluation()
    narrow.add_step(y, np.minimum(y, 2), [6], topk_pred=np.stack([y.clip(0, 2)] * 3, axis=1))
    assert narrow.result().top5_accuracy_per_step == [50.0]
    with pytest.raises(ValueError, match="shape"):
        evaluation.add_step(y, y, [6], topk_pred=y)
    evaluation.add_step(y, y, [6], topk_pred=top5_rows(y, np.ones(12, bool), 6))
    y2 = np.repeat(np.arange(8), 2)
    evaluation.add_step(y2, y2, [6, 2])
    m = evaluation.result()
    assert m.top5_accuracy_per_step == [100.0, None]
    assert m.avg_incremental_top5 is None


def test_bad_inputs_are_rejected() -> None:
    evaluation = IncrementalEvaluation()
    y = np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="no step has been evaluated"):
        evaluation.result()
    with pytest.raises(ValueError, match="sizes of steps 0..0"):
        evaluation.add_step(y, y, [2, 2])
    with pytest.raises(ValueError, match=r"0\.\.1, found 0\.\.3"):
        evaluation.add_step(y, y, [2])
    with pytest.raises(ValueError, match="4 samples but y_pred has 3"):
        evaluation.add_step(y, y[:3], [4])
    with pytest.raises(ValueError, match="integer labels"):
        evaluation.add_step(y, y.astype(float), [4])
    with pytest.raises(ValueError, match="no test samples"):
        evaluation.add_step(np.array([], dtype=int), np.array([], dtype=int), [4])
    with pytest.raises(ValueError, match="at least one class"):
        evaluation.add_step(y, y, [0])
    evaluation.add_step(y, y, [4])
    with pytest.raises(
        ValueError, match=r"no test samples for the classes of step 1 \(labels 4\.\.5\)"
    ):
        evaluation.add_step(y, y, [4, 2])
    with pytest.raises(ValueError, match="does not extend"):
        evaluation.add_step(np.arange(6), np.arange(6), [3, 3])
    # Failed calls left no trace: only the one good step was recorded.
    assert evaluation.num_steps == 1
    with pytest.raises(ValueError, match="3 evaluations for 2 step sizes"):
        incremental_metrics([2, 2], [(y, y)] * 3)


def test_metrics_round_trip_through_json() -> None:
    m = b50_evaluation().result()
    again = IncrementalMetrics.model_validate_json(m.model_dump_json())
    assert again == m
    with pytest.raises(ValueError, match="accuracy_per_step has 3 entries for 4 steps"):
        IncrementalMetrics.model_validate({**m.model_dump(), "accuracy_per_step": [1, 2, 3]})
