"""Labels as real labels are made: small debris patches and ponds not drawn, outlines drawn
on coarser imagery and resampled to the tile grid, and misregistered by a pixel or two.
The bands are rendered from the truth; the labels a model learns from and is scored on are
these."""
from __future__ import annotations

import cv2
import numpy as np

BACKGROUND, GLACIER, DEBRIS, LAKE = 0, 1, 2, 3


def omit_small(labels: np.ndarray, px: float) -> np.ndarray:
    """Debris patches under ~30 px are drawn as the ice around them, ponds under ~12 px as
    what surrounds them (debris, mostly)."""
    out = labels.copy()
    for cls, min_px, into in ((DEBRIS, 30 * px * px, GLACIER), (LAKE, 12 * px * px, None)):
        n, comp, stats, _ = cv2.connectedComponentsWithStats((out == cls).astype(np.uint8), connectivity=8)
        small = np.nonzero(stats[1:, cv2.CC_STAT_AREA] < min_px)[0] + 1
        if not small.size:
            continue
        mask = np.isin(comp, small)
        if into is None:  # the most common neighbouring class
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
            votes = np.bincount(out[ring].ravel(), minlength=4) if ring.any() else np.array([1, 0, 0, 0])
            votes[LAKE] = 0
            into = int(votes.argmax())
        out[mask] = into
    return out


def resample(labels: np.ndarray, scale: int) -> np.ndarray:
    """Outlines drawn at ``scale`` times the pixel size (majority per coarse cell), then
    resampled to the tile grid (nearest) and smoothed."""
    if scale <= 1:
        return labels
    h, w = labels.shape
    votes = np.stack([cv2.resize((labels == c).astype(np.float32), (max(1, w // scale), max(1, h // scale)),
                                 interpolation=cv2.INTER_AREA) for c in range(4)])
    votes[LAKE] *= 1.3  # lakes are drawn generously when visible at all
    coarse = votes.argmax(0).astype(np.uint8)
    fine = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.medianBlur(fine, 3)


def misregister(labels: np.ndarray, rng, max_px: float) -> np.ndarray:
    """The label raster shifted against the bands by up to ``max_px`` in each direction."""
    dy, dx = (int(round(v)) for v in rng.uniform(-max_px, max_px, 2))
    if not dy and not dx:
        return labels
    out = np.roll(np.roll(labels, dy, axis=0), dx, axis=1)
    return out


def make_labels(truth: np.ndarray, rng, px: float, region, effects) -> np.ndarray:
    labels = omit_small(truth, px) if effects.label_omission else truth
    if effects.label_resampling:
        labels = resample(labels, region.label_scale)
    if effects.misregistration:
        labels = misregister(labels, rng, region.misregistration_px)
    else:
        rng.uniform(-1, 1, 2)  # the same random stream with the effect off
    return labels.astype(np.uint8)
