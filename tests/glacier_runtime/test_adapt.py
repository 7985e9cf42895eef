"""Test-time batch-norm adaptation: the re-estimated statistics against the per-channel mean and
unbiased variance of the layer's input pooled over every pixel of every input, computed by hand
(the spread between inputs included); the trained statistics kept when nothing (or a failure)
comes; the predictor's adapted output against a model given those statistics by hand, with batch
norm folded as the bundle runs it; tiny tiles skipped; one failing member leaves the others
adapted."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from glacier_runtime.adapt import adapt_batchnorm
from glacier_runtime.backends import TorchRunner
from glacier_runtime.normalize import identity_stats
from glacier_runtime.predictor import Member, Predictor


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn1(self.conv1(x))))


def _inputs(n=3, seed=0, shift=2.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 5, 32 + 8 * i, 32, generator=g) * (1 + i) + shift for i in range(n)]


def _by_hand(model, inputs):
    """Per-channel mean and unbiased variance of bn1's input over every pixel of every input."""
    zs = []
    for x in inputs:
        with torch.no_grad():
            zs.append(model.conv1(x).numpy()[0].reshape(6, -1).astype(np.float64))
    z = np.concatenate(zs, axis=1)
    return z.mean(1), z.var(1, ddof=1)


def test_statistics_equal_the_inputs_means_and_variances_by_hand():
    model = ConvBN()
    xs = _inputs()
    mean, var = _by_hand(model, xs)
    w_before = model.bn1.weight.detach().clone()
    assert adapt_batchnorm(model, xs) == 3
    np.testing.assert_allclose(model.bn1.running_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.bn1.running_var.numpy(), var, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.bn1.weight, w_before) and not model.training and model.bn1.momentum == 0.1
    # the spread between inputs counts: far above the mean of the inputs' own variances
    own = np.mean([model.conv1(x).detach().numpy()[0].reshape(6, -1).var(1, ddof=1) for x in xs], 0)
    assert (var > own).all()


def test_no_input_or_a_failure_keeps_the_trained_statistics():
    model = ConvBN()
    model.bn1.running_mean.fill_(0.5)
    assert adapt_batchnorm(model, []) == 0
    assert torch.all(model.bn1.running_mean == 0.5)

    def broken():
        yield _inputs(1)[0]
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        adapt_batchnorm(model, broken())
    assert torch.all(model.bn1.running_mean == 0.5) and model.bn1.momentum == 0.1


def test_predictor_adapts_each_member_and_predicts_with_folded_adapted_statistics():
    xs = _inputs(3, seed=1, shift=3.0)
    tiles = [x[0].numpy() for x in xs]
    masked = np.zeros((5, 32, 32), np.float32)  # fully masked: skipped
    model = ConvBN()
    mean, var = _by_hand(model, xs)
    oracle = copy.deepcopy(model).eval()
    oracle.bn1.running_mean.copy_(torch.from_numpy(mean).float())
    oracle.bn1.running_var.copy_(torch.from_numpy(var).float())
    runner = TorchRunner(model, "cpu", adaptable=True)  # folded, with an unfolded copy to adapt
    pred = Predictor([Member(runner, identity_stats(5), n_classes=4)], {"adapt": "bn", "stride": 8})
    before = pred.predict_proba(tiles[0])
    assert pred.adapt_bn(lambda: iter(tiles + [masked])) == 3
    with torch.no_grad():
        want = torch.softmax(oracle(xs[0]), 1)[0].numpy()
    got = pred.predict_proba(tiles[0])
    assert np.abs(got - want).max() < 1e-4 and np.abs(before - want).max() > 1e-3
    assert isinstance(runner.model.bn1, nn.Identity)  # still folded for speed


def test_a_folded_runner_without_a_copy_is_left_as_it_is(caplog):
    runner = TorchRunner(ConvBN(), "cpu")  # folded, not adaptable
    pred = Predictor([Member(runner, identity_stats(5), n_classes=4, name="m0")], {"stride": 8})
    before = pred.predict_proba(_inputs(1)[0][0].numpy())
    pred.adapt_bn([x[0].numpy() for x in _inputs()])
    assert "m0: batch-norm adaptation skipped (no batch norm left to adapt: folded)" in caplog.text
    assert np.array_equal(before, pred.predict_proba(_inputs(1)[0][0].numpy()))
    with pytest.raises(ValueError, match="adapt must be None or 'bn'"):
        Predictor([Member(runner, identity_stats(5), n_classes=4)], {"adapt": "tent"})


def test_tiny_tiles_are_skipped_and_a_failing_member_leaves_the_others_adapted(caplog):
    """A 32-px tile leaves one value per channel at the deepest layer of a real U-Net: skipped.
    A member whose forward fails keeps its statistics; the next member still adapts."""
    class Broken(ConvBN):
        def forward(self, x):
            raise RuntimeError("out of memory")

    caplog.set_level("INFO")
    ok, broken = ConvBN(), Broken()
    broken.bn1.running_mean.fill_(0.25)
    members = [Member(TorchRunner(broken, "cpu", adaptable=True), identity_stats(5), n_classes=4, name="bad"),
               Member(TorchRunner(ok, "cpu", adaptable=True), identity_stats(5), n_classes=4, name="good")]
    pred = Predictor(members, {"adapt": "bn"})
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 5, 64, 64, generator=g) + 1, torch.randn(1, 5, 64, 96, generator=g) * 2]
    tiny = np.ones((5, 20, 20), np.float32)
    assert pred.adapt_bn([x[0].numpy() for x in xs] + [tiny]) == 2  # the 20-px tile skipped
    assert "bad: batch-norm adaptation failed (out of memory)" in caplog.text
    assert "1 of 2 member(s) re-estimated on 2 test tile(s)" in caplog.text
    assert torch.all(members[0].runner.source.bn1.running_mean == 0.25)
    mean, var = _by_hand(ConvBN(), xs)
    assert np.allclose(members[1].runner.source.bn1.running_mean.numpy(), mean, atol=1e-4)
    assert np.allclose(members[1].runner.source.bn1.running_var.numpy(), var, rtol=1e-4)
