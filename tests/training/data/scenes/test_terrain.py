"""Terrain: D8 drainage and downstream sums against naive loops; cast shadows behind a wall."""
import math

import numpy as np

from training.data.scenes.terrain import accumulate, d8_receivers, make_terrain
from training.data.scenes.regions import TRAIN_REGION


def _naive_receivers(z):
    h, w = z.shape
    out = np.arange(h * w)
    for y in range(h):
        for x in range(w):
            best = 0.0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (dy, dx) == (0, 0):
                        continue
                    ny, nx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                    drop = (z[y, x] - z[ny, nx]) / math.hypot(dy, dx)
                    if drop > best:
                        best, out[y * w + x] = drop, ny * w + nx
    return out


def test_d8_receivers_and_accumulation_match_naive_loops():
    rng = np.random.default_rng(0)
    z = rng.random((9, 11)).astype(np.float32)
    rec = d8_receivers(z)
    assert np.array_equal(rec, _naive_receivers(z))
    order = np.argsort(-z.reshape(-1), kind="stable")
    vals = rng.random(z.shape).astype(np.float32)
    acc = accumulate(vals, rec, order).reshape(-1)
    want = np.zeros(z.size)
    for i in range(z.size):  # every cell adds its value to each cell on its path down
        j, seen = i, set()
        while j not in seen:
            want[j] += vals.reshape(-1)[i]
            seen.add(j)
            if rec[j] == j:
                break
            j = rec[j]
    assert np.allclose(acc, want)


def test_cast_shadow_lies_behind_a_wall_away_from_the_sun():
    """A 300 m wall across a flat plain, the sun due south at 45 degrees: the shadow covers the
    plain north of the wall for about 300 m (10 px) and nothing south of it."""
    from dataclasses import replace

    from training.data.scenes.terrain import _cast_shadow

    z = np.zeros((200, 200), np.float32)
    z[100:104, :] = 300.0
    shadow = _cast_shadow(z, math.radians(180.0), math.radians(45.0), steps=20, pixel=30.0)
    col = shadow[:, 100]
    assert not col[110:].any()                      # south of the wall: sunlit
    assert col[92:100].all() and not col[:85].any()  # north: about 10 px of shadow
    t = make_terrain(np.random.default_rng(0), (128, 128), 0.25, replace(TRAIN_REGION), cast_shadows=False)
    assert not t.shadow.any() and t.elev.dtype == np.float32 and t.area.shape == t.coarse_elev.shape
