"""Torch dataset of sampled, augmented patches from normalised tiles (in memory), or from raw
tiles normalised patch by patch after a radiometric shift (training/data/shift.py)."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from glacier_runtime.normalize import apply_stats
from training.losses import signed_distance_maps


class PatchDataset(Dataset):
    """Items: (image (C,P,P) float32, mask (P,P) int64, dist (K,P,P) float32 or empty).

    Augmentation is seeded per (seed, epoch, index), so a patch is the same whichever
    worker draws it, and a resumed epoch replays exactly.
    """

    def __init__(self, images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                 patches: List[Tuple[str, int, int, int]], patch: int, n_classes: int,
                 augment=None, boundary: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                 shift=None, norms: Optional[Mapping[str, Mapping[str, Any]]] = None, mode: str = "fold",
                 lakes=None, lake_p: float = 0.0):
        """``shift`` (training/data/shift.py): ``images`` are raw, each patch is shifted (or
        not) and normalised with its tile's ``norms`` moved through the shift. ``lakes``: a
        LakeBank (in the units of ``images``) pasted into a patch with probability ``lake_p``,
        before the shift, so a pasted lake is shifted with its new surroundings."""
        self.images, self.labels, self.patches = images, labels, patches
        self.patch, self.n_classes = patch, n_classes
        self.augment, self.boundary = augment, boundary
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shift, self.norms, self.mode = shift, norms, mode
        self.lakes, self.lake_p = lakes, lake_p

    def _seed(self, i: int) -> int:
        # the rank too: under DDP rank r's i-th patch is another patch than rank 0's i-th
        return int((self.seed * 1_000_003 + self.epoch * 10_007 + i + self.rank * 104_729) % (2**31))

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int):
        key, y0, x0, _ = self.patches[i]
        img = self.images[key]
        lab = self.labels[key]
        p = self.patch
        x = img[:, y0:y0 + p, x0:x0 + p]
        y = lab[y0:y0 + p, x0:x0 + p]
        if x.shape[1] < p or x.shape[2] < p:  # tile smaller than a patch: reflect-pad
            ph, pw = p - x.shape[1], p - x.shape[2]
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(x.shape[1:]) > 1 else "edge")
            y = np.pad(y, ((0, ph), (0, pw)), mode="reflect" if min(y.shape) > 1 else "edge")
        if self.shift is not None or (self.lakes is not None and self.lake_p):
            rng = np.random.default_rng(self._seed(i))
            if self.lakes is not None and self.lake_p and rng.random() < self.lake_p:
                x, y = self.lakes.paste(x, y, rng)  # in the images' own units: raw under a shift
            if self.shift is not None:
                prm = self.shift.sample(rng)
                norm = self.norms[key]
                if prm is not None:
                    x = self.shift.apply(x, prm)
                    norm = self.shift.stats_after(norm, prm, self.mode)
                x = apply_stats(x, norm)
        x = np.ascontiguousarray(x.transpose(1, 2, 0))
        y = np.ascontiguousarray(y)
        if self.augment is not None:
            self.augment.set_random_seed(self._seed(i))
            out = self.augment(image=x, mask=y)
            x, y = out["image"], out["mask"]
        dist = signed_distance_maps(y, self.n_classes) if self.boundary else np.zeros(0, np.float32)
        return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)),
                torch.from_numpy(y.astype(np.int64)), torch.from_numpy(dist))


class LazyMap:
    """A read-only mapping that computes values on access (streamed, memory-mapped data)."""

    def __init__(self, keys, fn):
        self._keys, self._fn = list(keys), fn

    def __getitem__(self, key):
        return self._fn(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
