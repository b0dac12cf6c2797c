"""The training step on real images (the bundled CIFAR-10 subset)."""

import pytest
import torch

from learner.bench import run_protocol, step_config_for
from learner.core.config import DistillConfig, MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.evaluate import infer
from learner.core.model import IncrementalNet
from learner.data import load_dataset
from learner.exemplars import ExemplarMemory
from learner.protocols import get_protocol
from learner.step import StepData, train_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def subset():
    return load_dataset("cifar10-subset")


def _config(subset, **kw) -> StepConfig:
    base = step_config_for(get_protocol("cifar10-subset-b0-s5"), subset)
    fields = {
        "model": ModelConfig(backbone="resnet8"),
        "optim": OptimConfig(epochs=2, min_steps=0, batch_size=64),
        **kw,
    }
    return base.model_copy(update=fields)


def _classes(subset, classes, split="train"):
    s = getattr(subset, split)
    idx = torch.isin(s.labels, torch.tensor(classes)).nonzero().squeeze(1)
    remap = {c: i for i, c in enumerate(sorted(set(classes) | set(range(max(classes) + 1))))}
    labels = torch.tensor([remap[int(c)] for c in s.labels[idx]])
    return StepData(s.images[idx].clone(), labels)


def test_same_seed_same_weights(subset):
    config = _config(subset, memory=MemoryConfig(mode="fixed_total", size=40))
    data = _classes(subset, [0, 1])
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        model = IncrementalNet.create(config.model, g)
        r1 = train_step(model, data, ExemplarMemory(), config, device=CPU, generator=g)
        r2 = train_step(
            r1.model, _classes(subset, [2, 3]), r1.memory, config, device=CPU, generator=g
        )
        runs.append(r2)
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(runs[0].memory.images[c], runs[1].memory.images[c]) for c in range(4))


def test_step_leaves_its_inputs_untouched_and_grows_the_head(subset):
    config = _config(subset, memory=MemoryConfig(mode="fixed_per_class", size=5))
    g = torch.Generator().manual_seed(0)
    model = IncrementalNet.create(config.model, g)
    first = train_step(
        model, _classes(subset, [0, 1]), ExemplarMemory(), config, device=CPU, generator=g
    )
    before = {k: v.clone() for k, v in first.model.state_dict().items()}
    memory_before = first.memory.counts()
    second = train_step(
        first.model, _classes(subset, [2, 3, 4]), first.memory, config, device=CPU, generator=g
    )
    assert all(torch.equal(before[k], v) for k, v in first.model.state_dict().items())
    assert first.memory.counts() == memory_before
    assert second.model.num_classes == 5
    assert second.report.old_classes == 2
    assert second.report.counts == [5, 5, 100, 100, 100]
    assert second.memory.counts() == {c: 5 for c in range(5)}
    assert second.report.distill_weight == pytest.approx(2 / 5)


def test_class_posted_again_keeps_its_index_and_counts_both(subset):
    config = _config(subset, memory=MemoryConfig(mode="fixed_per_class", size=10))
    g = torch.Generator().manual_seed(0)
    model = IncrementalNet.create(config.model, g)
    first = train_step(
        model, _classes(subset, [0, 1]), ExemplarMemory(), config, device=CPU, generator=g
    )
    # Class 1 again, with 100 new images: trained as an old class, counts = new + exemplars.
    again = _classes(subset, [0, 1])
    keep = again.labels == 1
    second = train_step(
        first.model,
        StepData(again.images[keep], again.labels[keep]),
        first.memory,
        config,
        device=CPU,
        generator=g,
    )
    assert second.model.num_classes == 2
    assert second.report.counts == [10, 110]
    assert second.memory.counts() == {0: 10, 1: 10}


def test_memory_free_step_keeps_no_exemplars(subset):
    config = _config(subset, memory=MemoryConfig(mode="none", size=0))
    g = torch.Generator().manual_seed(0)
    model = IncrementalNet.create(config.model, g)
    first = train_step(
        model, _classes(subset, [0, 1]), ExemplarMemory(), config, device=CPU, generator=g
    )
    second = train_step(
        first.model, _classes(subset, [2, 3]), first.memory, config, device=CPU, generator=g
    )
    assert len(second.memory) == 0 and second.class_means is None
    assert second.report.counts == [0, 0, 100, 100]


def test_tiny_real_run_beats_an_accuracy_floor(subset):
    protocol = get_protocol("cifar10-subset-b0-s5", num_steps=3, total_classes=6)
    config = _config(subset, optim=OptimConfig(epochs=8, min_steps=0, batch_size=64))
    result = run_protocol(
        protocol, config, subset, [0, 1, 8, 9, 6, 7], seed=0, device=CPU, progress=False
    )
    m = result["metrics"]
    # Chance is 50% / 25% / 16.7% on the 2 / 4 / 6 classes seen; measured on this project's
    # 2-core CPU (2026-11-27): 77.5 / 37.5 / 45.8 per step, 53.6 average.
    assert result["cnn"]["accuracy_per_step"][0] >= 65.0
    assert m["last_accuracy"] >= 30.0
    assert m["avg_incremental_accuracy"] >= 40.0
    assert len(result["accuracy_matrix"]) == 3


def test_bsce_beats_ce_on_old_classes_after_an_imbalanced_step(subset):
    # 100 images per new class against 5 exemplars per old class: plain CE tilts the head
    # towards the new classes; BSCE's log-prior corrects for exactly that imbalance.
    memory = MemoryConfig(mode="fixed_per_class", size=5)
    base = _config(subset, memory=memory, optim=OptimConfig(epochs=8, min_steps=0, batch_size=64))
    g = torch.Generator().manual_seed(0)
    model = IncrementalNet.create(base.model, g)
    first = train_step(
        model, _classes(subset, [0, 1]), ExemplarMemory(), base, device=CPU, generator=g
    )
    test = _classes(subset, [0, 1, 2, 3], split="test")
    old = test.labels < 2
    old_acc = {}
    for method in ("bsce", "ce"):
        config = base.model_copy(update={"method": method, "distill": DistillConfig(enabled=True)})
        g = torch.Generator().manual_seed(1)
        second = train_step(
            first.model, _classes(subset, [2, 3]), first.memory, config, device=CPU, generator=g
        )
        logits, _ = infer(second.model, test.images, config.augment, device=CPU)
        old_acc[method] = float((logits.argmax(1)[old] == test.labels[old]).float().mean() * 100)
    # Measured (2026-11-27, 2-core CPU): BSCE 60.0% on the old classes, CE 0.0%.
    assert old_acc["bsce"] > old_acc["ce"] + 10, old_acc
