"""Seeding, the learning-rate schedule and the gradient scaler of a training run."""
from __future__ import annotations

import math

import numpy as np
import torch


def seed_all(*parts: int) -> None:
    """Seed torch and numpy from ``parts`` (e.g. seed and epoch): every epoch replays alike."""
    s = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s % (2**32))


def lr_factor(cfg, epoch: int) -> float:
    t = cfg.train
    if t.scheduler == "none":
        return 1.0
    if epoch < t.warmup_epochs:
        return (epoch + 1) / (t.warmup_epochs + 1)
    if t.scheduler == "cosine":
        span = max(1, t.epochs - t.warmup_epochs)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (epoch - t.warmup_epochs) / span))
    return 1.0


def grad_scaler(enabled: bool):
    """torch's CUDA GradScaler (a no-op when not ``enabled``), on every torch >= 2.0."""
    try:
        return torch.amp.GradScaler("cuda", enabled=enabled)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler(enabled=enabled)


def forget_unscale(scaler) -> None:
    """Forget that ``unscale_`` ran for the optimiser step being redone: an out-of-memory error
    between ``unscale_`` and ``step`` leaves the scaler "already unscaled", and the redo would
    fail with "unscale_() has already been called on this optimizer". torch keeps this per
    optimiser in ``_per_optimizer_states`` (reset the same way by ``update``)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.clear()
