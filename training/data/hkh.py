"""HKH Glacier Mapping patches (ICIMOD; Landsat-7 ETM+): the pre-training adapter.

Layout: ``img_*.npy`` / ``mask_*.npy`` pairs, possibly with slice prefixes
(``slice_3_img_12.npy``) and in ``train/``, ``val/``, ``test/`` folders. Images have 15
channels (B1, B2, B3, B4, B5, B6_low, B6_high, B7, B8_pan, BQA, NDVI, NDSI, NDWI,
elevation, slope) on the first or last axis; masks have clean-ice and debris channels
(first two channels; more are ignored). Arrays are memory-mapped: the full set is far
larger than RAM, so patches are read on demand by each worker.

Class mapping: clean ice -> glacier (1), debris -> debris (2), the rest -> background (0).
HKH has no lake class: the lake output of a 4-class model only ever sees "not lake";
fine-tuning on the competition tiles teaches it (documented in docs/HKH.md).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from glacier_runtime.atomic import atomic_write_with
from glacier_runtime.classes import CLASS_NAMES
from training.bands import HKH_CHANNELS, BandMappingError, COMPETITION_BANDS, map_bands

_IMG = re.compile(r"^(?P<prefix>.*?)img_(?P<id>[^.]+)\.npy$")
SPLITS = ("train", "val", "test")
#: other names for the validation split (the glacier_mapping pipeline writes ``dev/``)
SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}


class HKHLayoutError(ValueError):
    pass


@dataclass
class HKHPatch:
    key: str
    image: str
    mask: str
    split: str


def find_patches(root: str) -> Dict[str, List[HKHPatch]]:
    """Pair image and mask files per split ('all' when there are no split folders)."""
    if not os.path.isdir(root):
        raise HKHLayoutError(f"HKH folder {root} does not exist")
    out: Dict[str, List[HKHPatch]] = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root).split(os.sep)[0]
        rel = SPLIT_ALIASES.get(rel, rel)
        split = rel if rel in SPLITS else "all"
        names = set(files)
        for f in sorted(files):
            m = _IMG.match(f)
            if not m:
                continue
            mask = f"{m.group('prefix')}mask_{m.group('id')}.npy"
            if mask not in names:
                continue
            key = os.path.relpath(os.path.join(folder, f), root)
            out.setdefault(split, []).append(HKHPatch(key, os.path.join(folder, f), os.path.join(folder, mask), split))
    if not out:
        listing = sorted(os.listdir(root))[:8]
        raise HKHLayoutError(
            f"{root} is not an HKH patch folder: no img_*.npy with matching mask_*.npy found (saw {listing}). "
            "Extract the HKH Glacier Mapping slices (img_*.npy / mask_*.npy) into this folder.")
    return out


def channel_axis(shape: Tuple[int, ...], n: int, what: str, path: str) -> int:
    if len(shape) != 3:
        raise HKHLayoutError(f"{path}: {what} must be 3-D (H, W, C) or (C, H, W), got shape {shape}")
    if shape[-1] == n and shape[0] != n:
        return 2
    if shape[0] == n:
        return 0
    raise HKHLayoutError(f"{path}: expected {n} {what} channels on the first or last axis, got shape {shape}")


def hkh_indices(bands: Sequence[str]) -> List[int]:
    missing = [b for b in bands if b not in HKH_CHANNELS]
    if missing:
        raise BandMappingError(f"HKH has no channels {missing}; its channels are {list(HKH_CHANNELS)}")
    return [HKH_CHANNELS.index(b) for b in bands]


def competition_to_hkh(allow_role_mismatch: bool = False, hkh_bands: Optional[Sequence[str]] = None) -> List[str]:
    """The HKH channels standing in for the competition bands, matched by physical role."""
    return map_bands("L8", COMPETITION_BANDS, "L7", hkh_bands, allow_role_mismatch)


class HKHPatches:
    """Memory-mapped access to a list of patches: selected channels and class-id labels."""

    def __init__(self, patches: Sequence[HKHPatch], bands: Sequence[str], mask_channels: int = 2):
        self.patches = list(patches)
        self.bands = list(bands)
        self.idx = hkh_indices(bands)
        self.mask_channels = mask_channels
        first = np.load(self.patches[0].image, mmap_mode="r")
        self.img_axis = channel_axis(first.shape, len(HKH_CHANNELS), "image", self.patches[0].image)
        m = np.load(self.patches[0].mask, mmap_mode="r")
        if m.ndim == 3 and min(m.shape[0], m.shape[-1]) >= mask_channels:
            self.mask_axis = 2 if m.shape[-1] < m.shape[0] else 0
        else:
            raise HKHLayoutError(f"{self.patches[0].mask}: masks need >= {mask_channels} channels "
                                 f"(clean ice, debris), got shape {m.shape}")

    def __len__(self) -> int:
        return len(self.patches)

    def image(self, i: int) -> np.ndarray:
        """float32 (C, H, W) of the selected channels (read from the memory map)."""
        arr = np.load(self.patches[i].image, mmap_mode="r")
        sel = arr[..., self.idx] if self.img_axis == 2 else arr[self.idx]
        sel = np.asarray(sel, dtype=np.float32)
        return np.ascontiguousarray(sel.transpose(2, 0, 1) if self.img_axis == 2 else sel)

    def label(self, i: int) -> np.ndarray:
        m = np.load(self.patches[i].mask, mmap_mode="r")
        clean = np.asarray(m[..., 0] if self.mask_axis == 2 else m[0]) > 0
        debris = np.asarray(m[..., 1] if self.mask_axis == 2 else m[1]) > 0
        out = np.zeros(clean.shape, np.uint8)
        out[clean] = 1
        out[debris] = 2
        return out


class HKHSource:
    """CompetitionDataset-like view of HKH patches for the training loop (lazy: never in memory)."""

    lazy = True
    class_names = CLASS_NAMES  # a 4-class model; HKH itself never labels lake

    def __init__(self, patches: HKHPatches):
        self.patches = patches
        self.index = {p.key: i for i, p in enumerate(patches.patches)}

    @property
    def keys(self):
        return list(self.index)

    def image(self, key: str) -> np.ndarray:
        return self.patches.image(self.index[key])

    def label(self, key: str) -> np.ndarray:
        return self.patches.label(self.index[key])

    def shape(self, key: str):
        arr = np.load(self.patches.patches[self.index[key]].image, mmap_mode="r")
        return tuple(arr.shape[:2]) if self.patches.img_axis == 2 else tuple(arr.shape[1:])


def write_fake_hkh(out: str, n_train: int = 16, n_val: int = 4, size: int = 128, seed: int = 0,
                   prefix: str = "slice_0_") -> Dict[str, int]:
    """The synthetic terrain rendered in HKH's 15 channels and patch layout (tests, demo)."""
    from training.data.scenes import REGIONS, generate_scene
    from training.data.scenes.render import to_reflectance

    region = REGIONS["lahaul"]  # another range than the competition's tiles, as HKH is
    counts = {}
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        if n <= 0:
            continue
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        dn, labels, extra = generate_scene(rows, cols, (size, size), seed + 500 + s, region, return_extras=True)
        d = os.path.join(out, split)
        os.makedirs(d, exist_ok=True)
        phys = to_reflectance(dn)  # HKH stores reflectance and brightness temperature, not DNs
        blue, green, red, swir1 = phys["reflectance"]
        tir = phys["temperature"] * (dn[4] > 0)
        nir = extra["nir"]
        swir2 = 0.8 * swir1
        eps = 1e-6
        chans = [blue, green, red, nir, swir1, tir - 1.5, tir, swir2, (blue + green + red) / 3, np.zeros_like(blue),
                 (nir - red) / (nir + red + eps), (green - swir1) / (green + swir1 + eps),
                 (green - nir) / (green + nir + eps), extra["elevation"], extra["slope"]]
        img = np.stack(chans, -1).astype(np.float32)
        for i in range(n):
            r, c = divmod(i, cols)
            ys, xs = slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size)
            lab = labels[ys, xs]
            mask = np.stack([lab == 1, lab == 2], -1).astype(np.uint8)  # no lake channel in HKH
            atomic_write_with(os.path.join(d, f"{prefix}img_{i}.npy"), lambda tmp, a=img[ys, xs]: np.save(tmp, a))
            atomic_write_with(os.path.join(d, f"{prefix}mask_{i}.npy"), lambda tmp, a=mask: np.save(tmp, a))
        counts[split] = n
    return counts
