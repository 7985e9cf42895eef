"""Morphological post-processing of class-id masks, in numpy + OpenCV only.

Rules (each switchable, parameterised, applied in list order):

* ``min_area``: components (8-connected) of a class smaller than ``min_area`` pixels are
  relabelled to the most common class on their outer boundary (ties: lowest id).
* ``fill_holes``: holes (4-connected non-class regions not touching the tile border) of a
  class, up to ``max_area`` pixels (None: any size), become that class.
* ``lake_shape``: lake components smaller than ``min_area`` or thinner than
  ``min_width`` pixels (twice the largest inscribed distance) are relabelled as in
  ``min_area``.
* ``debris_needs_glacier``: debris components that touch no glacier pixel (8-connected)
  become ``to`` (background by default).

A config is a list of dicts ``{"rule": name, "class": id, ...}``; presets live in
the build command's presets folder (docs/BUNDLE.md).

Every rule is linear in the pixels: one labelling pass (OpenCV connected components with
statistics), per-component decisions from ``np.bincount`` and vectorised look-ups; no
per-component scan of the tile (which made a noisy 1024x1024 mask take minutes).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import cv2
import numpy as np

_K8 = np.ones((3, 3), np.uint8)
# the 8 neighbour offsets (dy, dx) of a pixel
_OFFSETS8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _components(binary: np.ndarray, connectivity: int = 8):
    n, lab, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=connectivity)
    return n, lab, stats[:, cv2.CC_STAT_AREA]


def _ring_counts(mask: np.ndarray, chosen: np.ndarray, n: int, k: int, strip: int = 64) -> np.ndarray:
    """(n, k) counts of ring-pixel classes per chosen label (0 = not chosen).

    A pixel with an 8-neighbour in a chosen component is either in that component or on its
    ring (a pixel of the same class next to it would belong to it). Each (component, ring
    pixel) pair counts once: a neighbour label already seen at an earlier offset is skipped.
    Works in row strips so the eight shifted views stay in cache.
    """
    h, w = mask.shape
    padded = np.pad(chosen, 1)
    keys = []
    for y0 in range(0, h, strip):
        y1 = min(h, y0 + strip)
        own = chosen[y0:y1]
        vals = mask[y0:y1].astype(np.int64)
        neigh = [padded[1 + dy + y0:1 + dy + y1, 1 + dx:1 + dx + w] for dy, dx in _OFFSETS8]
        for i, lk in enumerate(neigh):
            ok = lk > 0
            ok &= lk != own
            for lj in neigh[:i]:
                ok &= lk != lj
            sel = lk[ok]
            if sel.size:
                keys.append(sel.astype(np.int64) * k + vals[ok])
    if not keys:
        return np.zeros((n, k), np.int64)
    return np.bincount(np.concatenate(keys), minlength=n * k).reshape(n, k)


def _relabel_by_boundary(mask: np.ndarray, lab: np.ndarray, n: int, selected: np.ndarray,
                         cls: int, n_classes: int) -> np.ndarray:
    """Relabel every selected component of ``cls`` at once: each takes the most common class
    on its 8-connected outer ring (ties: lowest id; no ring: 0). Linear in the pixels.

    ``lab``/``n`` label the 8-connected components of ``mask == cls``; ``selected`` is a
    boolean per label. Ring pixels are never ``cls`` (they would belong to the component),
    so the components are independent and one vectorised pass equals relabelling them one
    after another.
    """
    out = mask.copy()
    selected = np.asarray(selected, bool).copy()
    selected[0] = False
    if not selected.any():
        return out
    chosen = np.where(selected[lab], lab, 0).astype(np.int32)
    k = max(int(n_classes), int(mask.max()) + 1)
    counts = _ring_counts(mask, chosen, n, k)
    new = counts.argmax(axis=1).astype(mask.dtype)  # all-zero row -> 0, ties -> lowest id
    in_comp = chosen > 0
    out[in_comp] = new[chosen[in_comp]]
    return out


def remove_small(mask: np.ndarray, cls: int, min_area: int, n_classes: int = 4) -> np.ndarray:
    """Components of ``cls`` under ``min_area`` pixels take their ring's majority class."""
    n, lab, area = _components(mask == cls, 8)
    if n <= 1:
        return mask.copy()
    return _relabel_by_boundary(mask, lab, n, area < min_area, cls, n_classes)


def fill_holes(mask: np.ndarray, cls: int, max_area: Optional[int] = None) -> np.ndarray:
    """Holes of ``cls`` (4-connected, not touching the border, up to ``max_area``) become ``cls``."""
    out = mask.copy()
    n, lab, area = _components(mask != cls, 4)
    if n <= 1:
        return out
    fill = np.ones(n, bool)
    fill[0] = False
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        fill[edge] = False
    if max_area is not None:
        fill &= area <= int(max_area)
    out[fill[lab]] = cls
    return out


def lake_shape(mask: np.ndarray, cls: int = 3, min_area: int = 0, min_width: float = 0.0,
               n_classes: int = 4) -> np.ndarray:
    """Lake components that are small or thin (2 x largest inscribed distance < ``min_width``)
    take their ring's majority class."""
    binary = mask == cls
    n, lab, area = _components(binary, 8)
    if n <= 1:
        return mask.copy()
    drop = area < min_area
    if min_width:
        dist = cv2.distanceTransform(np.pad(binary.astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
        # thin <=> no pixel reaches half the width (same comparison as 2 * max < min_width)
        wide = (2.0 * dist.astype(np.float64) >= float(min_width)) & binary
        drop |= np.bincount(lab[wide], minlength=n) == 0
    return _relabel_by_boundary(mask, lab, n, drop, cls, n_classes)


def debris_needs_glacier(mask: np.ndarray, debris: int = 2, glacier: int = 1, to: int = 0) -> np.ndarray:
    """Debris components touching no glacier pixel (8-connected) become ``to``."""
    out = mask.copy()
    n, lab, _ = _components(mask == debris, 8)
    if n <= 1:
        return out
    near = cv2.dilate((mask == glacier).astype(np.uint8), _K8).astype(bool)
    keep = np.bincount(lab[near], minlength=n) > 0
    drop = (lab > 0) & ~keep[lab]
    out[drop] = to
    return out


RULES = {
    "min_area": lambda m, r, k: remove_small(m, int(r["class"]), int(r["min_area"]), k),
    "fill_holes": lambda m, r, k: fill_holes(m, int(r["class"]), r.get("max_area")),
    "lake_shape": lambda m, r, k: lake_shape(m, int(r.get("class", 3)), int(r.get("min_area", 0)),
                                             float(r.get("min_width", 0.0)), k),
    "debris_needs_glacier": lambda m, r, k: debris_needs_glacier(
        m, int(r.get("class", 2)), int(r.get("glacier", 1)), int(r.get("to", 0))),
}


def validate_rules(rules: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for i, r in enumerate(rules or []):
        if "rule" not in r or r["rule"] not in RULES:
            raise ValueError(f"post-processing rule #{i} {dict(r)!r}: 'rule' must be one of {sorted(RULES)}")
        if r["rule"] in ("min_area", "fill_holes") and "class" not in r:
            raise ValueError(f"post-processing rule #{i} ({r['rule']}) needs a 'class' id")
        if r["rule"] == "min_area" and int(r.get("min_area", -1)) < 0:
            raise ValueError(f"post-processing rule #{i} (min_area) needs min_area >= 0")
        out.append(dict(r))
    return out


def apply(mask: np.ndarray, rules: Sequence[Mapping[str, Any]], n_classes: int = 4) -> np.ndarray:
    """Apply enabled rules in order; a rule with ``enabled: false`` is skipped."""
    out = np.ascontiguousarray(mask, dtype=np.uint8)
    for r in rules or []:
        if r.get("enabled", True):
            out = RULES[r["rule"]](out, r, n_classes)
    return out
