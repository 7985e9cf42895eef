"""Robust per-band normalisation statistics from a given set of tiles (a fold's training
tiles only). Applied by ``glacier_runtime.normalize.normalize`` (one source of truth)."""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

import numpy as np

from glacier_runtime.normalize import masked_pixels


def compute_stats(
    images: Iterable[np.ndarray],
    band_names: Sequence[str],
    lo_pct: float = 0.5,
    hi_pct: float = 99.5,
    max_per_tile: int = 200_000,
    seed: int = 0,
    ignore_masked: bool = True,
) -> Dict[str, list]:
    """Percentile-clip each band to [lo_pct, hi_pct], then take mean and std.

    Invalid pixels (NaN/inf) are ignored, and so (``ignore_masked``) are masked pixels:
    zero in every band, as the competition's masked tiles store areas outside the scene.
    Left in, a few percent of zeros inflate the thermal band's std several-fold and squash
    its signal. Each tile contributes at most ``max_per_tile`` pixels (a seeded subsample)
    so one large tile cannot dominate.
    """
    rng = np.random.default_rng(seed)
    n = len(band_names)
    samples = [[] for _ in range(n)]
    count = 0
    for img in images:
        if img.ndim != 3 or img.shape[0] != n:
            raise ValueError(f"expected ({n}, H, W) tiles for bands {list(band_names)}, got {img.shape}")
        count += 1
        keep = ~masked_pixels(img).reshape(-1) if ignore_masked else np.ones(img[0].size, bool)
        for b in range(n):
            v = img[b].reshape(-1)[keep]
            v = v[np.isfinite(v)]
            if v.size > max_per_tile:
                v = rng.choice(v, max_per_tile, replace=False)
            samples[b].append(v.astype(np.float64))
    if count == 0:
        raise ValueError("cannot compute normalisation statistics from zero tiles")
    out: Dict[str, list] = {"bands": list(band_names), "mean": [], "std": [], "lo": [], "hi": []}
    for b in range(n):
        v = np.concatenate(samples[b]) if samples[b] else np.zeros(0)
        if v.size == 0:
            raise ValueError(f"band {band_names[b]} has no valid pixels in the given tiles")
        lo, hi = np.percentile(v, [lo_pct, hi_pct])
        c = np.clip(v, lo, hi)
        std = float(c.std())
        out["mean"].append(float(c.mean()))
        out["std"].append(std if std > 1e-6 else 1.0)
        out["lo"].append(float(lo))
        out["hi"].append(float(hi))
    out["percentiles"] = [lo_pct, hi_pct]
    return out
