"""Per-band normalisation and the invalid-pixel rule, shared by training and inference.

Rule: values are clipped to the band's robust range, standardised with the training
mean and std, and every invalid pixel (NaN, +-inf, the file's nodata value) becomes 0,
i.e. the training mean of its band. Training imports this module so both sides agree.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np


def _column(values: Sequence[float], name: str, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"normalisation stats: '{name}' has {arr.shape[0]} values for {n} bands")
    return arr.reshape(n, 1, 1)


def normalize(image: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """Normalise a (C, H, W) tile with ``stats`` = {mean, std, lo, hi} lists of length C."""
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tile, got shape {image.shape}")
    c = image.shape[0]
    mean = _column(stats["mean"], "mean", c)
    std = _column(stats["std"], "std", c)
    lo = _column(stats["lo"], "lo", c)
    hi = _column(stats["hi"], "hi", c)
    x = image.astype(np.float32, copy=True)
    invalid = ~np.isfinite(x)
    if invalid.any():
        x[invalid] = 0.0
    np.clip(x, lo, hi, out=x)
    x -= mean
    x /= np.maximum(std, np.float32(1e-6))
    if invalid.any():
        x[invalid] = 0.0
    return x


def masked_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels that are 0 in every band, the masked area of the competition's
    tiles. Statistics skip them and the predictor labels them background."""
    return np.all(image == 0, axis=0)


def identity_stats(n_bands: int) -> Dict[str, list]:
    """Stats that leave data unchanged (tests and smoke runs)."""
    return {
        "mean": [0.0] * n_bands,
        "std": [1.0] * n_bands,
        "lo": [-3.0e38] * n_bands,
        "hi": [3.0e38] * n_bands,
    }
