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


def mcc_batch(cms: np.ndarray) -> np.ndarray:
    """Multi-class MCC (Gorodkin's R_K, as sklearn computes it) of a stack of confusion
    matrices ``(..., K, K)`` (rows = truth), in float64; 0 where it is undefined (one class
    only in the truth or in the prediction)."""
    cms = np.asarray(cms, np.float64)
    t = cms.sum(-1)
    p = cms.sum(-2)
    c = np.trace(cms, axis1=-2, axis2=-1)
    s = cms.sum((-2, -1))
    cov_tp = c * s - (t * p).sum(-1)
    cov_pp = s * s - (p * p).sum(-1)
    cov_tt = s * s - (t * t).sum(-1)
    den = np.sqrt(cov_tt * cov_pp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, cov_tp / np.where(den > 0, den, 1.0), 0.0)


def mcc_from_confusion(cm: np.ndarray) -> float:
    """Multi-class MCC of one confusion matrix (:func:`mcc_batch`)."""
    return float(mcc_batch(cm))


def tile_confusions(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], k: int) -> np.ndarray:
    """(T, K, K) confusion matrices, one per tile (rows = truth), for bootstraps over tiles."""
    out = np.zeros((len(preds), k, k), np.int64)
    for i, (p, y) in enumerate(zip(preds, labels)):
        out[i] = confusion(y, p, k)
    return out


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
