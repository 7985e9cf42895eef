"""Building blocks of the training loop: seeding, the learning-rate schedule, EMA, the
gradient scaler, validation with the bundle's own predictor, the CSV log. The loop
itself, step by step, is :class:`training.engine.trainer.Trainer` (with its one-call form
:func:`training.engine.trainer.train_member`).
"""
from __future__ import annotations

import csv
import io
import logging
import math
from typing import Any, Dict, List

import numpy as np
import torch

from glacier_runtime.backends import TorchRunner
from glacier_runtime.predictor import Member, Predictor
from training.config import Config
from training.metrics import ConfusionAccumulator

log = logging.getLogger("glacier.train")


class LazyMap:
    """A read-only mapping that computes values on access (streamed, memory-mapped data)."""

    def __init__(self, keys, fn):
        self._keys, self._fn = list(keys), fn

    def __getitem__(self, key):
        return self._fn(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _seed_all(*parts: int) -> None:
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


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)


def _grad_scaler(enabled: bool):
    try:
        return torch.amp.GradScaler("cuda", enabled=enabled)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler(enabled=enabled)


def validate(model: torch.nn.Module, images: Dict[str, np.ndarray], labels: Dict[str, np.ndarray],
             stats, device: torch.device, cfg: Config, n_classes: int, keep_probs: bool = False):
    """Competition MCC on whole validation tiles with the bundle's own predictor."""
    was_training = model.training
    member = Member(TorchRunner(model, str(device), fold_bn=False, channels_last=False,
                                fp16=cfg.train.amp and device.type == "cuda"), stats, n_classes=n_classes)
    pred = Predictor([member], {"tta": cfg.validation.tta, "window": cfg.validation.window})
    acc = ConfusionAccumulator(n_classes)
    probs_out = {}
    per_tile = {}
    for key, img in images.items():
        probs = pred.predict_proba(img)
        masked = pred.masked(img)
        ids = pred.decide(probs, masked)
        per_tile[key] = acc.update(labels[key], ids)
        if keep_probs:
            probs_out[key] = pred.masked_to_background(probs, masked).astype(np.float16)
    model.train(was_training)
    return acc, per_tile, probs_out


def _write_csv(path: str, history: List[Dict[str, Any]]) -> None:
    from glacier_runtime.atomic import atomic_write_bytes

    if not history:
        return
    cols = list(dict.fromkeys(k for h in history for k, v in h.items() if not isinstance(v, (list, dict))))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow(h)
    atomic_write_bytes(path, buf.getvalue().encode())
