"""The tuner's statistics: the pooled-MCC gain of a candidate over the current setting with a
bootstrap over tiles."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.metrics import mcc_batch


@dataclass
class Gain:
    gain: float
    lo: float
    hi: float
    base_mcc: float
    cand_mcc: float


def bootstrap_gain(base: np.ndarray, cand: np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> Gain:
    """Pooled-MCC gain of ``cand`` over ``base`` (per-tile confusions, same tiles) with a
    bootstrap over tiles: ``lo``/``hi`` are the ``1 - confidence`` / ``confidence`` quantiles."""
    if base.shape != cand.shape:
        raise ValueError(f"per-tile confusions differ in shape: {base.shape} vs {cand.shape}")
    t = base.shape[0]
    b_m = float(mcc_batch(base.sum(0)))
    c_m = float(mcc_batch(cand.sum(0)))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(t, np.full(t, 1.0 / t), size=n_boot).astype(np.float64)  # (B, T)
    kk = base.shape[1] * base.shape[2]
    bb = (counts @ base.reshape(t, kk)).reshape(n_boot, *base.shape[1:])
    cc = (counts @ cand.reshape(t, kk)).reshape(n_boot, *base.shape[1:])
    d = mcc_batch(cc) - mcc_batch(bb)
    return Gain(gain=c_m - b_m, lo=float(np.quantile(d, 1 - confidence)), hi=float(np.quantile(d, confidence)),
                base_mcc=b_m, cand_mcc=c_m)
