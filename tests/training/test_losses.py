"""Losses: near zero for a perfect prediction, soft MCC equal to hard MCC on one-hot logits, the
focal loss's known value, finite losses and gradients when a class is absent; Lovasz-softmax and
Tversky against naive per-pixel implementations written from their papers."""
import numpy as np
import pytest
import torch

from training.losses import (boundary_loss, class_weights_from_shares, dice_loss, focal_loss, lovasz_loss,
                             ramped, signed_distance_maps, soft_mcc_loss, tversky_loss)


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


@pytest.mark.parametrize("fn", ["focal", "dice", "mcc", "boundary", "lovasz", "tversky"])
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
    elif fn == "lovasz":
        loss = lovasz_loss(logits, t)
    elif fn == "tversky":
        loss = tversky_loss(logits, t)
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


def _softmax_np(logits):
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def naive_lovasz_softmax(logits, target):
    """Berman et al. 2018, Alg. 1 per class, pixel by pixel: errors |1{y=c} - p_c| sorted
    descending, dotted with the increments of the Jaccard loss along that order; mean over
    the classes present in ``target``."""
    p = _softmax_np(logits.astype(np.float64)).transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    y = target.reshape(-1)
    losses = []
    for c in range(p.shape[1]):
        fg = [1.0 if v == c else 0.0 for v in y]
        gts = sum(fg)
        if gts == 0:
            continue
        errors = [abs(f - q) for f, q in zip(fg, p[:, c])]
        order = sorted(range(len(errors)), key=lambda i: -errors[i])
        inter, union, prev, total = gts, gts, 0.0, 0.0
        for i in order:
            inter -= fg[i]
            union += 1.0 - fg[i]
            jac = 1.0 - inter / union
            total += errors[i] * (jac - prev)
            prev = jac
        losses.append(total)
    return sum(losses) / len(losses)


def naive_tversky(logits, target, alpha, beta):
    """Per class over every pixel of the batch: 1 - TP / (TP + alpha FP + beta FN) with soft
    counts; a class absent from the target counts 0; mean over all classes."""
    p = _softmax_np(logits.astype(np.float64)).transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    y = target.reshape(-1)
    out = []
    for c in range(p.shape[1]):
        tp = fp = fn = 0.0
        for q, v in zip(p[:, c], y):
            t = 1.0 if v == c else 0.0
            tp += q * t
            fp += q * (1 - t)
            fn += (1 - q) * t
        out.append(0.0 if not (y == c).any() else 1.0 - tp / (tp + alpha * fp + beta * fn))
    return sum(out) / len(out)


@pytest.mark.parametrize("seed,classes", [(0, 4), (1, 3), (2, 4)])
def test_lovasz_softmax_equals_the_papers_algorithm(seed, classes):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (2, 4, 6, 5)).astype(np.float32)
    target = rng.integers(0, classes, (2, 6, 5))  # classes=3: the lake class absent
    got = lovasz_loss(torch.from_numpy(logits), torch.from_numpy(target)).item()
    assert abs(got - naive_lovasz_softmax(logits, target)) < 1e-5


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.7), (0.5, 0.5), (0.8, 0.2)])
def test_tversky_equals_naive_soft_counts(alpha, beta):
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, (2, 4, 6, 5)).astype(np.float32)
    target = rng.integers(0, 3, (2, 6, 5))  # no lake
    got = tversky_loss(torch.from_numpy(logits), torch.from_numpy(target), alpha, beta).item()
    assert abs(got - naive_tversky(logits, target, alpha, beta)) < 1e-5


def test_lovasz_and_tversky_join_the_combined_loss_with_their_ramps():
    from training.config import LossConfig
    from training.losses import CombinedLoss

    cfg = LossConfig(focal=0, dice=0, mcc=0, boundary=0, lovasz=0.5, lovasz_ramp_epochs=4, tversky=0.3)
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 2, (1, 4, 6, 5)).astype(np.float32))
    target = torch.from_numpy(rng.integers(0, 4, (1, 6, 5)))
    parts = CombinedLoss(cfg)(logits, target, epoch=0)
    assert set(parts) == {"lovasz", "tversky", "total"}
    assert abs(parts["lovasz"].item() - 0.5 / 4 * naive_lovasz_softmax(logits.numpy(), target.numpy())) < 1e-5
    assert abs(parts["tversky"].item() - 0.3 * naive_tversky(logits.numpy(), target.numpy(), 0.3, 0.7)) < 1e-5
    assert ramped(0.5, 4, 3) == 0.5 and ramped(0.5, 0, 0) == 0.5
