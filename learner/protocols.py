"""Scripted class streams: the published class-incremental benchmark protocols.

A protocol fixes the data set, the class order, the step sizes and the exemplar budget. The
class order is always resolved into an explicit list of original class indices (the data
set's own label indices) so that it can be logged with every result.

Orders and conventions are those of ``shared/class-orders.md``. The order seed (1993) is a
property of the protocol and has nothing to do with the training seed.
"""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from learner.core.config import MemoryConfig

ORDER_SEED = 1993

Dataset = Literal[
    "cifar10", "cifar100", "imagenet", "imagenet-subset", "fashion-mnist", "cifar10-subset"
]
Backbone = Literal["resnet32", "resnet18"]

# Literal CIFAR-100 orders, copied from shared/class-orders.md. Indices are torchvision's
# fine-label indices (alphabetical class names). They are literals rather than recomputed
# because order B cannot be recomputed without replaying the original iCaRL data loader.
# fmt: off
CLASS_ORDERS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        # Order A: np.random.seed(1993); np.random.permutation(100). PyCIL, FACIL
        # (cifar100_icarl) and the LUCIR code use it.
        "cifar100-seed1993-numpy": (
            68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38,
            58, 70, 77, 1, 85, 19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44,
            91, 41, 72, 60, 79, 52, 20, 10, 31, 54, 37, 95, 14, 71, 96, 98, 97, 2, 64, 66,
            42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11, 12, 47, 25, 30, 46,
            62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
        ),
        # Order B: what the original iCaRL CIFAR-100 script ends up with (its loader draws
        # from the seeded generator before permuting). Also PODNet's first order and the
        # fixed order of Avalanche's iCaRL baseline.
        "cifar100-seed1993-icarl": (
            87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86,
            84, 96, 18, 24, 32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83,
            17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75,
            38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76,
            40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
        ),
        # PODNet reports the mean over three orders: order B above and these two.
        "cifar100-podnet-2": (
            58, 30, 93, 69, 21, 77, 3, 78, 12, 71, 65, 40, 16, 49, 89, 46, 24, 66, 19, 41,
            5, 29, 15, 73, 11, 70, 90, 63, 67, 25, 59, 72, 80, 94, 54, 33, 18, 96, 2, 10,
            43, 9, 57, 81, 76, 50, 32, 6, 37, 7, 68, 91, 88, 95, 85, 4, 60, 36, 22, 27,
            39, 42, 34, 51, 55, 28, 53, 48, 38, 17, 83, 86, 56, 35, 45, 79, 99, 84, 97, 82,
            98, 26, 47, 44, 62, 13, 31, 0, 75, 14, 52, 74, 8, 20, 1, 92, 87, 23, 64, 61,
        ),
        "cifar100-podnet-3": (
            71, 54, 45, 32, 4, 8, 48, 66, 1, 91, 28, 82, 29, 22, 80, 27, 86, 23, 37, 47,
            55, 9, 14, 68, 25, 96, 36, 90, 58, 21, 57, 81, 12, 26, 16, 89, 79, 49, 31, 38,
            46, 20, 92, 88, 40, 39, 98, 94, 19, 95, 72, 24, 64, 18, 60, 50, 63, 61, 83, 76,
            69, 35, 0, 52, 7, 65, 42, 73, 74, 30, 41, 3, 6, 53, 13, 56, 70, 77, 34, 97,
            75, 2, 17, 93, 33, 84, 99, 51, 62, 87, 5, 15, 10, 78, 67, 44, 59, 85, 43, 11,
        ),
    }
)
# fmt: on

# Orders computed from the data set's class names:
# - "identity": the data set's own label order.
# - "seed1993-permutation": np.random.RandomState(1993).permutation(n) over label indices
#   (identical to order A for CIFAR-100; our default for ImageNet-1k, CIFAR-10, Fashion-MNIST).
# - "imagenet-subset-lucir": LUCIR's ImageNet-Subset rule, see resolve_class_order.
ORDER_RULES: tuple[str, ...] = ("identity", "seed1993-permutation", "imagenet-subset-lucir")
# "seed<N>-permutation" for any N: RandomState(N).permutation(n), for runs over several orders.
_PERMUTATION = re.compile(r"^seed(\d+)-permutation$")


def is_order_name(name: str) -> bool:
    return name in CLASS_ORDERS or name in ORDER_RULES or bool(_PERMUTATION.match(name))


def order_names(first: str, k: int) -> list[str]:
    """``k`` class orders for a run over several orders, ``first`` first. After order B
    (iCaRL's, PODNet's first) come PODNet's other two, as PODNet averages them; then, and for
    every other order, the seed-1994, 1995, ... permutations (ours)."""
    if k < 1:
        raise ValueError(f"need at least one order, got {k}")
    names = [first]
    if first == "cifar100-seed1993-icarl":
        names += ["cifar100-podnet-2", "cifar100-podnet-3"]
    seed = ORDER_SEED + 1
    while len(names) < k:
        names.append(f"seed{seed}-permutation")
        seed += 1
    return names[:k]


class Protocol(BaseModel, frozen=True, extra="forbid"):
    """One class-incremental protocol. Validated on construction: step sizes add up."""

    name: str = Field(min_length=1)
    dataset: Dataset
    backbone: Backbone
    # 0 means no separate base step: the first step has `increment` classes ("b0").
    base_classes: int = Field(ge=0)
    increment: int = Field(ge=1)
    # Total number of steps, the base step included.
    num_steps: int = Field(ge=1)
    # A name from CLASS_ORDERS or ORDER_RULES; explicit lists go to resolve_class_order.
    class_order: str
    # The literature's budget for this protocol; MemoryConfig(size=0) is the memory-free one.
    memory: MemoryConfig
    total_classes: int = Field(ge=1)

    @model_validator(mode="after")
    def _check_consistency(self) -> Protocol:
        sizes = self.step_sizes()
        if sum(sizes) != self.total_classes:
            raise ValueError(
                f"protocol {self.name!r}: step sizes {_describe_sizes(sizes)} add up to "
                f"{sum(sizes)} classes, but total_classes is {self.total_classes} "
                f"(base_classes={self.base_classes}, increment={self.increment}, "
                f"num_steps={self.num_steps})"
            )
        if not is_order_name(self.class_order):
            raise ValueError(
                f"protocol {self.name!r}: unknown class_order {self.class_order!r}; known: "
                f"{', '.join([*CLASS_ORDERS, *ORDER_RULES])} (pass an explicit order or a "
                "file to resolve_class_order instead)"
            )
        fixed = CLASS_ORDERS.get(self.class_order)
        if fixed is not None and len(fixed) != self.total_classes:
            raise ValueError(
                f"protocol {self.name!r}: class order {self.class_order!r} has {len(fixed)} "
                f"classes, but total_classes is {self.total_classes}"
            )
        return self

    def step_sizes(self) -> list[int]:
        """Number of classes learnt in each step, in step order."""
        if self.base_classes > 0:
            return [self.base_classes] + [self.increment] * (self.num_steps - 1)
        return [self.increment] * self.num_steps

    def step_classes(self, order: Sequence[int]) -> list[list[int]]:
        """Split a resolved class order into the original class indices of each step."""
        order = [operator.index(c) for c in order]
        if len(order) != self.total_classes:
            raise ValueError(
                f"protocol {self.name!r} needs an order of {self.total_classes} classes, "
                f"got {len(order)}"
            )
        if len(set(order)) != len(order):
            raise ValueError(f"class order has repeated classes: {_repeated(order)}")
        steps: list[list[int]] = []
        start = 0
        for size in self.step_sizes():
            steps.append(order[start : start + size])
            start += size
        return steps


def _describe_sizes(sizes: list[int]) -> str:
    if len(sizes) > 6:
        return f"[{', '.join(map(str, sizes[:3]))}, ..., {sizes[-1]}] ({len(sizes)} steps)"
    return str(sizes)


def _repeated(order: Sequence[int]) -> list[int]:
    return sorted(c for c, count in Counter(order).items() if count > 1)


def _build_presets() -> Mapping[str, Protocol]:
    presets: dict[str, Protocol] = {}

    def add(name: str, **fields: object) -> None:
        presets[name] = Protocol(name=name, **fields)

    # iCaRL (Rebuffi et al., CVPR 2017): CIFAR-100 from scratch in 10/20/50 steps of
    # 10/5/2 classes, ResNet-32, 2,000 exemplars in total, in the order its script produces
    # (order B). PyCIL's "B0 Inc10/5/2" tables follow the same protocol.
    for steps in (10, 20, 50):
        add(
            f"cifar100-b0-s{steps}",
            dataset="cifar100",
            backbone="resnet32",
            base_classes=0,
            increment=100 // steps,
            num_steps=steps,
            class_order="cifar100-seed1993-icarl",
            memory=MemoryConfig(mode="fixed_total", size=2000),
            total_classes=100,
        )
    # LUCIR (Hou et al., CVPR 2019) and PODNet (Douillard et al., ECCV 2020): 50 base
    # classes, then 5/10/25 steps of 10/5/2, 20 exemplars per class. LUCIR's code permutes
    # with np.random.seed(1993) (order A); PODNet averages its three orders (B, podnet-2,
    # podnet-3), which a user selects with a class_order override.
    for steps in (5, 10, 25):
        add(
            f"cifar100-b50-s{steps}",
            dataset="cifar100",
            backbone="resnet32",
            base_classes=50,
            increment=50 // steps,
            num_steps=steps + 1,
            class_order="cifar100-seed1993-numpy",
            memory=MemoryConfig(mode="fixed_per_class", size=20),
            total_classes=100,
        )
    # LUCIR/PODNet on ImageNet-Subset: the same shape with ResNet-18 and LUCIR's 100-class
    # selection rule (PODNet's own file lists give a close, different set).
    for steps in (5, 10, 25):
        add(
            f"imagenet-subset-b50-s{steps}",
            dataset="imagenet-subset",
            backbone="resnet18",
            base_classes=50,
            increment=50 // steps,
            num_steps=steps + 1,
            class_order="imagenet-subset-lucir",
            memory=MemoryConfig(mode="fixed_per_class", size=20),
            total_classes=100,
        )
    # LUCIR/PODNet on ImageNet-1k: 500 base classes, then 5/10 steps of 100/50, 20 per
    # class. No published order could be confirmed; the seed-1993 permutation over sorted
    # synsets is our default and is documented as ours.
    for steps in (5, 10):
        add(
            f"imagenet-b500-s{steps}",
            dataset="imagenet",
            backbone="resnet18",
            base_classes=500,
            increment=500 // steps,
            num_steps=steps + 1,
            class_order="seed1993-permutation",
            memory=MemoryConfig(mode="fixed_per_class", size=20),
            total_classes=1000,
        )
    # Split CIFAR-10 / Split Fashion-MNIST in 5 steps of 2 classes (as in Avalanche and
    # Mammoth). The budget (iCaRL's 2,000 in total) and the seed-1993 order are our choice.
    for dataset in ("cifar10", "fashion-mnist"):
        add(
            f"{dataset}-b0-s5",
            dataset=dataset,
            backbone="resnet32",
            base_classes=0,
            increment=2,
            num_steps=5,
            class_order="seed1993-permutation",
            memory=MemoryConfig(mode="fixed_total", size=2000),
            total_classes=10,
        )
    # Ours: the small CIFAR-10 subset bundled for demos and tests, with a budget scaled down
    # to its size.
    add(
        "cifar10-subset-b0-s5",
        dataset="cifar10-subset",
        backbone="resnet32",
        base_classes=0,
        increment=2,
        num_steps=5,
        class_order="seed1993-permutation",
        memory=MemoryConfig(mode="fixed_total", size=200),
        total_classes=10,
    )
    return MappingProxyType(presets)


PRESETS: Mapping[str, Protocol] = _build_presets()


def get_protocol(name: str, **overrides: object) -> Protocol:
    """A preset by name, with fields replaced by `overrides` (validated again)."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown protocol {name!r}; known: {', '.join(sorted(PRESETS))}"
        ) from None
    return Protocol.model_validate({**preset.model_dump(), **overrides})


def load_class_order_file(path: str | Path) -> list[int]:
    """Read an order file: a JSON list of ints, or one int per line (blank and # lines skipped)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid JSON list: {exc}") from None
        # bool is an int subclass, and a float like 3.0 would hide a malformed file.
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(f"{path}: expected a JSON list of integers")
        order = list(values)
    else:
        order = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                order.append(int(line))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected one integer, got {line!r}") from None
    if not order:
        raise ValueError(f"{path}: the class order file is empty")
    return order


def resolve_class_order(
    protocol: Protocol,
    class_names: Sequence[str],
    order: str | Sequence[int] | Path | None = None,
) -> list[int]:
    """The original class indices of `protocol`, in learning order.

    `class_names` are the data set's classes indexed by label (for an ImageFolder tree that is
    the sorted folder names). `order` overrides `protocol.class_order`: a name from
    CLASS_ORDERS or ORDER_RULES, a path to an order file (a str that is not a name is tried as
    a path), or an explicit sequence of label indices. Every result is checked: unique, in
    range of `class_names`, and exactly `protocol.total_classes` long.

    `imagenet-subset-lucir` is LUCIR's rule: over the sorted class names,
    ``np.random.seed(1993); np.random.choice(classes, 100, replace=False)``, here computed as
    ``RandomState(1993).choice(n, total_classes, replace=False)`` on a local generator.
    Given the full 1,000 ImageNet synsets it yields the 100 LUCIR classes in LUCIR's order.
    Given exactly `total_classes` names (a folder already cut down to the subset) it yields
    the seed-1993 permutation of those names (numpy's choice without replacement is a
    prefix of the same permutation): the same classes, but not LUCIR's order. To reproduce
    LUCIR's order from a pre-cut folder, pass that order explicitly.
    """
    names = list(class_names)
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")
    spec = protocol.class_order if order is None else order
    if isinstance(spec, str):
        if spec in CLASS_ORDERS:
            indices = list(CLASS_ORDERS[spec])
        elif spec in ORDER_RULES or _PERMUTATION.match(spec):
            indices = _apply_rule(spec, names, protocol.total_classes)
        elif Path(spec).is_file():
            indices = load_class_order_file(spec)
        else:
            raise ValueError(
                f"unknown class order {spec!r} (and no such file); known: "
                f"{', '.join([*CLASS_ORDERS, *ORDER_RULES])}"
            )
    elif isinstance(spec, Path):
        indices = load_class_order_file(spec)
    else:
        try:
            # operator.index refuses floats and other non-integers instead of truncating.
            indices = [operator.index(c) for c in spec]
        except TypeError:
            raise ValueError("an explicit class order must contain integers only") from None
    _validate_order(indices, len(names), protocol.total_classes)
    return indices


def _apply_rule(rule: str, names: list[str], total_classes: int) -> list[int]:
    n = len(names)
    if rule == "imagenet-subset-lucir":
        if n < total_classes:
            raise ValueError(
                f"imagenet-subset-lucir picks {total_classes} classes, but only {n} class "
                "names were given"
            )
        by_name = sorted(range(n), key=names.__getitem__)
        # A local generator: the global numpy RNG must stay untouched for the training seed.
        picked = np.random.RandomState(ORDER_SEED).choice(n, total_classes, replace=False)
        return [by_name[int(i)] for i in picked]
    if n != total_classes:
        raise ValueError(
            f"class order {rule!r} orders all {n} classes of the data set, but the protocol "
            f"has {total_classes}; pass an explicit order instead"
        )
    if rule == "identity":
        return list(range(n))
    permutation = _PERMUTATION.match(rule)
    if permutation:
        seed = int(permutation.group(1))
        return [int(i) for i in np.random.RandomState(seed).permutation(n)]
    raise AssertionError(f"unhandled order rule {rule!r}")  # ORDER_RULES and this disagree


def _validate_order(order: list[int], num_names: int, total_classes: int) -> None:
    if len(order) != total_classes:
        raise ValueError(
            f"class order has {len(order)} classes, but the protocol has {total_classes}"
        )
    if len(set(order)) != len(order):
        raise ValueError(f"class order has repeated classes: {_repeated(order)}")
    bad = [c for c in order if not 0 <= c < num_names]
    if bad:
        raise ValueError(
            f"class order has indices outside 0..{num_names - 1} (the data set has "
            f"{num_names} classes): {bad[:10]}"
        )
