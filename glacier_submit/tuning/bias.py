"""Per-class log-probability bias tuned on out-of-fold predictions to maximise MCC.

Rare classes (lake, debris) are under-predicted by a model trained with any pixel loss;
a bias added to log p before the argmax moves the decision boundary. Coordinate ascent
over a bounded grid, class 0 fixed at 0, regularised (minimum gain, shrunk towards zero)
so that it does not run to the grid's edge on noise (docs/DECISIONS.md).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from glacier_runtime.decision import biased_argmax, log_probs
from training.metrics import confusion, mcc_from_confusion


#: the bias grid: bounded, so a class never runs far on noise (log-probability units)
BIAS_GRID = tuple(np.round(np.arange(-1.0, 2.01, 0.25), 2))


def _mcc_with(logp: np.ndarray, y: np.ndarray, bias: np.ndarray) -> float:
    """MCC of the runtime's decision (glacier_runtime/decision.py) on (N, K) log-probabilities."""
    return mcc_from_confusion(confusion(y, biased_argmax(logp, bias, axis=1), logp.shape[1]))


def fit_bias(logp: np.ndarray, y: np.ndarray, grid: Sequence[float] = BIAS_GRID, rounds: int = 2,
             min_gain: float = 1e-3, keep: float = 0.9) -> List[float]:
    """Per-class log-probability bias (class 0 fixed at 0), regularised three ways:
    bounded to ``grid`` (no value beyond its ends), a class moves only when that raises
    MCC by at least ``min_gain``, and it moves to the value closest to zero that keeps
    ``keep`` of the best gain (shrinkage towards zero). The one rule for ``build --bias
    auto`` and ``build --tune oof``.

    ``logp``: (N, K) log-probabilities; ``y``: (N,) class ids.
    """
    k = logp.shape[1]
    bias = np.zeros(k, np.float32)
    grid = sorted(set(float(v) for v in grid) | {0.0}, key=abs)
    for _ in range(rounds):
        changed = False
        for c in range(1, k):
            cur = _mcc_with(logp, y, bias)
            trials = []
            for v in grid:
                b = bias.copy()
                b[c] = v
                trials.append((v, _mcc_with(logp, y, b)))
            best = max(m for _, m in trials)
            if best - cur < min_gain:
                continue
            need = cur + keep * (best - cur)
            v = next(v for v, m in trials if m >= need)  # grid sorted by |v|: closest to 0
            if v != bias[c]:
                bias[c] = v
                changed = True
        if not changed:
            break
    return [float(b) for b in bias]


def logp_pixels(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_pixels: int = 2_000_000,
                seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(N, K) log-probabilities and (N,) labels of the tiles' pixels (subsampled to ``max_pixels``)."""
    k = probs[0].shape[0]
    lp = np.concatenate([log_probs(p.reshape(k, -1).T.astype(np.float32)) for p in probs])
    y = np.concatenate([lab.reshape(-1) for lab in labels]).astype(np.int64)
    if len(y) > max_pixels:
        idx = np.random.default_rng(seed).choice(len(y), max_pixels, replace=False)
        lp, y = lp[idx], y[idx]
    return lp, y


def tune_bias(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], grid: Sequence[float] = BIAS_GRID,
              rounds: int = 2, max_pixels: int = 2_000_000, seed: int = 0) -> Tuple[List[float], float, float]:
    """Returns (bias per class, MCC before, MCC after) on the given OOF tiles, with the
    regularised rule of :func:`fit_bias`."""
    if not probs:
        raise ValueError("no out-of-fold predictions to tune the bias on")
    lp, y = logp_pixels(probs, labels, max_pixels, seed)
    bias = fit_bias(lp, y, grid, rounds)
    before = _mcc_with(lp, y, np.zeros(lp.shape[1], np.float32))
    after = _mcc_with(lp, y, np.asarray(bias, np.float32))
    return bias, float(before), float(after)

