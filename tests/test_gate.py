"""The promotion gate's learner side: the held-out split and the verdict (learner/gate.py)."""

import numpy as np
import pytest
import torch

from learner.base import DEFAULT_BASE_MODEL, load_base
from learner.core.gate import GateConfig
from learner.core.versioning import LoadedVersion, load_version
from learner.data import load_dataset
from learner.gate import drop_limit, holdout_count, judge, split_holdout, split_job

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("n", "expected"), [(0, 0), (1, 0), (2, 1), (19, 1), (20, 2), (100, 10), (5000, 50)]
)
def test_holdout_count_is_a_tenth_at_least_one_at_most_the_cap(n, expected):
    assert holdout_count(n, GateConfig()) == expected


def test_split_is_disjoint_complete_and_the_same_for_a_class_whatever_else_is_posted():
    labels = torch.tensor([3] * 30 + [7] * 12 + [3] * 10)
    keep, held = split_holdout(labels, GateConfig(), seed=1993)
    all_held = torch.cat(list(held.values()))
    assert sorted(held) == [3, 7] and len(held[3]) == 4 and len(held[7]) == 1
    assert sorted(torch.cat([keep, all_held]).tolist()) == list(range(len(labels)))
    alone = torch.tensor([3] * 40)
    _, held_alone = split_holdout(alone, GateConfig(), seed=1993)
    # Class 3's picks among its own images are the same with or without class 7 beside it.
    positions = (labels == 3).nonzero().squeeze(1)
    rank = {int(i): r for r, i in enumerate(positions)}
    assert [rank[int(i)] for i in held[3]] == held_alone[3].tolist()
    assert torch.equal(split_holdout(labels, GateConfig(), seed=1993)[0], keep)
    assert not torch.equal(split_holdout(labels, GateConfig(), seed=7)[1][3], held[3])


@pytest.fixture(name="base", scope="module")
def fixture_base() -> LoadedVersion:
    tensors, metadata, _ = load_base(DEFAULT_BASE_MODEL)
    return load_version(tensors, metadata)


@pytest.fixture(name="heldout", scope="module")
def fixture_heldout(base: LoadedVersion) -> dict[int, np.ndarray]:
    """The bundled subset's test images of the base model's classes (never trained on)."""
    test = load_dataset("cifar10-subset").test
    return {
        i: test.images[test.labels == test.class_names.index(name)].numpy()
        for i, name in enumerate(base.class_names)
    }


def _with_head(version: LoadedVersion, weight: torch.Tensor, bias: torch.Tensor) -> LoadedVersion:
    """A copy of ``version`` whose classifier is (weight, bias), names extended to fit."""
    tensors = {f"model.{k}": v.clone() for k, v in version.model.to_tensors().items()}
    wkey = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
    tensors[wkey], tensors[wkey.replace("weight", "bias")] = weight, bias
    names = list(version.class_names) + [
        f"new{i}" for i in range(weight.shape[0] - len(version.class_names))
    ]
    meta = {**version.metadata, "class_names": names}
    meta["model"] = {**meta["model"], "num_classes": weight.shape[0]}
    return load_version(tensors, meta)


def _head(version: LoadedVersion) -> tuple[torch.Tensor, torch.Tensor]:
    t = version.model.to_tensors()
    wkey = next(k for k in t if k.endswith("weight") and t[k].dim() == 2)
    return t[wkey].clone(), t[wkey.replace("weight", "bias")].clone()


def test_the_same_weights_are_promoted(base, heldout):
    report = judge(
        base.model,
        base.model,
        base.augment,
        base.class_names,
        heldout,
        [],
        GateConfig(),
        CPU,
        parent_version=0,
    )
    assert report.verdict == "promoted" and report.reasons == []
    assert report.old_accuracy == report.parent_old_accuracy and report.old_accuracy > 40
    assert report.heldout_images == sum(len(x) for x in heldout.values())


def test_constant_outputs_are_rejected(base, heldout):
    w, b = _head(base)
    dead = _with_head(base, torch.zeros_like(w), torch.zeros_like(b))
    report = judge(
        dead.model, base.model, base.augment, dead.class_names, heldout, [], GateConfig(), CPU
    )
    assert report.verdict == "rejected" and not report.finite


def test_a_version_that_forgets_the_old_classes_is_rejected(base, heldout):
    w, b = _head(base)
    # Two new rows whose bias wins every image: every old class is forgotten.
    w2 = torch.cat([w, w[:2]])
    b2 = torch.cat([b, torch.full((2,), 1e4)])
    grown = _with_head(base, w2, b2)
    new_images = {**heldout, 6: heldout[0][:5], 7: heldout[1][:5]}
    report = judge(
        grown.model,
        base.model,
        base.augment,
        grown.class_names,
        new_images,
        [6, 7],
        GateConfig(),
        CPU,
    )
    assert report.verdict == "rejected"
    assert any("old classes" in r for r in report.reasons)


def test_new_classes_never_predicted_fail_the_balance_check(base, heldout):
    w, b = _head(base)
    grown = _with_head(base, torch.cat([w, w[:2]]), torch.cat([b, torch.full((2,), -1e4)]))
    report = judge(
        grown.model,
        base.model,
        base.augment,
        grown.class_names,
        {**heldout, 6: heldout[0][:5], 7: heldout[1][:5]},
        [6, 7],
        GateConfig(),
        CPU,
    )
    assert report.verdict == "rejected" and report.new_accuracy == 0.0
    assert report.balance == 0.0 and any("new classes reach" in r for r in report.reasons)
    loose = GateConfig(min_balance=0.0)
    assert (
        judge(
            grown.model,
            base.model,
            base.augment,
            grown.class_names,
            {**heldout, 6: heldout[0][:5]},
            [6],
            loose,
            CPU,
        ).verdict
        == "promoted"
    )


def test_drop_limits_widen_with_the_noise_of_a_small_held_out_set():
    # 10 images at 80%: one standard error is 12.6 points, so two allow a 25-point drop (the
    # two-image fall that rejected a normal post with a fixed 15-point limit passes).
    assert drop_limit(15.0, 80.0, 10, 2.0) == pytest.approx(25.3, abs=0.1)
    assert drop_limit(15.0, 80.0, 10, 2.0) > 20.0
    # Many images, or z = 0: the configured limit.
    assert drop_limit(15.0, 80.0, 1000, 2.0) == 15.0
    assert drop_limit(15.0, 80.0, 10, 0.0) == 15.0
    assert drop_limit(15.0, 100.0, 10, 2.0) == 15.0  # no spread at 100%


def test_an_explicit_validation_set_replaces_the_split_of_its_classes_only() -> None:
    # 30 images of class 3, 40 of class 5, then 6 validation images of class 5.
    labels = torch.tensor([3] * 30 + [5] * 40 + [5] * 6)
    keep, held = split_job(labels, 6, GateConfig(), seed=1993)
    plain_keep, plain_held = split_holdout(labels[:70], GateConfig(), seed=1993)
    assert torch.equal(held[3], plain_held[3])  # class 3 is split as without a validation set
    assert held[5].tolist() == list(range(70, 76))  # class 5 is judged on its validation set
    # Every posted image of class 5 trains, none of the validation images does.
    assert set(keep.tolist()) == set(range(70)) - set(plain_held[3].tolist())
    assert torch.equal(split_job(labels[:70], 0, GateConfig(), seed=1993)[0], plain_keep)
