"""Competition metric: multi-class MCC over all pixels, from a streaming confusion matrix.

Equal to ``sklearn.metrics.matthews_corrcoef`` on the flattened labels; tiles are
accumulated into one confusion matrix, never concatenated.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix (rows = truth, cols = prediction) as int64."""
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"truth and prediction sizes differ: {t.shape} vs {p.shape}")
    for name, arr in (("truth", t), ("prediction", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            bad = sorted(set(np.unique(arr).tolist()) - set(range(n_classes)))
            raise ValueError(f"{name} has class ids {bad} outside 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def mcc_from_confusion(cm: np.ndarray) -> float:
    """Multi-class MCC (Gorodkin's R_K), exactly as sklearn computes it."""
    cm = np.asarray(cm, dtype=np.int64)
    t = [int(v) for v in cm.sum(axis=1)]
    p = [int(v) for v in cm.sum(axis=0)]
    c = int(np.trace(cm))
    s = int(cm.sum())
    cov_tp = c * s - sum(a * b for a, b in zip(t, p))
    cov_pp = s * s - sum(b * b for b in p)
    cov_tt = s * s - sum(a * a for a in t)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(float(cov_tt) * float(cov_pp)))


def _binary_counts(cm: np.ndarray, k: int):
    tp = int(cm[k, k])
    fn = int(cm[k].sum()) - tp
    fp = int(cm[:, k].sum()) - tp
    tn = int(cm.sum()) - tp - fn - fp
    return tp, fp, fn, tn


def per_class_scores(cm: np.ndarray, names: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """One-vs-rest MCC, IoU, F1, recall, precision, support and predicted count per class
    (NaN when undefined)."""
    out = []
    n = cm.shape[0]
    names = list(names) if names is not None else [str(i) for i in range(n)]
    for k in range(n):
        tp, fp, fn, tn = _binary_counts(cm, k)
        denom = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / denom if denom else 0.0
        iou = tp / (tp + fp + fn) if (tp + fp + fn) else float("nan")
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
        recall = tp / (tp + fn) if (tp + fn) else float("nan")
        precision = tp / (tp + fp) if (tp + fp) else float("nan")
        out.append({"class": names[k], "mcc": float(mcc), "iou": float(iou), "f1": float(f1),
                    "recall": float(recall), "precision": float(precision),
                    "support": tp + fn, "predicted": tp + fp})
    return out


class ConfusionAccumulator:
    """Accumulates tiles into one confusion matrix; ``mcc`` is the competition score."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.cm = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> float:
        """Add one tile; returns that tile's own MCC."""
        cm = confusion(y_true, y_pred, self.n_classes)
        self.cm += cm
        return mcc_from_confusion(cm)

    @property
    def mcc(self) -> float:
        return mcc_from_confusion(self.cm)

    def per_class(self, names: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
        return per_class_scores(self.cm, names)


def mcc(y_true: np.ndarray, y_pred: np.ndarray, n_classes: Optional[int] = None) -> float:
    """MCC of two label arrays (any shape)."""
    if n_classes is None:
        n_classes = int(max(np.max(y_true, initial=0), np.max(y_pred, initial=0))) + 1
    return mcc_from_confusion(confusion(y_true, y_pred, n_classes))
