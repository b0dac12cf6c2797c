import math

import pytest
import torch
import torch.nn.functional as F

from learner.core.config import DistillConfig
from learner.losses import (
    balanced_softmax_cross_entropy,
    feature_distillation,
    log_prior,
    logit_distillation,
)


def test_bsce_equals_ce_when_counts_are_equal():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    bsce = balanced_softmax_cross_entropy(logits, y, log_prior(torch.full((5,), 37)))
    assert torch.allclose(bsce, F.cross_entropy(logits, y), atol=1e-6)


def test_bsce_matches_the_formula():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    counts = torch.tensor([500, 20, 20])
    y = torch.tensor([1])
    n = counts.double()
    z = logits.double()[0]
    expected = -math.log(n[1] * math.exp(z[1]) / float((n * z.exp()).sum()))
    got = balanced_softmax_cross_entropy(logits, y, log_prior(counts))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_bsce_differs_from_ce_when_imbalanced():
    logits = torch.zeros(4, 3)
    y = torch.tensor([0, 1, 2, 2])
    counts = torch.tensor([1000, 10, 10])
    assert balanced_softmax_cross_entropy(logits, y, log_prior(counts)) > F.cross_entropy(logits, y)


def test_masked_class_gets_no_gradient_and_no_nan():
    logits = torch.randn(8, 4, requires_grad=True)
    y = torch.tensor([2, 3, 2, 3, 2, 3, 2, 3])
    counts = torch.tensor([0, 0, 50, 60])  # old classes 0 and 1 have no sample this step
    loss = balanced_softmax_cross_entropy(logits, y, log_prior(counts))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(logits.grad[:, :2] == 0)
    assert torch.all(logits.grad[:, 2:].abs().sum(1) > 0)
    # Only the unmasked classes enter the softmax: the loss equals CE restricted to them.
    restricted = F.cross_entropy(logits[:, 2:] + log_prior(counts[2:]), y - 2)
    assert loss.item() == pytest.approx(restricted.item(), rel=1e-6)


def test_prior_is_a_training_term_only():
    # The prediction path (model forward) never sees the counts: a class with a huge count
    # does not win at inference for equal logits.
    from learner.core.config import AugmentConfig, ModelConfig
    from learner.core.evaluate import infer
    from learner.core.model import IncrementalNet

    g = torch.Generator().manual_seed(0)
    net = IncrementalNet.create(ModelConfig(backbone="resnet8", channels_last=False), g, 3)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    logits, feats = infer(net, images, AugmentConfig(), device=torch.device("cpu"))
    with torch.no_grad():
        raw = net.head(feats.clone())
    assert torch.allclose(logits, raw, atol=1e-5)


def test_bsce_gradient_check():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, dtype=torch.double, generator=g, requires_grad=True)
    y = torch.tensor([0, 2, 3])
    prior = log_prior(torch.tensor([5, 0, 7, 2])).double()
    assert torch.autograd.gradcheck(
        lambda z: balanced_softmax_cross_entropy(z, y, prior), (logits,)
    )
    # And the analytic gradient: softmax(z + log n) - onehot.
    loss = balanced_softmax_cross_entropy(logits, y, prior)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = (F.softmax(logits + prior, 1) - F.one_hot(y, 4)) / 3
    assert torch.allclose(grad, expected)


def test_negative_counts_rejected():
    with pytest.raises(ValueError):
        log_prior(torch.tensor([1, -1]))


def test_logit_distillation_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 5, generator=g)
    assert logit_distillation(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_distillation(t + torch.randn(6, 5, generator=g), t, 2.0).item() > 0


def test_feature_distillation_and_weights():
    f = torch.randn(4, 8)
    assert feature_distillation(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distillation(f, -f).item() == pytest.approx(2.0, abs=1e-6)
    assert DistillConfig(weight_cap=1.0).weight_for(8, 10) == pytest.approx(0.8)
    assert DistillConfig(weight=0.3).weight_for(8, 10) == pytest.approx(0.3)
    assert DistillConfig(weight_cap=0.5).weight_for(8, 10) == pytest.approx(0.5)
    assert DistillConfig(weight_cap=0.5).weight_for(2, 10) == pytest.approx(0.2)
