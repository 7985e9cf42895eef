"""Labels as real labels are made: small debris patches and ponds not drawn, outlines drawn
on coarser imagery and resampled to the tile grid, and misregistered by a pixel or two.
The bands are rendered from the truth; the labels a model learns from and is scored on are
these, made from the glacier inventory (``ice._inventory``: older, larger, generalised)
with the lakes as the image shows them."""
from __future__ import annotations

import cv2
import numpy as np

BACKGROUND, GLACIER, DEBRIS, LAKE = 0, 1, 2, 3


def omit_small(labels: np.ndarray, px: float) -> np.ndarray:
    """Debris patches under ~30 px are drawn as the ice around them, ponds under ~12 px as
    what surrounds each of them (debris, mostly)."""
    out = labels.copy()
    for cls, min_px, into in ((DEBRIS, 30 * px * px, GLACIER), (LAKE, 12 * px * px, None)):
        n, comp, stats, _ = cv2.connectedComponentsWithStats((out == cls).astype(np.uint8), connectivity=8)
        for i in np.nonzero(stats[1:, cv2.CC_STAT_AREA] < min_px)[0] + 1:
            x, y, w, h = (int(v) for v in stats[i, :4])
            ys, xs = slice(max(0, y - 1), y + h + 1), slice(max(0, x - 1), x + w + 1)
            mask = comp[ys, xs] == i
            out[ys, xs][mask] = into if into is not None else _surrounding(out[ys, xs], mask)
    return out


def _surrounding(window: np.ndarray, mask: np.ndarray) -> int:
    """The most common class on the one-pixel ring around ``mask`` (lakes aside; background
    where the ring is empty)."""
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
    votes = np.bincount(window[ring].ravel(), minlength=4)
    votes[LAKE] = 0
    return int(votes.argmax()) if votes.any() else BACKGROUND


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
    """The region's label scale and misregistration are in 30 m pixels (px = 1): a smaller tile
    of the same ground gets them in its own, bigger pixels."""
    labels = omit_small(truth, px) if effects.label_omission else truth
    if effects.label_resampling:
        labels = resample(labels, int(round(region.label_scale * px)))
    if effects.misregistration:
        labels = misregister(labels, rng, region.misregistration_px * px)
    return labels.astype(np.uint8)
