"""The decision rule, in one place: class = argmax over classes of log p + bias.

The predictor decides every pixel with it; the tuner and the bias fit judge candidate
biases with it on out-of-fold probabilities, so what they measure is what the bundle does.
Probabilities are floored at :data:`EPS` before the log (a class with p = 0 still orders).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

EPS = 1e-8


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log(max(p, EPS)), elementwise, in the array's own precision."""
    return np.log(np.maximum(probs, EPS))


def biased_argmax(scores: np.ndarray, bias: Optional[Sequence[float]] = None, axis: int = 0) -> np.ndarray:
    """Class ids (uint8): argmax along ``axis`` (the class axis) of ``scores`` + ``bias``
    (one float32 value per class; None adds nothing)."""
    if bias is not None:
        shape = [1] * scores.ndim
        shape[axis] = -1
        scores = scores + np.asarray(bias, np.float32).reshape(shape)
    return scores.argmax(axis=axis).astype(np.uint8)


def decide(probs: np.ndarray, bias: Optional[Sequence[float]] = None) -> np.ndarray:
    """(K, H, W) probabilities -> (H, W) class ids by the rule above."""
    return biased_argmax(log_probs(probs), bias, axis=0)
