"""Rebuilding a mosaic from edge continuity: every neighbour pair of tiles cut from one smooth
image is found and nothing else; georeferencing gives positions directly."""
import numpy as np

from tests.helpers import blobs
from training.mosaic import from_edges, from_georeferencing, pair_set, score_pairs


def _cut(img, rows, cols, t, rng):
    """Tiles of ``img`` in a shuffled naming, each with its own calibration gain and offset."""
    names = rng.permutation(rows * cols)
    tiles, truth = {}, {}
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        key = f"img{names[i]:03d}"
        tiles[key] = img[:, r * t:(r + 1) * t, c * t:(c + 1) * t] * rng.uniform(0.9, 1.1) + rng.uniform(-50, 50)
        truth[key] = (r, c)
    return tiles, truth


def _scene(rng, rows, cols, t):
    import cv2

    h, w = rows * t, cols * t
    base = [cv2.resize(rng.standard_normal((h // 16 + 2, w // 16 + 2)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC) for _ in range(5)]
    return (np.stack(base) * 1000 + 20000 + 50 * rng.standard_normal((5, h, w))).astype(np.float32)


def test_every_neighbour_pair_is_found_and_nothing_else():
    rng = np.random.default_rng(0)
    tiles, truth = _cut(_scene(rng, 4, 5, 48), 4, 5, 48, rng)
    lay = from_edges(tiles)
    s = score_pairs(lay, truth)
    assert s["true_pairs"] == 31 and s["recall"] == 1.0 and s["precision"] == 1.0
    assert len({p[0] for p in lay.positions.values()}) == 1  # one mosaic
    assert {k: v[1:] for k, v in lay.positions.items()} == truth  # counted from the top-left corner


def test_tiles_from_different_scenes_are_not_joined():
    rng = np.random.default_rng(1)
    a, _ = _cut(_scene(rng, 1, 2, 48), 1, 2, 48, rng)
    b, _ = _cut(_scene(rng, 1, 2, 48), 1, 2, 48, rng)
    tiles = {**{"a" + k: v for k, v in a.items()}, **{"b" + k: v for k, v in b.items()}}
    got = pair_set(from_edges(tiles).grid())
    assert all(len({k[0] for k in p}) == 1 for p in got)  # no pair across the two scenes
    masks = {k: (blobs(i, (48, 48)) > 0).astype(np.float32)[None].repeat(5, 0) for i, k in enumerate("wxyz")}
    assert pair_set(from_edges(masks).grid()) <= set()  # unrelated tiles: nothing joined


def test_georeferencing_positions():
    tf = {"a": (500000.0, 3100000.0, 30.0, -30.0, 512, 512), "b": (515360.0, 3100000.0, 30.0, -30.0, 512, 512),
          "c": (500000.0, 3084640.0, 30.0, -30.0, 512, 512)}
    lay = from_georeferencing(tf)
    assert {k: v[1:] for k, v in lay.positions.items()} == {"a": (0, 0), "b": (0, 1), "c": (1, 0)}
    assert from_georeferencing({**tf, "d": None}) is None
