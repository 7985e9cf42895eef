"""Padding to the network stride and overlapping windows with smooth blending."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np


def pad_to_multiple(x: np.ndarray, multiple: int = 32, min_size: int = 0) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Reflect-pad a (C, H, W) array at the bottom/right to a multiple of ``multiple``.

    Returns the padded array and the original (H, W). Works for tiles smaller than the pad.
    """
    _, h, w = x.shape
    th = max(int(np.ceil(h / multiple)) * multiple, min_size)
    tw = max(int(np.ceil(w / multiple)) * multiple, min_size)
    if (th, tw) == (h, w):
        return x, (h, w)
    mode = "reflect" if h > 1 and w > 1 else "edge"
    return np.pad(x, ((0, 0), (0, th - h), (0, tw - w)), mode=mode), (h, w)


def window_starts(length: int, size: int, overlap: float) -> List[int]:
    """Start offsets covering ``length`` with windows of ``size`` and the given overlap."""
    if length <= size:
        return [0]
    step = max(1, int(size * (1.0 - overlap)))
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def blend_weight(h: int, w: int, margin: float = 0.25) -> np.ndarray:
    """A smooth (H, W) weight: 1 in the centre, cosine ramp to a small floor at the edges."""
    def ramp(n: int) -> np.ndarray:
        m = max(1, int(n * margin))
        r = np.ones(n, np.float32)
        t = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, m + 2)[1:-1])
        r[:m] = t
        r[n - m:] = np.minimum(r[n - m:], t[::-1])
        return np.maximum(r, 1e-3)

    return np.outer(ramp(h), ramp(w)).astype(np.float32)


def plan_windows(h: int, w: int, window: int, overlap: float) -> List[Tuple[int, int, int, int]]:
    """(y0, x0, wh, ww) windows over a padded (h, w) tile."""
    wh, ww = min(h, window), min(w, window)
    return [(y, x, wh, ww) for y in window_starts(h, wh, overlap) for x in window_starts(w, ww, overlap)]


def plan_blocks(h: int, w: int, block: int, margin: int) -> List[Tuple[Tuple[int, int, int, int], Tuple[int, int, int, int]]]:
    """Blocks of a large tile or scene, row by row: ``((y0, y1, x0, x1), (ya, yb, xa, xb))``,
    the block and the crop read around it (``margin`` pixels of context, clipped to the edges)."""
    out = []
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            y1, x1 = min(h, y0 + block), min(w, x0 + block)
            out.append(((y0, y1, x0, x1), (max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin))))
    return out
