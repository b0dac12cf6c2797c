import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from learner.core.config import MemoryConfig
from learner.protocols import (
    CLASS_ORDERS,
    ORDER_RULES,
    PRESETS,
    Protocol,
    get_protocol,
    load_class_order_file,
    resolve_class_order,
)

CIFAR100_NAMES = [f"class{i:03d}" for i in range(100)]


def fake_synsets(n: int, seed: int = 0) -> list[str]:
    """Sorted, unique synset-like names (ImageFolder's order), not evenly spaced."""
    gaps = np.random.RandomState(seed).randint(1, 1000, size=n)
    return [f"n{i:08d}" for i in np.cumsum(gaps)]


# ---------------------------------------------------------------- fixed orders


def test_class_orders_are_permutations_of_100_classes() -> None:
    assert set(CLASS_ORDERS) == {
        "cifar100-seed1993-numpy",
        "cifar100-seed1993-icarl",
        "cifar100-podnet-2",
        "cifar100-podnet-3",
    }
    for name, order in CLASS_ORDERS.items():
        assert isinstance(order, tuple), name
        assert sorted(order) == list(range(100)), name


def test_order_a_is_numpy_seed_1993_permutation() -> None:
    expected = np.random.RandomState(1993).permutation(100).tolist()
    assert list(CLASS_ORDERS["cifar100-seed1993-numpy"]) == expected


def test_orders_start_and_end_as_in_class_orders_md() -> None:
    # First three and last three numbers of each block of shared/class-orders.md.
    ends = {
        "cifar100-seed1993-numpy": ((68, 56, 78), (49, 57, 33)),
        "cifar100-seed1993-icarl": ((87, 0, 52), (26, 35, 39)),
        "cifar100-podnet-2": ((58, 30, 93), (23, 64, 61)),
        "cifar100-podnet-3": ((71, 54, 45), (85, 43, 11)),
    }
    for name, (head, tail) in ends.items():
        assert CLASS_ORDERS[name][:3] == head, name
        assert CLASS_ORDERS[name][-3:] == tail, name


def test_class_orders_cannot_be_mutated() -> None:
    with pytest.raises(TypeError):
        CLASS_ORDERS["mine"] = (0,)  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["mine"] = PRESETS["cifar10-b0-s5"]  # type: ignore[index]


# ---------------------------------------------------------------- presets


def test_every_design_preset_exists() -> None:
    assert set(PRESETS) == {
        "cifar100-b0-s10",
        "cifar100-b0-s20",
        "cifar100-b0-s50",
        "cifar100-b50-s5",
        "cifar100-b50-s10",
        "cifar100-b50-s25",
        "imagenet-subset-b50-s5",
        "imagenet-subset-b50-s10",
        "imagenet-subset-b50-s25",
        "imagenet-b500-s5",
        "imagenet-b500-s10",
        "cifar10-b0-s5",
        "fashion-mnist-b0-s5",
        "cifar10-subset-b0-s5",
    }
    for name, protocol in PRESETS.items():
        assert protocol.name == name


def test_preset_class_counts_add_up() -> None:
    for protocol in PRESETS.values():
        sizes = protocol.step_sizes()
        assert len(sizes) == protocol.num_steps, protocol.name
        assert sum(sizes) == protocol.total_classes, protocol.name
    assert PRESETS["cifar100-b0-s10"].step_sizes() == [10] * 10
    assert PRESETS["cifar100-b0-s20"].step_sizes() == [5] * 20
    assert PRESETS["cifar100-b0-s50"].step_sizes() == [2] * 50
    assert PRESETS["cifar100-b50-s5"].step_sizes() == [50] + [10] * 5
    assert PRESETS["cifar100-b50-s10"].step_sizes() == [50] + [5] * 10
    assert PRESETS["cifar100-b50-s25"].step_sizes() == [50] + [2] * 25
    assert PRESETS["imagenet-subset-b50-s25"].step_sizes() == [50] + [2] * 25
    assert PRESETS["imagenet-b500-s5"].step_sizes() == [500] + [100] * 5
    assert PRESETS["imagenet-b500-s10"].step_sizes() == [500] + [50] * 10
    for name in ("cifar10-b0-s5", "fashion-mnist-b0-s5", "cifar10-subset-b0-s5"):
        assert PRESETS[name].step_sizes() == [2] * 5


def test_preset_conventions() -> None:
    for steps in (10, 20, 50):
        p = PRESETS[f"cifar100-b0-s{steps}"]
        assert (p.class_order, p.memory.mode, p.memory.size, p.backbone) == (
            "cifar100-seed1993-icarl",
            "fixed_total",
            2000,
            "resnet32",
        )
    for steps in (5, 10, 25):
        p = PRESETS[f"cifar100-b50-s{steps}"]
        assert (p.class_order, p.memory.mode, p.memory.size, p.backbone) == (
            "cifar100-seed1993-numpy",
            "fixed_per_class",
            20,
            "resnet32",
        )
        p = PRESETS[f"imagenet-subset-b50-s{steps}"]
        assert (p.class_order, p.memory.mode, p.memory.size, p.backbone) == (
            "imagenet-subset-lucir",
            "fixed_per_class",
            20,
            "resnet18",
        )
    assert PRESETS["imagenet-b500-s10"].total_classes == 1000
    assert PRESETS["cifar10-subset-b0-s5"].memory.size == 200
    assert PRESETS["fashion-mnist-b0-s5"].dataset == "fashion-mnist"


def test_cifar100_presets_resolve_to_the_named_seed_1993_orders() -> None:
    icarl = resolve_class_order(get_protocol("cifar100-b0-s10"), CIFAR100_NAMES)
    numpy_order = resolve_class_order(get_protocol("cifar100-b50-s5"), CIFAR100_NAMES)
    assert icarl[:3] == [87, 0, 52]
    assert numpy_order[:3] == [68, 56, 78]


def test_step_classes_splits_the_order() -> None:
    protocol = get_protocol("cifar100-b50-s5")
    order = list(CLASS_ORDERS["cifar100-seed1993-numpy"])
    steps = protocol.step_classes(order)
    assert [len(s) for s in steps] == [50, 10, 10, 10, 10, 10]
    assert steps[0] == order[:50]
    assert steps[1][:3] == [37, 95, 14]
    assert [c for s in steps for c in s] == order


def test_step_classes_rejects_wrong_orders() -> None:
    protocol = get_protocol("cifar10-b0-s5")
    with pytest.raises(ValueError, match="10 classes, got 9"):
        protocol.step_classes(list(range(9)))
    with pytest.raises(ValueError, match=r"repeated classes: \[3\]"):
        protocol.step_classes([0, 1, 2, 3, 3, 5, 6, 7, 8, 9])


# ---------------------------------------------------------------- validation


def test_protocol_is_frozen() -> None:
    with pytest.raises(ValidationError):
        PRESETS["cifar10-b0-s5"].increment = 3  # type: ignore[misc]


def test_get_protocol_overrides_are_validated() -> None:
    p = get_protocol(
        "cifar100-b0-s10", memory=MemoryConfig(size=0), class_order="cifar100-podnet-2"
    )
    assert p.memory.mode == "none" and p.class_order == "cifar100-podnet-2"
    assert PRESETS["cifar100-b0-s10"].memory.mode == "fixed_total"  # preset untouched
    with pytest.raises(ValueError, match="add up to 90 classes, but total_classes is 100"):
        get_protocol("cifar100-b0-s10", num_steps=9)
    with pytest.raises(ValueError, match="unknown class_order"):
        get_protocol("cifar100-b0-s10", class_order="seed-1993")
    with pytest.raises(ValueError, match="has 100 classes, but total_classes is 10"):
        get_protocol("cifar10-b0-s5", class_order="cifar100-seed1993-numpy")
    with pytest.raises(ValueError, match="Extra inputs"):
        get_protocol("cifar10-b0-s5", incremnt=3)
    with pytest.raises(ValueError):
        get_protocol("cifar10-b0-s5", memory={"mode": "fixed", "size": 20})


def test_get_protocol_unknown_name_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'cifar100'.*cifar100-b0-s10"):
        get_protocol("cifar100")


def test_b0_protocol_with_uneven_shape() -> None:
    p = Protocol(
        name="custom",
        dataset="cifar10",
        backbone="resnet32",
        base_classes=4,
        increment=3,
        num_steps=3,
        class_order="identity",
        memory=MemoryConfig(mode="fixed_total", size=100),
        total_classes=10,
    )
    assert p.step_sizes() == [4, 3, 3]
    assert p.step_classes(resolve_class_order(p, [str(i) for i in range(10)])) == [
        [0, 1, 2, 3],
        [4, 5, 6],
        [7, 8, 9],
    ]


# ---------------------------------------------------------------- rule-based orders


def test_seed1993_permutation_rule_uses_a_local_generator() -> None:
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    state = np.random.get_state()
    try:
        np.random.seed(7)
        before = np.random.get_state()[1].copy()
        order = resolve_class_order(get_protocol("cifar10-b0-s5"), names)
        assert np.array_equal(np.random.get_state()[1], before)
    finally:
        np.random.set_state(state)
    assert order == np.random.RandomState(1993).permutation(10).tolist()
    assert all(type(c) is int for c in order)


def test_seed1993_permutation_equals_order_a_on_cifar100() -> None:
    protocol = get_protocol("cifar100-b50-s10")
    order = resolve_class_order(protocol, CIFAR100_NAMES, "seed1993-permutation")
    assert order == list(CLASS_ORDERS["cifar100-seed1993-numpy"])


def test_identity_rule() -> None:
    order = resolve_class_order(get_protocol("cifar10-b0-s5"), list("abcdefghij"), "identity")
    assert order == list(range(10))


def test_rule_needs_matching_class_count() -> None:
    with pytest.raises(ValueError, match="orders all 12 classes"):
        resolve_class_order(get_protocol("cifar10-b0-s5"), list("abcdefghijkl"))


def test_imagenet_subset_lucir_rule_matches_global_numpy_recipe() -> None:
    synsets = fake_synsets(1000)
    # LUCIR's recipe, on the global generator (state restored afterwards).
    state = np.random.get_state()
    try:
        np.random.seed(1993)
        lucir = np.random.choice(synsets, 100, replace=False).tolist()
    finally:
        np.random.set_state(state)

    protocol = get_protocol("imagenet-subset-b50-s10")
    order = resolve_class_order(protocol, synsets)
    assert [synsets[i] for i in order] == lucir
    assert order == np.random.RandomState(1993).choice(1000, 100, replace=False).tolist()
    # numpy's choice without replacement is a prefix of the same permutation.
    assert order == np.random.RandomState(1993).permutation(1000)[:100].tolist()


def test_imagenet_subset_lucir_rule_sorts_names_itself() -> None:
    synsets = fake_synsets(1000)
    shuffled = list(np.random.RandomState(5).permutation(synsets))
    protocol = get_protocol("imagenet-subset-b50-s5")
    from_sorted = [synsets[i] for i in resolve_class_order(protocol, synsets)]
    from_shuffled = [shuffled[i] for i in resolve_class_order(protocol, shuffled)]
    assert from_shuffled == from_sorted


def test_imagenet_subset_lucir_rule_on_a_precut_folder() -> None:
    synsets = fake_synsets(100)
    order = resolve_class_order(get_protocol("imagenet-subset-b50-s25"), synsets)
    assert order == np.random.RandomState(1993).permutation(100).tolist()
    with pytest.raises(ValueError, match="picks 100 classes, but only 99"):
        resolve_class_order(get_protocol("imagenet-subset-b50-s25"), synsets[:99])


def test_imagenet_1k_default_order() -> None:
    synsets = fake_synsets(1000)
    order = resolve_class_order(get_protocol("imagenet-b500-s5"), synsets)
    assert order == np.random.RandomState(1993).permutation(1000).tolist()


# ---------------------------------------------------------------- explicit orders


def test_explicit_order_list_and_array() -> None:
    protocol = get_protocol("cifar10-b0-s5")
    names = list("abcdefghij")
    explicit = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert resolve_class_order(protocol, names, explicit) == explicit
    assert resolve_class_order(protocol, names, np.array(explicit)) == explicit
    # An explicit subset of a larger data set: 100 of 1000 classes.
    subset = get_protocol("imagenet-subset-b50-s5")
    picked = list(range(0, 1000, 10))
    assert resolve_class_order(subset, fake_synsets(1000), picked) == picked


def test_explicit_order_files(tmp_path: Path) -> None:
    protocol = get_protocol("cifar10-b0-s5")
    names = list("abcdefghij")
    explicit = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    lines = tmp_path / "order.txt"
    lines.write_text("# my order\n" + "\n".join(map(str, explicit)) + "\n\n")
    as_json = tmp_path / "order.json"
    as_json.write_text(json.dumps(explicit))
    assert resolve_class_order(protocol, names, lines) == explicit
    assert resolve_class_order(protocol, names, as_json) == explicit
    assert resolve_class_order(protocol, names, str(lines)) == explicit
    assert load_class_order_file(lines) == explicit


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], "has 9 classes, but the protocol has 10"),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "has 11 classes"),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 8], r"repeated classes: \[8\]"),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], r"outside 0\.\.9.*\[10\]"),
        ([-1, 1, 2, 3, 4, 5, 6, 7, 8, 9], r"outside 0\.\.9"),
        ([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9], "integers only"),
        ("seed-1993", "unknown class order 'seed-1993'"),
        ("cifar100-seed1993-numpy", "has 100 classes, but the protocol has 10"),
    ],
)
def test_bad_orders_are_rejected(order: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_class_order(get_protocol("cifar10-b0-s5"), list("abcdefghij"), order)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("# nothing\n\n", "empty"),
        ("1\ntwo\n", r":2: expected one integer, got 'two'"),
        ("[1, 2.0]", "JSON list of integers"),
        ("[1, true]", "JSON list of integers"),
        ("[1, 2", "not a valid JSON list"),
    ],
)
def test_bad_order_files_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "order.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_class_order_file(path)


def test_duplicate_class_names_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        resolve_class_order(get_protocol("cifar10-b0-s5"), list("aacdefghij"))


def test_order_rules_are_known_names() -> None:
    assert set(ORDER_RULES) == {"identity", "seed1993-permutation", "imagenet-subset-lucir"}


# ---------------------------------------------------------------- memory


def test_quota_per_class() -> None:
    assert MemoryConfig(mode="fixed_total", size=2000).quota(10) == 200
    assert MemoryConfig(mode="fixed_total", size=2000).quota(30) == 66  # 2000 // 30, floor
    assert MemoryConfig(mode="fixed_total", size=2000).quota(0) == 0
    assert MemoryConfig(mode="fixed_per_class", size=20).quota(70) == 20
    assert MemoryConfig(mode="fixed_per_class", size=20).quota(0) == 0
    assert MemoryConfig(size=0).quota(10) == 0
    assert PRESETS["cifar100-b0-s10"].memory.quota(40) == 50
    with pytest.raises(ValueError):
        MemoryConfig(mode="fixed", size=20)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MemoryConfig(mode="fixed_total", size=-1)


def test_memory_size_zero_means_none() -> None:
    assert MemoryConfig(mode="fixed_per_class", size=0).mode == "none"
    with pytest.raises(ValueError, match="takes size 0"):
        MemoryConfig(mode="none", size=20)
