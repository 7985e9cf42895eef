"""The learning-rate factor per epoch against the formula written out here: linear warm-up
(e + 1) / (W + 1), then cosine 0.02 + 0.98 * (1 + cos(pi * (e - W) / (E - W))) / 2; constant
for ``none`` and after warm-up for ``plateau``. Seeding replays alike."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.engine.schedule import grad_scaler, lr_factor, seed_all


def _cfg(scheduler, epochs, warmup):
    return SimpleNamespace(train=SimpleNamespace(scheduler=scheduler, epochs=epochs, warmup_epochs=warmup))


def test_warmup_then_cosine():
    cfg = _cfg("cosine", 11, 3)
    got = [lr_factor(cfg, e) for e in range(12)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])     # (e + 1) / 4, then cos(0) = 1
    assert got[7] == pytest.approx(0.51)                        # halfway: cos(pi / 2) = 0
    assert got[11] == pytest.approx(0.02)                       # the end: cos(pi) = -1
    for e in range(3, 12):
        assert got[e] == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (e - 3) / 8)))
    assert all(a >= b for a, b in zip(got[3:], got[4:]))        # never rises after the warm-up


def test_cosine_without_warmup_and_one_epoch():
    assert [lr_factor(_cfg("cosine", 4, 0), e) for e in range(4)] == pytest.approx(
        [1.0, 0.02 + 0.49 * (1 + math.cos(math.pi / 4)), 0.51, 0.02 + 0.49 * (1 + math.cos(3 * math.pi / 4))])
    assert lr_factor(_cfg("cosine", 1, 1), 0) == pytest.approx(0.5)  # warm-up only
    assert lr_factor(_cfg("cosine", 1, 1), 1) == pytest.approx(1.0)  # span floored at 1 epoch


def test_none_and_plateau():
    assert [lr_factor(_cfg("none", 10, 3), e) for e in range(10)] == [1.0] * 10  # no warm-up either
    assert [lr_factor(_cfg("plateau", 10, 3), e) for e in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_seed_all_replays_and_differs_by_part():
    seed_all(7, 2)
    a = (torch.rand(3), np.random.rand(3))
    seed_all(7, 2)
    b = (torch.rand(3), np.random.rand(3))
    seed_all(7, 3)
    c = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_grad_scaler_disabled_is_a_no_op():
    scaler = grad_scaler(False)
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss
