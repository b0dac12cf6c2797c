import itertools

import pytest
import torch
import torch.nn.functional as F

from learner.core.config import MemoryConfig
from learner.exemplars import ExemplarMemory, herding, random_selection


def _prefix_error(feats: torch.Tensor, idx: torch.Tensor) -> list[float]:
    f = F.normalize(feats, dim=1)
    mu = f.mean(0)
    return [float((mu - f[idx[: k + 1]].mean(0)).norm()) for k in range(len(idx))]


def test_first_pick_is_the_brute_force_best_single_sample():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 4, generator=g)
    f = F.normalize(feats, dim=1)
    mu = f.mean(0)
    best = min(range(9), key=lambda i: float((mu - f[i]).norm()))
    assert int(herding(feats, 1)[0]) == best


def test_each_pick_is_the_brute_force_best_extension():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(8, 3, generator=g)
    f = F.normalize(feats, dim=1)
    mu = f.mean(0)
    idx = herding(feats, 6).tolist()
    assert len(set(idx)) == 6
    for k in range(1, 6):
        prefix = idx[:k]
        rest = [i for i in range(8) if i not in prefix]
        errors = {i: float((mu - f[prefix + [i]].mean(0)).norm()) for i in rest}
        assert errors[idx[k]] == pytest.approx(min(errors.values()), abs=1e-6)


def test_herding_tracks_the_mean_better_than_random_subsets():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(10, 3, generator=g)
    f = F.normalize(feats, dim=1)
    mu = f.mean(0)
    m = 4
    chosen = herding(feats, m)
    herd_err = float((mu - f[chosen].mean(0)).norm())
    all_errs = sorted(
        float((mu - f[list(s)].mean(0)).norm()) for s in itertools.combinations(range(10), m)
    )
    # Greedy is not guaranteed optimal, but it lands in the best tenth of all 210 subsets.
    assert herd_err <= all_errs[len(all_errs) // 10]


def test_herding_with_quota_above_class_size_returns_everything():
    feats = torch.randn(3, 5)
    assert sorted(herding(feats, 10).tolist()) == [0, 1, 2]


def test_random_selection_is_seeded():
    a = random_selection(100, 5, torch.Generator().manual_seed(3))
    b = random_selection(100, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 5


@pytest.mark.parametrize(
    ("mode", "size", "seen", "quota"),
    [
        ("fixed_total", 2000, 10, 200),
        ("fixed_total", 2000, 3, 666),  # not divisible: floor
        ("fixed_total", 5, 10, 0),  # budget below the class count
        ("fixed_per_class", 20, 50, 20),
        ("none", 0, 10, 0),
    ],
)
def test_quota(mode, size, seen, quota):
    assert MemoryConfig(mode=mode, size=size).quota(seen) == quota


def test_shrink_keeps_the_priority_prefix_and_small_classes_whole():
    mem = ExemplarMemory(
        {
            0: torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1),
            1: torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1),  # fewer than its quota
        }
    )
    small = mem.shrink(5)
    assert small.counts() == {0: 5, 1: 3}
    assert small.images[0].flatten().tolist() == [0, 1, 2, 3, 4]
    assert len(mem.shrink(0)) == 0
    assert mem.counts() == {0: 10, 1: 3}  # the original is untouched


def test_memory_rejects_bad_arrays():
    with pytest.raises(ValueError):
        ExemplarMemory({0: torch.zeros(2, 3, 4, dtype=torch.uint8)})
    with pytest.raises(ValueError):
        ExemplarMemory({0: torch.zeros(2, 3, 4, 4)})
    with pytest.raises(ValueError):
        MemoryConfig(mode="none", size=10)
