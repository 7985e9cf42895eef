"""Validation with the bundle's own predictor: the competition MCC on whole tiles."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from glacier_runtime.backends import TorchRunner
from glacier_runtime.predictor import Member, Predictor
from training.config import Config
from training.metrics import ConfusionAccumulator


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
