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
# below one two-label ring pixel per this many pixels, reading each one's eight neighbours is
# cheaper than the moment test's three full-tile box filters (measured at 2048x2048)
_NEIGHBOUR_READ_BELOW = 24


def _neighbours(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, outside) -> np.ndarray:
    """(len(ys), 8) int array: the eight neighbours of the pixels (ys, xs) of ``img``, with
    ``outside`` where a neighbour falls off the tile."""
    w = img.shape[1]
    padded = np.pad(img, 1, constant_values=outside).ravel()
    at = (np.asarray(ys, np.intp) + 1) * (w + 2) + np.asarray(xs, np.intp) + 1
    return np.stack([padded[at + dy * (w + 2) + dx] for dy, dx in _OFFSETS8], 1).astype(np.intp)


def _components(binary: np.ndarray, connectivity: int = 8):
    """(labels, statistics) of OpenCV's connected components with statistics."""
    _, lab, stats, _ = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=connectivity)
    return lab, stats


def _ring_counts(mask: np.ndarray, f: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n, k) counts of ring-pixel classes per chosen label; ``f`` holds each pixel's chosen
    label as a float (0 = not chosen), exact because labels stay below the float's 2**mantissa.

    A pixel with an 8-neighbour in a chosen component is either in that component or on its
    ring (a same-class pixel next to it would belong to it). Each (component, ring pixel)
    pair counts once. Per ring pixel the largest and smallest neighbour label come from one
    grey dilation and one erosion; when they differ, the neighbours' label sum and sum of
    squares (box filters, exact in float64) tell whether a third label lies between them:
    sum over chosen neighbours of (v - min)(max - v) is zero exactly when every label is
    min or max. Only those pixels (or, where few pixels have two labels, all of them) are
    resolved from their eight neighbours.
    """
    huge = f.dtype == np.float64  # labels >= 2**24: the moment test would not be exact
    big = float(2 ** 53 if huge else 2 ** 24)
    mx = cv2.dilate(f, _K8, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    mn = cv2.erode(np.where(f > 0, f, f.dtype.type(big)), _K8, borderType=cv2.BORDER_CONSTANT, borderValue=big)
    ring = np.flatnonzero((f == 0) & (mx > 0))
    if not ring.size:
        return np.zeros((n, k), np.int64)
    vals = mask.ravel()[ring].astype(np.intp)
    hi = mx.ravel()[ring].astype(np.intp)
    lo = mn.ravel()[ring].astype(np.intp)
    counts = np.bincount(hi * k + vals, minlength=n * k)
    two = np.flatnonzero(lo != hi)
    if not two.size:
        return counts.reshape(n, k)
    pix, lo, hi, vals = ring[two], lo[two], hi[two], vals[two]
    counts += np.bincount(lo * k + vals, minlength=n * k)
    if huge or pix.size * _NEIGHBOUR_READ_BELOW < f.size:  # few such pixels: reading their neighbours is cheaper
        more = np.arange(pix.size)
    else:
        f64 = f.astype(np.float64)
        box = dict(normalize=False, borderType=cv2.BORDER_CONSTANT)
        s1 = cv2.boxFilter(f64, -1, (3, 3), **box).ravel()[pix].astype(np.int64)
        s2 = cv2.sqrBoxFilter(f64, -1, (3, 3), **box).ravel()[pix].astype(np.int64)
        c = cv2.boxFilter((f > 0).view(np.uint8), -1, (3, 3), **box).ravel()[pix].astype(np.int64)
        more = np.flatnonzero((lo + hi) * s1 - s2 - c * lo * hi > 0)
    if more.size:
        nb = _neighbours(f, *np.divmod(pix[more], f.shape[1]), outside=0)
        lo, hi = lo[more, None], hi[more, None]
        nb[(nb <= lo) | (nb >= hi)] = 0  # min and max are counted already
        nb.sort(axis=1)
        first = nb > 0
        first[:, 1:] &= nb[:, 1:] != nb[:, :-1]
        keys = nb * k + vals[more, None]
        counts += np.bincount(keys[first], minlength=n * k)
    return counts.reshape(n, k)


def _relabel_by_boundary(mask: np.ndarray, lab: np.ndarray, stats: np.ndarray, selected: np.ndarray,
                         n_classes: int) -> np.ndarray:
    """Relabel every selected component at once: each takes the most common class on its
    8-connected outer ring (ties: lowest id; no ring: 0). Linear in the pixels.

    ``lab``/``stats`` are OpenCV's labels and statistics of the 8-connected components of
    ``mask == cls``; ``selected`` is a boolean per label. Ring pixels are never ``cls``
    (they would belong to the component), so the components are independent and one
    vectorised pass equals relabelling them one after another. Single-pixel components
    (most of them in a noisy mask) are read from their eight neighbours at the position
    OpenCV reports; only the larger ones need the tile-wide ring count.
    """
    n = len(stats)
    selected = np.asarray(selected, bool).copy()
    selected[0] = False
    if not selected.any():
        return mask.copy()
    k = max(int(n_classes), int(mask.max()) + 1)
    ones = selected & (stats[:, cv2.CC_STAT_AREA] == 1)
    rest = selected & ~ones
    out = mask.copy()
    if ones.any():
        ys, xs = stats[ones, cv2.CC_STAT_TOP], stats[ones, cv2.CC_STAT_LEFT]
        fits = mask.dtype.kind == "u" and np.iinfo(mask.dtype).max >= k
        nb = _neighbours(mask if fits else mask.astype(np.int32), ys, xs, outside=k)  # k: never counted
        nb += (np.arange(len(ys)) * (k + 1))[:, None]  # one row of k + 1 bins per pixel
        counts = np.bincount(nb.ravel(), minlength=len(ys) * (k + 1)).reshape(len(ys), k + 1)[:, :k]
        out[ys, xs] = counts.argmax(axis=1)  # no neighbour -> 0, ties -> lowest id
    if rest.any():
        r = int(rest.sum())  # the larger components, numbered 1..r (small counts, small numbers)
        ftype = np.float32 if r < 2 ** 24 else np.float64
        ids = np.zeros(n, ftype)
        ids[rest] = np.arange(1, r + 1, dtype=ftype)
        f = np.take(ids, lab)
        best = _ring_counts(mask, f, r + 1, k).argmax(axis=1)  # all-zero row -> 0, ties -> lowest id
        new = np.zeros(n, mask.dtype)
        new[rest] = best[1:]
        out = np.where(f > 0, np.take(new, lab), out)
    return out


def remove_small(mask: np.ndarray, cls: int, min_area: int, n_classes: int = 4) -> np.ndarray:
    """Components of ``cls`` under ``min_area`` pixels take their ring's majority class."""
    lab, stats = _components(mask == cls, 8)
    return _relabel_by_boundary(mask, lab, stats, stats[:, cv2.CC_STAT_AREA] < min_area, n_classes)


def fill_holes(mask: np.ndarray, cls: int, max_area: Optional[int] = None) -> np.ndarray:
    """Holes of ``cls`` (4-connected, not touching the border, up to ``max_area``) become ``cls``."""
    out = mask.copy()
    lab, stats = _components(mask != cls, 4)
    n, area = len(stats), stats[:, cv2.CC_STAT_AREA]
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
    if not np.isfinite(min_width) or min_width < 0:
        raise ValueError(f"lake_shape min_width must be a finite number >= 0, got {min_width}")
    binary = mask == cls
    lab, stats = _components(binary, 8)
    n = len(stats)
    if n <= 1:
        return mask.copy()
    drop = stats[:, cv2.CC_STAT_AREA] < min_area
    if min_width:
        # thin <=> no pixel reaches half the width (2 * max inscribed distance < min_width)
        drop |= np.bincount(lab[_wide(binary, float(min_width))], minlength=n) == 0
    return _relabel_by_boundary(mask, lab, stats, drop, n_classes)


def _wide(binary: np.ndarray, min_width: float) -> np.ndarray:
    """Pixels whose Euclidean distance to the nearest non-class pixel (the tile's outside
    counts as non-class) is at least ``min_width / 2``.

    For widths up to 14 px this is an erosion by the disc of offsets closer than half the
    width (exact integer comparison 4 * (dy^2 + dx^2) < width^2, and ~50x cheaper than a
    distance transform); wider, the exact distance transform.
    """
    r = int(np.ceil(min_width / 2.0))
    if r <= 7:
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        disc = (4 * (dy * dy + dx * dx) < min_width * min_width).astype(np.uint8)
        return cv2.erode(binary.view(np.uint8), disc, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
    dist = cv2.distanceTransform(np.pad(binary.view(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    return (2.0 * dist.astype(np.float64) >= min_width) & binary


def debris_needs_glacier(mask: np.ndarray, debris: int = 2, glacier: int = 1, to: int = 0) -> np.ndarray:
    """Debris components touching no glacier pixel (8-connected) become ``to``."""
    out = mask.copy()
    lab, stats = _components(mask == debris, 8)
    n = len(stats)
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
        if r["rule"] == "lake_shape":
            width = float(r.get("min_width", 0.0))
            if not np.isfinite(width) or width < 0:
                raise ValueError(f"post-processing rule #{i} (lake_shape) needs a finite min_width >= 0, got {width}")
        out.append(dict(r))
    return out


def apply(mask: np.ndarray, rules: Sequence[Mapping[str, Any]], n_classes: int = 4) -> np.ndarray:
    """Apply enabled rules in order; a rule with ``enabled: false`` is skipped."""
    out = np.ascontiguousarray(mask, dtype=np.uint8)
    if out.size == 0:  # OpenCV's labelling does not take an empty image
        return out
    for r in rules or []:
        if r.get("enabled", True):
            out = RULES[r["rule"]](out, r, n_classes)
    return out
