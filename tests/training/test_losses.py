"""Losses: near zero for a perfect prediction, soft MCC equal to hard MCC on one-hot logits, the
focal loss's known value, finite losses and gradients when a class is absent."""
import numpy as np
import pytest
import torch

from training.losses import (boundary_loss, class_weights_from_shares, dice_loss, focal_loss,
                             signed_distance_maps, soft_mcc_loss)


def test_perfect_prediction_losses_near_zero():
    t = torch.tensor([[[0, 1], [2, 3]]])
    logits = torch.nn.functional.one_hot(t, 4).permute(0, 3, 1, 2).float() * 50
    assert focal_loss(logits, t) < 1e-6
    assert dice_loss(logits, t) < 1e-3
    assert soft_mcc_loss(logits, t) < 1e-3


def test_soft_mcc_equals_hard_mcc_for_onehot():
    from training.metrics import mcc

    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (1, 16, 16))
    p = np.where(rng.random(t.shape) < 0.3, rng.integers(0, 4, t.shape), t)
    logits = torch.nn.functional.one_hot(torch.from_numpy(p), 4).permute(0, 3, 1, 2).float() * 60
    assert abs((1 - soft_mcc_loss(logits, torch.from_numpy(t))).item() - mcc(t, p, 4)) < 1e-3


def test_focal_known_value():
    logits = torch.zeros(1, 4, 1, 1)
    t = torch.zeros(1, 1, 1, dtype=torch.long)
    # p = 0.25 -> -(0.75^2) * log(0.25)
    assert abs(focal_loss(logits, t, gamma=2).item() - (0.75 ** 2) * np.log(4)) < 1e-5
    assert abs(focal_loss(logits, t, gamma=0).item() - np.log(4)) < 1e-5


@pytest.mark.parametrize("fn", ["focal", "dice", "mcc", "boundary"])
def test_absent_class_finite_loss_and_gradients(fn):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    t = torch.zeros(2, 16, 16, dtype=torch.long)  # background only: no lake, debris, glacier
    if fn == "focal":
        loss = focal_loss(logits, t, weight=class_weights_from_shares([0.7, 0.25, 0.05, 0.0]))
    elif fn == "dice":
        loss = dice_loss(logits, t)
    elif fn == "mcc":
        loss = soft_mcc_loss(logits, t)
    else:
        d = torch.from_numpy(np.stack([signed_distance_maps(x, 4) for x in t.numpy()]))
        loss = boundary_loss(logits, d)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_signed_distance_signs():
    t = np.zeros((20, 20), np.uint8)
    t[5:15, 5:15] = 1
    d = signed_distance_maps(t, 4)
    assert d[1, 10, 10] < 0 < d[1, 0, 0]
    assert (d[3] == 1).all()  # absent class: positive everywhere


def test_class_weights_favour_rare():
    w = class_weights_from_shares([0.7, 0.25, 0.05, 0.0005])
    assert w[3] > w[2] > w[1] > w[0]
    assert abs(w.mean().item() - 1) < 1e-5
