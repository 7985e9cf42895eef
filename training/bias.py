"""Per-class log-probability bias tuned on out-of-fold predictions to maximise MCC.

Rare classes (lake, debris) are under-predicted by a model trained with any pixel loss;
a bias added to log p before the argmax moves the decision boundary. Coordinate ascent
over a grid, class 0 fixed at 0.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.metrics import confusion, mcc_from_confusion


def _mcc_with(logp: np.ndarray, y: np.ndarray, bias: np.ndarray) -> float:
    pred = (logp + bias).argmax(1)
    return mcc_from_confusion(confusion(y, pred, logp.shape[1]))


def tune_bias(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], grid: Optional[Sequence[float]] = None,
              rounds: int = 2, max_pixels: int = 2_000_000, seed: int = 0) -> Tuple[List[float], float, float]:
    """Returns (bias per class, MCC before, MCC after) on the given OOF tiles."""
    if not probs:
        raise ValueError("no out-of-fold predictions to tune the bias on")
    k = probs[0].shape[0]
    lp = np.concatenate([np.log(np.maximum(p.reshape(k, -1).T.astype(np.float32), 1e-8)) for p in probs])
    y = np.concatenate([l.reshape(-1) for l in labels]).astype(np.int64)
    if len(y) > max_pixels:
        idx = np.random.default_rng(seed).choice(len(y), max_pixels, replace=False)
        lp, y = lp[idx], y[idx]
    grid = np.asarray(grid if grid is not None else np.linspace(-2.0, 4.0, 31), np.float32)
    bias = np.zeros(k, np.float32)
    before = best = _mcc_with(lp, y, bias)
    for _ in range(rounds):
        for c in range(1, k):
            for v in grid:
                trial = bias.copy()
                trial[c] = v
                m = _mcc_with(lp, y, trial)
                if m > best + 1e-9:
                    best, bias = m, trial
    return [float(b) for b in bias], float(before), float(best)


def load_oof(weights_dir: str, member_names: Sequence[str]) -> Tuple[List[np.ndarray], List[np.ndarray], List[str]]:
    """OOF probabilities of the given members (mean over members sharing a tile) + labels."""
    per_tile: Dict[str, List[np.ndarray]] = {}
    for name in member_names:
        d = os.path.join(weights_dir, "oof", name)
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            if f.endswith(".npy") and not f.startswith("."):
                per_tile.setdefault(f[:-4], []).append(np.load(os.path.join(d, f)).astype(np.float32))
    probs, labels, keys = [], [], []
    for key, ps in sorted(per_tile.items()):
        lab = os.path.join(weights_dir, "oof", "labels", f"{key}.npy")
        if os.path.exists(lab):
            probs.append(np.mean(ps, 0))
            labels.append(np.load(lab))
            keys.append(key)
    return probs, labels, keys
