"""Methods as strategies: the registry, BSCE's prior strength, and step budgets."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from learner.cli import FLAGS, add_recipe_arguments, recipe_from_args
from learner.core.config import (
    AugmentConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    PriorConfig,
    StepConfig,
)
from learner.core.methods import DEFAULT_METHOD, METHOD_NAMES, METHODS
from learner.core.model import IncrementalNet
from learner.core.overrides import JobOverrides
from learner.exemplars import ExemplarMemory
from learner.methods import Method, build_method, get_method
from learner.step import Budget, StepData, TimeBudget, resolve_budget, train_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These steps are tiny: one thread trains them about as fast as two on an idle machine,
    and several times faster on a busy one (no OpenMP threads spinning for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_registered_method_loads_and_is_named_as_registered():
    assert DEFAULT_METHOD in METHOD_NAMES
    for name in METHODS:
        cls = get_method(name)
        assert issubclass(cls, Method) and cls.name == name
    with pytest.raises(ValueError, match="unknown method 'podnet'"):
        get_method("podnet")


def _method_choices(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    action = next(a for a in parser._actions if a.dest == "method")
    return tuple(action.choices)


def test_cli_and_override_choices_come_from_the_registry():
    from learner import bench, compare, worker

    method_flag = next(f for f in FLAGS if f.name == "method")
    assert method_flag.choices == METHOD_NAMES
    for build_parser in (bench.build_parser, worker.build_parser, compare.build_parser):
        assert _method_choices(build_parser()) == METHOD_NAMES
    enum = JobOverrides.model_json_schema()["properties"]["method"]["anyOf"][0]["enum"]
    assert tuple(enum) == METHOD_NAMES
    # Every registered method is one the worker can take as a job override.
    for name in METHOD_NAMES:
        assert JobOverrides.model_validate({"method": name}).method == name


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


def _tiny_train(tiny_step, optim: OptimConfig, seed: int = 5, time_budget=None):
    """A memory-free ResNet-8 step on the tiny data (classes 0 and 1)."""
    config = StepConfig(
        model=ModelConfig(backbone="resnet8"), optim=optim, memory=MemoryConfig(size=0)
    )
    g = torch.Generator().manual_seed(seed)
    model = IncrementalNet.create(config.model, g)
    return train_step(
        model,
        tiny_step,
        ExemplarMemory(),
        config,
        device=CPU,
        generator=g,
        time_budget=time_budget,
    )


def test_step_report_records_the_resolved_budget(tiny_step):
    r = _tiny_train(tiny_step, OptimConfig(epochs=1, min_steps=6, batch_size=16), seed=0)
    n = tiny_step.labels.shape[0]
    batches = -(-n // 16)
    assert r.report.batches_per_epoch == batches
    assert r.report.optimizer_steps == r.report.epochs * batches >= 6
    assert len(r.report.loss_per_epoch) == r.report.epochs


@pytest.mark.parametrize(
    ("floor", "epoch_seconds", "want"),
    [
        (1, [10.0], 5),  # 10 s an epoch: 4 more fit in the 40 s left
        (1, [10.0, 10.0, 10.0], 5),  # the same pace later: the same total
        (1, [4.0], 12),  # fast enough for the whole budget: nothing cut
        (1, [60.0], 1),  # the first epoch alone overran: it is kept, nothing more
        (1, [8.0] * 6, 6),  # 2 s left: too little for another epoch
        (4, [60.0], 4),  # never below optim.epochs: only what min_steps added is cut
        (1, [14.0, 4.0], 10),  # the first epoch's one-time costs do not set the pace
        (1, [4.0, 9.0, 9.0], 6),  # a slow spell after the first epoch sets the pace
        (1, [4.0, 9.0, 9.0, 2.0, 2.0, 2.0, 2.0, 2.0], 12),  # and is forgiven when it passes
    ],
)
def test_a_time_bound_keeps_the_epochs_that_fit(floor, epoch_seconds, want):
    planned = Budget(epochs=12, batches=11)
    assert TimeBudget(50.0, min_share=0.0).epochs_within(planned, floor, epoch_seconds) == want


@pytest.mark.parametrize(
    ("share", "floor", "epoch_seconds", "want"),
    [
        (0.5, 1, [60.0], 6),  # the first epoch alone overran: half the planned epochs still
        (0.5, 1, [10.0], 6),  # 5 would fit: the share keeps 6
        (0.5, 1, [4.0], 12),  # all fit: the share changes nothing
        (0.5, 8, [60.0], 8),  # optim.epochs above the share: optim.epochs
        (0.3, 1, [60.0], 4),  # 3.6 epochs: rounded up
        (1.0, 1, [60.0], 12),  # a share of 1: the bound never cuts
    ],
)
def test_a_time_bound_keeps_a_share_of_the_planned_epochs(share, floor, epoch_seconds, want):
    planned = Budget(epochs=12, batches=11)
    assert TimeBudget(50.0, share).epochs_within(planned, floor, epoch_seconds) == want


class _Clock:
    """A clock that advances ``tick`` seconds at each reading: the pace of training as the
    test sets it, not as this machine runs."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _bounded_step(tiny_step, time_budget):
    return _tiny_train(
        tiny_step, OptimConfig(epochs=1, min_steps=20, batch_size=16), 5, time_budget
    )


def test_a_time_bound_cuts_the_epochs_and_the_report_says_so(tiny_step):
    free = _bounded_step(tiny_step, None).report
    assert free.epochs >= 3 and free.planned_steps == free.optimizer_steps
    # Every epoch takes 10 s by this clock: 25 s hold two epochs.
    cut = _bounded_step(tiny_step, TimeBudget(25.0, 0.0, clock=_Clock(10.0))).report
    assert cut.epochs == 2 and len(cut.loss_per_epoch) == 2
    assert cut.optimizer_steps == 2 * cut.batches_per_epoch
    assert cut.planned_steps == free.optimizer_steps and cut.time_budget_seconds == 25.0


def test_a_time_bound_never_cuts_below_the_configured_epochs(tiny_step):
    slow = TimeBudget(1.0, 0.0, clock=_Clock(10.0))  # every epoch ten times over the bound
    r = _tiny_train(tiny_step, OptimConfig(epochs=3, min_steps=0, batch_size=16), 5, slow)
    assert r.report.epochs == 3 and r.report.optimizer_steps == r.report.planned_steps


def test_a_time_bound_that_is_not_reached_changes_nothing(tiny_step):
    free = _bounded_step(tiny_step, None)
    roomy = _bounded_step(tiny_step, TimeBudget(1e6, 0.5, clock=_Clock(1.0)))
    assert roomy.report.optimizer_steps == free.report.optimizer_steps
    a, b = free.model.state_dict(), roomy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


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


# -- the comparison methods: one incremental step each on the bundled subset ------------------
#
# A base step learns classes 0-1 from 60 images each; every method then learns classes 2-3 on
# top of it with 20 exemplars per old class. Accuracy is measured on the 4 classes' unused
# training images and test images (60 a class), with the method's own classifier. Budgets are
# epochs, never time, so a slow machine trains exactly as much as a fast one.

_TRAIN_PER_CLASS = 60
# Chance on 4 classes is 25%. Over 8 seeds every method measured 37.9% or more (WA and
# BSCE-LUCIR the lowest: they hold the old classes and learn the new ones slowly at this
# budget); one standard error on 240 images is about 3 points.
_FLOOR = 25.0 + 5.0


def _subset_split(classes: range) -> tuple[StepData, torch.Tensor, torch.Tensor]:
    from learner.data import load_dataset

    train = load_dataset("cifar10-subset").train
    used, unused = [], []
    for c in classes:
        idx = (train.labels == c).nonzero().squeeze(1)
        used.append(idx[:_TRAIN_PER_CLASS])
        unused.append(idx[_TRAIN_PER_CLASS:])
    u, v = torch.cat(used), torch.cat(unused)
    step = StepData(train.images[u].clone(), train.labels[u].clone())
    return step, train.images[v], train.labels[v]


def _floor_config(method: str) -> StepConfig:
    return StepConfig(
        method=method,
        model=ModelConfig(backbone="resnet8"),
        optim=OptimConfig(epochs=6, min_steps=0, batch_size=32),
        memory=MemoryConfig(mode="fixed_per_class", size=20),
    )


@pytest.fixture(scope="module")
def incremental_step():
    """``run(method)``: the method's step on classes 2-3 after a base step on classes 0-1
    (trained by CE, or by LUCIR for the cosine-head methods), and the evaluation set."""
    from learner.data import load_dataset

    first, x0, y0 = _subset_split(range(0, 2))
    second, x1, y1 = _subset_split(range(2, 4))
    test = load_dataset("cifar10-subset").test
    seen = test.labels < 4
    eval_x = torch.cat([x0, x1, test.images[seen]])
    eval_y = torch.cat([y0, y1, test.labels[seen]])
    bases, runs = {}, {}

    def base(kind: str):
        if kind not in bases:
            g = torch.Generator().manual_seed(0)
            config = _floor_config(kind)
            model = IncrementalNet.create(config.model, g)
            r = train_step(model, first, ExemplarMemory(), config, device=CPU, generator=g)
            bases[kind] = (r, g.get_state())
        return bases[kind]

    def run(method: str):
        if method not in runs:
            parent, state = base("lucir" if "lucir" in method else "ce")
            g = torch.Generator()
            g.set_state(state)
            runs[method] = train_step(
                parent.model, second, parent.memory, _floor_config(method), device=CPU, generator=g
            )
        return runs[method]

    run.eval_set = (eval_x, eval_y)
    return run


def _accuracy(result, method: str, images, labels) -> float:
    from learner.core.evaluate import infer, nme_predict

    logits, feats = infer(result.model, images, _floor_config(method).augment, device=CPU)
    assert torch.isfinite(logits).all()
    if get_method(method).classifier == "nme":
        pred = nme_predict(feats, result.class_means)
    else:
        pred = logits.argmax(1)
    return 100.0 * float((pred == labels).double().mean())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_one_incremental_step_of_every_method_beats_chance(incremental_step, method):
    result = incremental_step(method)
    accuracy = _accuracy(result, method, *incremental_step.eval_set)
    assert accuracy > _FLOOR, f"{method}: {accuracy:.1f}% on 4 classes"
    report = result.report
    assert report.seen_classes == 4 and report.old_classes == 2
    assert all(math.isfinite(v) for v in report.loss_per_epoch)
    assert report.stage_seconds >= 0.0
    assert (report.stage is None) == (report.stage_seconds == 0.0)


def test_a_second_stage_is_timed_and_reported(incremental_step):
    for method in ("eeil", "bsce-eeil", "bic", "wa"):
        report = incremental_step(method).report
        assert report.stage is not None and report.stage_seconds > 0.0, method
        assert report.wall_seconds >= report.train_seconds + report.stage_seconds
    eeil = incremental_step("eeil").report.stage
    # As many samples per class as an old class has exemplars: 4 classes x 20.
    assert (eeil["per_class"], eeil["images"]) == (20, 80)
    for method in ("bsce", "ce", "finetune", "lwf", "icarl", "lucir", "bsce-lucir"):
        report = incremental_step(method).report
        assert report.stage is None and report.stage_seconds == 0.0, method


def test_finetune_builds_no_teacher_and_lwf_adds_its_distillation(incremental_step):
    assert incremental_step("finetune").report.distill_weight == 0.0
    assert incremental_step("lwf").report.distill_weight == StepConfig().lwf.weight


def test_wa_aligns_the_mean_norm_of_new_rows_to_the_old(incremental_step):
    result = incremental_step("wa")
    norms = result.model.head.weight.detach().norm(dim=1)
    assert torch.allclose(norms[2:].mean(), norms[:2].mean(), rtol=1e-5)
    assert result.report.stage["gamma"] > 0
    # The norms were not equal before: the stage did the aligning.
    ce_norms = incremental_step("ce").model.head.weight.detach().norm(dim=1)
    assert not torch.allclose(ce_norms[2:].mean(), ce_norms[:2].mean(), rtol=1e-3)


def test_bic_layer_touches_only_new_logits_and_is_saved(incremental_step):
    from learner.core.versioning import load_version, version_payload

    result = incremental_step("bic")
    model = result.model.eval()
    layer = model.bias_correction
    alpha, beta = result.report.stage["alpha"], result.report.stage["beta"]
    assert torch.equal(layer.alpha[:2], torch.ones(2)) and torch.equal(
        layer.beta[:2], torch.zeros(2)
    )
    assert torch.allclose(layer.alpha[2:], torch.full((2,), alpha))
    assert torch.allclose(layer.beta[2:], torch.full((2,), beta))
    assert (alpha, beta) != (1.0, 0.0)
    feats = torch.randn(8, model.feature_dim)
    raw, corrected = model.head(feats), model.logits(feats)
    assert torch.equal(corrected[:, :2], raw[:, :2])
    assert torch.allclose(corrected[:, 2:], raw[:, 2:] * alpha + beta)
    # Part of the version: the server's load predicts with the correction.
    tensors, metadata = version_payload(
        model, class_names=list("abcd"), counts=result.counts.tolist(), augment=AugmentConfig()
    )
    loaded = load_version(tensors, metadata).model
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    # The held-out split was never trained on: the counts are what the loop saw.
    held = result.report.stage["held_out"]
    assert sum(result.report.counts) + held == 2 * 20 + 2 * _TRAIN_PER_CLASS


def test_lucir_classifier_is_cosine(incremental_step):
    from learner.core.model import CosineHead
    from learner.core.versioning import load_version, version_payload

    model = incremental_step("lucir").model.eval()
    assert isinstance(model.head, CosineHead)
    sigma = float(model.head.sigma.detach())
    feats = torch.randn(16, model.feature_dim)
    logits = model.logits(feats)
    assert logits.abs().max() <= abs(sigma) * (1 + 1e-6)
    assert torch.allclose(model.logits(7.5 * feats), logits, atol=1e-6)
    assert torch.allclose(model.logits(0.01 * feats), logits, atol=1e-6)
    tensors, metadata = version_payload(
        model, class_names=list("abcd"), counts=[1] * 4, augment=AugmentConfig()
    )
    assert metadata["model"]["head"] == "cosine"
    loaded = load_version(tensors, metadata).model
    assert isinstance(loaded.head, CosineHead)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_a_linear_net_is_described_as_before():
    net = IncrementalNet.create(
        ModelConfig(backbone="resnet8"), torch.Generator().manual_seed(0), 3
    )
    assert set(net.describe()) == {"format", "model_config", "num_classes"}
    assert net.bias_correction is None and net.head_kind == "linear"
    assert set(net.state_dict()) == set(
        IncrementalNet(ModelConfig(backbone="resnet8"), 3).state_dict()
    )


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if get_method(m).memory == "required"])
def test_methods_that_need_exemplars_refuse_a_step_without(method):
    g = torch.Generator().manual_seed(0)
    config = _floor_config(method).model_copy(update={"memory": MemoryConfig(size=0)})
    model = IncrementalNet.create(config.model, g, 2)
    step, _, _ = _subset_split(range(2, 3))
    with pytest.raises(ValueError, match="needs exemplars"):
        train_step(model, step, ExemplarMemory(), config, device=CPU, generator=g)


def test_icarl_targets_old_outputs_with_the_teachers_sigmoid():
    method = build_method(StepConfig(method="icarl"))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g)
    teacher = torch.randn(4, 3, generator=g)
    targets = torch.tensor([0, 3, 4, 1])
    target = F.one_hot(targets, 5).float()
    target[:, :3] = torch.sigmoid(teacher)
    want = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 4
    got = method.loss(logits, torch.randn(4, 8), targets, (teacher, torch.randn(4, 8)), 0.6)
    assert torch.allclose(got, want)


def test_lucir_margin_ranking_counts_only_old_samples():
    from learner.methods.lucir import margin_ranking

    cosine = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.1, 0.2, 0.9, 0.3], [0.2, 0.3, 0.5, 0.6]])
    targets = torch.tensor([0, 2, 3])  # only the first is an old-class sample (2 old classes)
    # Its true cosine 0.9 against the two new ones 0.8 and 0.2, margin 0.5: 0.4 and 0.
    got = margin_ranking(cosine, targets, old_classes=2, k=2, margin=0.5)
    assert got.item() == pytest.approx(0.2)
    none_old = margin_ranking(cosine[1:], targets[1:], old_classes=2, k=2, margin=0.5)
    assert none_old.item() == 0.0


def test_bsce_hosts_use_the_balanced_softmax():
    logits, targets, counts = _logits_counts()
    for name in ("bsce-lucir", "bsce-eeil"):
        assert torch.equal(
            _loss(StepConfig(method=name), logits, targets, counts),
            _loss(StepConfig(method="bsce"), logits, targets, counts),
        )
