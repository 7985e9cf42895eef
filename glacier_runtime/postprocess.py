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
``glacier_submit/presets/``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import cv2
import numpy as np

_K8 = np.ones((3, 3), np.uint8)


def _components(binary: np.ndarray, connectivity: int = 8):
    n, lab, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=connectivity)
    return n, lab, stats[:, cv2.CC_STAT_AREA]


def _relabel_by_boundary(mask: np.ndarray, comp: np.ndarray, exclude: int, n_classes: int) -> None:
    """Set component pixels to the most common class on its 8-connected outer ring."""
    ys, xs = np.nonzero(comp)
    y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, mask.shape[0])
    x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, mask.shape[1])
    sub = comp[y0:y1, x0:x1]
    ring = cv2.dilate(sub.astype(np.uint8), _K8).astype(bool) & ~sub
    vals = mask[y0:y1, x0:x1][ring]
    vals = vals[vals != exclude]
    new = int(np.bincount(vals, minlength=n_classes).argmax()) if vals.size else 0
    mask[y0:y1, x0:x1][sub] = new


def remove_small(mask: np.ndarray, cls: int, min_area: int, n_classes: int = 4) -> np.ndarray:
    out = mask.copy()
    n, lab, area = _components(mask == cls, 8)
    for i in range(1, n):
        if area[i] < min_area:
            _relabel_by_boundary(out, lab == i, cls, n_classes)
    return out


def fill_holes(mask: np.ndarray, cls: int, max_area: Optional[int] = None) -> np.ndarray:
    out = mask.copy()
    n, lab, area = _components(mask != cls, 4)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
    for i in range(1, n):
        if i in border:
            continue
        if max_area is None or area[i] <= max_area:
            out[lab == i] = cls
    return out


def lake_shape(mask: np.ndarray, cls: int = 3, min_area: int = 0, min_width: float = 0.0,
               n_classes: int = 4) -> np.ndarray:
    out = mask.copy()
    n, lab, area = _components(mask == cls, 8)
    if n <= 1:
        return out
    dist = cv2.distanceTransform(np.pad((mask == cls).astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1] if min_width else None
    for i in range(1, n):
        comp = lab == i
        thin = dist is not None and 2.0 * float(dist[comp].max()) < min_width
        if area[i] < min_area or thin:
            _relabel_by_boundary(out, comp, cls, n_classes)
    return out


def debris_needs_glacier(mask: np.ndarray, debris: int = 2, glacier: int = 1, to: int = 0) -> np.ndarray:
    out = mask.copy()
    n, lab, _ = _components(mask == debris, 8)
    if n <= 1:
        return out
    near = cv2.dilate((mask == glacier).astype(np.uint8), _K8).astype(bool)
    touching = np.unique(lab[near & (lab > 0)])
    keep = np.zeros(n, bool)
    keep[touching] = True
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
