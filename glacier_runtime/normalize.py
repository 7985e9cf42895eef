"""Per-band normalisation and the invalid-pixel rule, shared by training and inference.

Rule: values are clipped to the band's range [lo, hi], standardised as (x - mean) / std,
and every invalid pixel (NaN, +-inf, the file's nodata value) becomes 0. Where lo, hi,
mean and std come from is the member's normalisation mode (``stats["mode"]``):

- ``fold`` (the default, and every member stored before modes existed): the training
  fold's robust range and its mean and std, the same for every tile;
- ``tile_percentile``: each tile's own ``tile_percentiles`` (default 2nd-98th) per band,
  mapped to [0, 1] (mean = the low percentile, std = the range);
- ``tile_standard``: each tile clipped to its own ``tile_percentiles`` and standardised
  with its own mean and std.

Tile statistics skip invalid and masked pixels (0 in every band); a tile with none left
falls back to the fold's statistics. Training imports this module so both sides agree.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np


def _column(values: Sequence[float], name: str, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"normalisation stats: '{name}' has {arr.shape[0]} values for {n} bands")
    return arr.reshape(n, 1, 1)


MODES = ("fold", "tile_percentile", "tile_standard")
DEFAULT_TILE_PERCENTILES = (2.0, 98.0)


def mode_of(stats: Mapping[str, Any]) -> str:
    mode = stats.get("mode") or "fold"
    if mode not in MODES:
        raise ValueError(f"normalisation mode {mode!r} is unknown; known: {', '.join(MODES)}")
    return mode


def tile_stats(image: np.ndarray, stats: Mapping[str, Any]) -> Mapping[str, Any]:
    """The {mean, std, lo, hi} that normalise this (C, H, W) tile under ``stats``' mode:
    ``stats`` itself for ``fold``, the tile's own for the per-tile modes. Compute it on the
    whole tile once and pass it to :func:`apply_stats` for each window of it."""
    mode = mode_of(stats)
    if mode == "fold":
        return stats
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tile, got shape {image.shape}")
    lo_pct, hi_pct = (float(v) for v in stats.get("tile_percentiles") or DEFAULT_TILE_PERCENTILES)
    keep = ~masked_pixels(image)
    out: Dict[str, list] = {"mean": [], "std": [], "lo": [], "hi": []}
    for b in range(image.shape[0]):
        v = image[b][keep]
        v = v[np.isfinite(v)]
        if v.size == 0:  # nothing valid (a fully masked tile): the fold's numbers
            for key in out:
                out[key].append(float(stats[key][b]))
            continue
        lo, hi = np.percentile(v, [lo_pct, hi_pct])
        if mode == "tile_percentile":
            mean, std = lo, hi - lo
        else:
            c = np.clip(v, lo, hi)
            mean, std = c.mean(dtype=np.float64), c.std(dtype=np.float64)
        out["lo"].append(float(lo))
        out["hi"].append(float(hi))
        out["mean"].append(float(mean))
        out["std"].append(float(std) if std > 1e-6 else 1.0)
    return out


def normalize(image: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """Normalise a (C, H, W) tile with ``stats`` = {mean, std, lo, hi} lists of length C
    (and optionally ``mode``/``tile_percentiles``: per-tile statistics, see the module)."""
    return apply_stats(image, tile_stats(image, stats))


def apply_stats(image: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """Clip to [lo, hi], standardise, invalid pixels to 0: with these numbers, whatever
    the mode (a window of a tile uses the whole tile's :func:`tile_stats`)."""
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
