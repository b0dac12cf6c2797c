"""Methods as strategies: the registry, BSCE's prior strength, and step budgets."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from learner.cli import FLAGS, add_recipe_arguments, recipe_from_args
from learner.core.config import MemoryConfig, ModelConfig, OptimConfig, PriorConfig, StepConfig
from learner.core.methods import DEFAULT_METHOD, METHOD_NAMES, METHODS
from learner.core.model import IncrementalNet
from learner.core.overrides import JobOverrides
from learner.exemplars import ExemplarMemory
from learner.methods import Method, build_method, get_method
from learner.step import StepData, resolve_budget, train_step

CPU = torch.device("cpu")


def test_every_registered_method_loads_and_is_named_as_registered():
    assert DEFAULT_METHOD in METHOD_NAMES
    for name in METHODS:
        cls = get_method(name)
        assert issubclass(cls, Method) and cls.name == name
    with pytest.raises(ValueError, match="unknown method 'lwf'"):
        get_method("lwf")


def test_cli_and_override_choices_come_from_the_registry():
    method_flag = next(f for f in FLAGS if f.name == "method")
    assert method_flag.choices == METHOD_NAMES
    enum = JobOverrides.model_json_schema()["properties"]["method"]["anyOf"][0]["enum"]
    assert tuple(enum) == METHOD_NAMES


def test_recipe_flags_default_to_the_config():
    p = argparse.ArgumentParser()
    add_recipe_arguments(p)
    assert recipe_from_args(p.parse_args([]), StepConfig()) == StepConfig()
    c = recipe_from_args(
        p.parse_args(
            ["--tau", "0.5", "--distill-cap", "0.5", "--min-steps", "150", "--memory", "0"]
        ),
        StepConfig(),
    )
    assert (c.prior.tau, c.distill.weight_cap, c.optim.min_steps) == (0.5, 0.5, 150)
    assert c.memory == MemoryConfig(size=0) and c.memory.mode == "none"


def _logits_counts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g)
    targets = torch.randint(0, 5, (16,), generator=g)
    counts = torch.tensor([500, 20, 20, 1, 7])
    return logits, targets, counts


def _loss(config: StepConfig, logits, targets, counts):
    method = build_method(config)
    method.before_training(counts, CPU)
    return method.classification_loss(logits, targets)


def test_tau_one_is_the_papers_bsce_and_tau_zero_is_ce():
    logits, targets, counts = _logits_counts()
    bsce = _loss(StepConfig(method="bsce"), logits, targets, counts)
    assert torch.equal(bsce, F.cross_entropy(logits + counts.float().log(), targets))
    zero = _loss(StepConfig(method="bsce", prior=PriorConfig(tau=0.0)), logits, targets, counts)
    assert torch.equal(zero, _loss(StepConfig(method="ce"), logits, targets, counts))
    half = _loss(StepConfig(prior=PriorConfig(tau=0.5)), logits, targets, counts)
    assert torch.allclose(half, F.cross_entropy(logits + 0.5 * counts.float().log(), targets))


def test_absent_classes_are_masked_or_counted():
    logits, targets, counts = _logits_counts()
    counts[3] = 0
    targets[targets == 3] = 0
    masked = build_method(StepConfig())
    masked.before_training(counts, CPU)
    assert masked.adjustment[3] == float("-inf")
    virtual = build_method(StepConfig(prior=PriorConfig(absent=2.0)))
    virtual.before_training(counts, CPU)
    assert virtual.adjustment[3] == pytest.approx(torch.tensor(2.0).log().item())


def test_tau_zero_trains_exactly_as_ce(tiny_step):
    def weights(config):
        g = torch.Generator().manual_seed(3)
        model = IncrementalNet.create(config.model, g)
        return train_step(model, tiny_step, ExemplarMemory(), config, device=CPU, generator=g)

    base = StepConfig(
        model=ModelConfig(backbone="resnet8"), optim=OptimConfig(epochs=1, min_steps=0)
    )
    a = weights(base.model_copy(update={"method": "ce"})).model.state_dict()
    b = weights(base.model_copy(update={"prior": PriorConfig(tau=0.0)})).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("epochs", "min_steps", "samples", "batch", "want_epochs", "want_steps"),
    [
        (4, 0, 10_000, 128, 4, 316),  # benchmarks: epochs alone
        (4, 150, 10_000, 128, 4, 316),  # a large post already gets more than the minimum
        (4, 150, 100, 128, 150, 150),  # 100 images: one batch an epoch, 150 epochs
        (4, 150, 2_100, 128, 9, 153),  # 100 images + 2,000 exemplars: rounded up to epochs
        (1, 200, 20, 128, 200, 200),  # 20 images
    ],
)
def test_step_budget_resolves_to_whole_epochs(
    epochs, min_steps, samples, batch, want_epochs, want_steps
):
    b = resolve_budget(OptimConfig(epochs=epochs, min_steps=min_steps, batch_size=batch), samples)
    assert (b.epochs, b.steps) == (want_epochs, want_steps)
    assert b.steps >= min_steps


def test_step_report_records_the_resolved_budget(tiny_step):
    config = StepConfig(
        model=ModelConfig(backbone="resnet8"),
        optim=OptimConfig(epochs=1, min_steps=6, batch_size=16),
        memory=MemoryConfig(size=0),
    )
    g = torch.Generator().manual_seed(0)
    model = IncrementalNet.create(config.model, g)
    r = train_step(model, tiny_step, ExemplarMemory(), config, device=CPU, generator=g)
    n = tiny_step.labels.shape[0]
    batches = -(-n // 16)
    assert r.report.batches_per_epoch == batches
    assert r.report.optimizer_steps == r.report.epochs * batches >= 6
    assert len(r.report.loss_per_epoch) == r.report.epochs


@pytest.fixture(scope="module")
def tiny_step():
    from learner.data import load_dataset

    train = load_dataset("cifar10-subset").train
    idx = (train.labels < 2).nonzero().squeeze(1)[::4]
    return StepData(train.images[idx].clone(), train.labels[idx].clone())


def test_the_servers_learn_schema_enumerates_the_registered_methods():
    from server.schemas import LearnRequest, LearnUpload

    for model in (LearnRequest, LearnUpload):
        field = model.model_json_schema()["properties"]["overrides"]
        enum = field["properties"]["method"]["anyOf"][0]["enum"]
        assert tuple(enum) == METHOD_NAMES
        assert field["additionalProperties"] is False
