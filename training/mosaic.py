"""Where tiles lay in their scene, when their names do not say: from the files'
georeferencing, or by putting the mosaic back together from edge continuity.

Tiles cut from one scene continue each other across their borders: the last column of a
tile and the first column of its right-hand neighbour differ about as little as two
adjacent columns inside a tile, while two tiles that never touched differ much more. Every
ordered pair of tiles is scored on both ways of touching (A left of B, A above B) by the
ratio of the mean absolute step across the seam to the steps just inside each tile;
pairs that are each other's best match below a threshold are kept, and the kept pairs
are laid out on a grid from any tile outward (breadth first). Connected tiles get grid
positions ``(row, col)`` within their mosaic, counted from its top-left corner; a tile that
touches nothing stays alone.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

#: a seam this much less alike than adjacent lines inside the tiles is no seam
#: (true seams: 0.4-4 on the synthetic scenes, other pairs 20 and more)
MAX_RATIO = 6.0
#: adjacent lines inside a tile must be at least this alike (decorrelation at most this) for
#: its edge to be evidence: flat or pure-noise edges continue anything
MAX_INNER = 0.5
Pair = Tuple[str, str, str]  # (a, b, "right" | "below"): b lies right of / below a


@dataclass
class Layout:
    """Tile -> (mosaic id, row, col), and the neighbour pairs the layout was built from."""
    positions: Dict[str, Tuple[int, int, int]]
    pairs: List[Pair] = field(default_factory=list)
    method: str = "edges"

    def grid(self) -> Dict[str, Tuple[int, int]]:
        """(row, col) with mosaics placed far apart, so no block spans two of them."""
        return {k: (m * 10_000 + r, c) for k, (m, r, c) in self.positions.items()}


def _standardise(images: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Bands as float32 with masked (all-zero) and invalid pixels as NaN, so they do not score."""
    out = {}
    for k, im in images.items():
        x = np.asarray(im, np.float32).copy()
        bad = ~np.isfinite(x).all(0) | (x == 0).all(0)
        x[:, bad] = np.nan
        out[k] = x
    return out


def _decorrelation(a: np.ndarray, b: np.ndarray) -> float:
    """1 - the mean over bands of the correlation of two (C, N) edge profiles (pixels valid
    in both): the profiles' shape, whatever each tile's calibration gain and offset. Bands
    flat along either profile say nothing and are left out; inf when none is left."""
    ok = np.isfinite(a).all(0) & np.isfinite(b).all(0)
    if ok.sum() < 16:
        return np.inf
    a, b = a[:, ok], b[:, ok]
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    live = den > 1e-6 * max(float(den.max()), 1e-30)
    if not live.any():
        return np.inf
    return float(1.0 - ((a * b).sum(1)[live] / den[live]).mean())


def _ratio(a: np.ndarray, b: np.ndarray, way: str) -> float:
    """How much less alike the two sides of the seam are than adjacent lines inside the tiles,
    for b right of (or below) a."""
    if way == "right":
        if a.shape[1] != b.shape[1]:
            return np.inf
        seam = _decorrelation(a[:, :, -1], b[:, :, 0])
        inner = 0.5 * (_decorrelation(a[:, :, -2], a[:, :, -1]) + _decorrelation(b[:, :, 0], b[:, :, 1]))
    else:
        if a.shape[2] != b.shape[2]:
            return np.inf
        seam = _decorrelation(a[:, -1], b[:, 0])
        inner = 0.5 * (_decorrelation(a[:, -2], a[:, -1]) + _decorrelation(b[:, 0], b[:, 1]))
    if not inner <= MAX_INNER:  # also NaN and inf: no texture that continues, no evidence
        return np.inf
    return seam / max(inner, 1e-4)


def neighbour_pairs(images: Mapping[str, np.ndarray], max_ratio: float = MAX_RATIO) -> List[Pair]:
    """Mutual best matches among all ordered pairs and both ways of touching."""
    x = _standardise(images)
    keys = sorted(x)
    pairs = []
    for way in ("right", "below"):
        score = np.full((len(keys), len(keys)), np.inf)
        for i, a in enumerate(keys):
            for j, b in enumerate(keys):
                if i != j:
                    score[i, j] = _ratio(x[a], x[b], way)
        score = np.nan_to_num(score, nan=np.inf)  # an edge that cannot be scored matches nothing
        for i, a in enumerate(keys):
            j = int(np.argmin(score[i]))
            if score[i, j] <= max_ratio and int(np.argmin(score[:, j])) == i:
                pairs.append((a, keys[j], way))
    return pairs


def layout(keys: Sequence[str], pairs: Sequence[Pair]) -> Layout:
    """Grid positions from neighbour pairs (breadth first from the first tile of each mosaic);
    a pair that contradicts a placed position is dropped."""
    nbrs: Dict[str, List[Tuple[str, int, int]]] = {k: [] for k in keys}
    for a, b, way in pairs:
        dy, dx = (0, 1) if way == "right" else (1, 0)
        nbrs[a].append((b, dy, dx))
        nbrs[b].append((a, -dy, -dx))
    pos: Dict[str, Tuple[int, int, int]] = {}
    used: List[Pair] = []
    taken = set()
    for start in sorted(keys):
        if start in pos:
            continue
        mosaic = len({p[0] for p in pos.values()})
        pos[start] = (mosaic, 0, 0)
        taken.add((mosaic, 0, 0))
        todo = deque([start])
        while todo:
            a = todo.popleft()
            _, r, c = pos[a]
            for b, dy, dx in nbrs[a]:
                want = (mosaic, r + dy, c + dx)
                if b not in pos and want not in taken:
                    pos[b] = want
                    taken.add(want)
                    todo.append(b)
    pos = _from_the_corner(pos)
    for a, b, way in pairs:
        dy, dx = (0, 1) if way == "right" else (1, 0)
        pa, pb = pos[a], pos[b]
        if pa[0] == pb[0] and (pb[1] - pa[1], pb[2] - pa[2]) == (dy, dx):
            used.append((a, b, way))
    return Layout(pos, used)


def _from_the_corner(pos: Dict[str, Tuple[int, int, int]]) -> Dict[str, Tuple[int, int, int]]:
    """Each mosaic shifted so that its top row and left column are 0, as in the scene (blocks
    of positions then fall where they would on the scene's own grid)."""
    r0: Dict[int, int] = {}
    c0: Dict[int, int] = {}
    for m, r, c in pos.values():
        r0[m], c0[m] = min(r0.get(m, r), r), min(c0.get(m, c), c)
    return {k: (m, r - r0[m], c - c0[m]) for k, (m, r, c) in pos.items()}


def from_edges(images: Mapping[str, np.ndarray], max_ratio: float = MAX_RATIO) -> Layout:
    return layout(list(images), neighbour_pairs(images, max_ratio))


def from_georeferencing(transforms: Mapping[str, Optional[Tuple[float, float, float, float, int, int]]]
                        ) -> Optional[Layout]:
    """Grid positions from each tile's (x0, y0, pixel width, pixel height, width, height);
    None unless every tile is georeferenced."""
    if not transforms or any(t is None for t in transforms.values()):
        return None
    pos = {}
    for k, (x0, y0, px, py, w, h) in transforms.items():
        pos[k] = (0, int(round(-y0 / (abs(py) * h))), int(round(x0 / (abs(px) * w))))
    r0 = min(p[1] for p in pos.values())
    c0 = min(p[2] for p in pos.values())
    return Layout({k: (0, r - r0, c - c0) for k, (_, r, c) in pos.items()}, method="georeferencing")


def pair_set(grid: Mapping[str, Tuple[int, int]]) -> set:
    """Unordered neighbour pairs (4-neighbourhood) of grid positions."""
    by_pos = {tuple(v): k for k, v in grid.items()}
    out = set()
    for k, (r, c) in grid.items():
        for dr, dc in ((0, 1), (1, 0)):
            other = by_pos.get((r + dr, c + dc))
            if other is not None:
                out.add(frozenset((k, other)))
    return out


def score_pairs(found: Layout, truth: Mapping[str, Tuple[int, int]]) -> Dict[str, float]:
    """Recall and precision of the neighbour pairs of ``found`` against the true grid."""
    want, got = pair_set(truth), pair_set(found.grid())
    hit = len(want & got)
    return {"true_pairs": len(want), "found_pairs": len(got), "correct": hit,
            "recall": hit / len(want) if want else 1.0, "precision": hit / len(got) if got else 1.0}
