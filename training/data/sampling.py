"""Pixel-balanced patch sampling: each patch is centred (with jitter) on a pixel of a class
drawn from configured target shares, so rare debris and lakes are seen often."""
from __future__ import annotations

from typing import List, Mapping, Sequence, Tuple

import numpy as np


class PixelBalancedSampler:
    """Draws (tile, y0, x0) patch corners. Deterministic for (seed, epoch)."""

    def __init__(self, labels: Mapping[str, np.ndarray], class_names: Sequence[str],
                 targets: Mapping[str, float], patch: int, jitter: float = 0.4,
                 max_index: int = 20000, seed: int = 0):
        unknown = [k for k in targets if k not in class_names]
        if unknown:
            raise ValueError(f"sampler targets name unknown classes {unknown}; classes are {list(class_names)}")
        self.keys = list(labels)
        self.shapes = {k: labels[k].shape for k in self.keys}
        self.patch, self.jitter = patch, jitter
        self.class_names = list(class_names)
        rng = np.random.default_rng(seed)
        # per class: arrays of (tile index, y, x), subsampled to bound memory
        self.index: List[np.ndarray] = []
        for c in range(len(class_names)):
            rows = []
            for ti, k in enumerate(self.keys):
                ys, xs = np.nonzero(labels[k] == c)
                if ys.size > max_index:
                    pick = rng.choice(ys.size, max_index, replace=False)
                    ys, xs = ys[pick], xs[pick]
                rows.append(np.stack([np.full(ys.size, ti), ys, xs], 1))
            self.index.append(np.concatenate(rows) if rows else np.zeros((0, 3), int))
        want = np.array([float(targets.get(n, 0.0)) for n in class_names])
        present = np.array([len(ix) > 0 for ix in self.index])
        want = want * present
        if want.sum() <= 0:
            want = present.astype(float)
        self.probs = want / want.sum()
        self.absent = [n for n, p in zip(class_names, present) if not p]

    def sample(self, n: int, seed: int, epoch: int) -> List[Tuple[str, int, int, int]]:
        """n patches as (tile key, y0, x0, centre class)."""
        rng = np.random.default_rng([seed, epoch, 7])
        out = []
        classes = rng.choice(len(self.probs), size=n, p=self.probs)
        for c in classes:
            ix = self.index[c]
            ti, y, x = ix[rng.integers(len(ix))]
            key = self.keys[int(ti)]
            h, w = self.shapes[key]
            ph, pw = min(self.patch, h), min(self.patch, w)
            j = self.jitter * self.patch / 2
            cy = y + rng.uniform(-j, j)
            cx = x + rng.uniform(-j, j)
            y0 = int(np.clip(round(cy - ph / 2), 0, h - ph))
            x0 = int(np.clip(round(cx - pw / 2), 0, w - pw))
            out.append((key, y0, x0, int(c)))
        return out


def achieved_rates(centre_classes: Sequence[int], n_classes: int) -> np.ndarray:
    """Share of patches centred on each class (uniform crops have no centre class: -1)."""
    c = np.asarray(centre_classes, int)
    c = c[c >= 0]
    return np.bincount(c, minlength=n_classes)[:n_classes] / max(len(c), 1)


class UniformPatchSampler:
    """Uniform random crops (for large streamed sets such as HKH, where indexing every
    label for balanced sampling would read the whole set). Deterministic for (seed, epoch)."""

    def __init__(self, shapes: Mapping[str, Tuple[int, int]], patch: int):
        self.keys = list(shapes)
        self.shapes = dict(shapes)
        self.patch = patch
        self.absent: List[str] = []

    def sample(self, n: int, seed: int, epoch: int) -> List[Tuple[str, int, int, int]]:
        rng = np.random.default_rng([seed, epoch, 11])
        out = []
        for i in rng.integers(len(self.keys), size=n):
            key = self.keys[int(i)]
            h, w = self.shapes[key]
            y0 = int(rng.integers(0, max(h - self.patch, 0) + 1))
            x0 = int(rng.integers(0, max(w - self.patch, 0) + 1))
            out.append((key, y0, x0, -1))
        return out
