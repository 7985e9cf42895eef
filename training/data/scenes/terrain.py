"""Terrain of a synthetic scene: an elevation model with ridges and carved valleys, its flow
routing (D8, on a coarse grid), hill shading and cast shadows under the region's sun.

All fields are float32 arrays of the scene's (H, W); ``px`` scales feature sizes with the
tile size (1.0 for 512-pixel tiles of 30 m pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

PIXEL_M = 30.0   # Landsat's reflective bands: the pixel of a 512-pixel tile (px = 1)
COARSE = 8       # flow routing runs on a grid this much coarser (240 m cells) at px = 1


def pixel_m(px: float) -> float:
    """Ground size of one pixel: a smaller tile covers the same ground with bigger pixels, so a
    64-pixel test tile is a 512-pixel scene seen at 240 m and not a 2 km corner of one."""
    return PIXEL_M / px


def coarse_factor(px: float) -> int:
    """Fine pixels per routing cell: the routing cell stays 240 m on the ground at every tile size."""
    return max(1, int(round(COARSE * px)))
# D8 neighbour offsets and their distances
_OFFS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
_DIST = np.array([math.hypot(dy, dx) for dy, dx in _OFFS], np.float32)


def noise(rng: np.random.Generator, shape: Tuple[int, int], scale: float, aniso: float = 1.0) -> np.ndarray:
    """Smooth value noise (standard normal at the grid points) with feature size ``scale`` px."""
    h, w = shape
    gh = max(2, int(math.ceil(h / max(scale, 1.0))) + 2)
    gw = max(2, int(math.ceil(w / max(scale * aniso, 1.0))) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def fractal(rng: np.random.Generator, shape, scales, weights) -> np.ndarray:
    """Sum of noises at several scales, rescaled to [0, 1]."""
    out = np.zeros(shape, np.float32)
    for s, wgt in zip(scales, weights):
        out += wgt * noise(rng, shape, s)
    out -= out.min()
    out /= max(float(out.max()), 1e-6)
    return out


@dataclass
class Terrain:
    elev: np.ndarray        # metres
    slope: np.ndarray       # radians
    shade: np.ndarray       # cos of the solar incidence angle over the flat-ground one, clipped >= 0
    shadow: np.ndarray      # bool: cast shadow (direct sun blocked by terrain)
    coarse_elev: np.ndarray
    receiver: np.ndarray    # coarse: flat index of each cell's D8 receiver (itself at a pit or the edge)
    order: np.ndarray       # coarse: cells from highest to lowest
    area: np.ndarray        # coarse: cells draining through each cell (itself included)
    coarse: int = COARSE    # fine pixels per coarse cell
    pixel_m: float = PIXEL_M  # ground size of a fine pixel


def d8_receivers(z: np.ndarray) -> np.ndarray:
    """Flat index of the steepest-descent neighbour of every cell (itself at a pit)."""
    h, w = z.shape
    pad = np.pad(z, 1, mode="edge")
    best = np.zeros((h, w), np.float32)
    rec = np.arange(h * w).reshape(h, w)
    iy, ix = np.mgrid[0:h, 0:w]
    for k, (dy, dx) in enumerate(_OFFS):
        drop = (z - pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]) / _DIST[k]
        ny, nx = np.clip(iy + dy, 0, h - 1), np.clip(ix + dx, 0, w - 1)
        take = drop > best
        best[take] = drop[take]
        rec[take] = (ny * w + nx)[take]
    return rec.reshape(-1)


def accumulate(values: np.ndarray, receiver: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Downstream sums: each cell's value plus everything that drains through it."""
    acc = values.reshape(-1).astype(np.float64).copy()
    for i in order:  # from high to low: a cell is complete when it is reached
        r = receiver[i]
        if r != i:
            acc[r] += acc[i]
    return acc.reshape(values.shape)


def _elevation(rng, shape, px, relief: float, base: float, roughness: float) -> np.ndarray:
    """Massifs (broad noise) carrying ridged noise: crests and spurs a few kilometres apart."""
    massif = fractal(rng, shape, [520 * px, 220 * px, 90 * px], [1.0, 0.45, 0.15])
    ridged = np.zeros(shape, np.float32)
    for s, wgt in zip((220, 110, 55), (1.0, 0.4, 0.12 * roughness)):
        ridged += wgt * (1.0 - np.abs(noise(rng, shape, s * px))) ** 2
    ridged /= max(float(ridged.max()), 1e-6)
    detail = 0.012 * roughness * noise(rng, shape, 10 * px)
    return (base + relief * (0.5 * massif + 0.5 * ridged + detail)).astype(np.float32)


def _carve(z: np.ndarray, carve_m: float, coarse: int):
    """Valleys carved along the drainage (on the coarse grid, upsampled): broad troughs,
    deeper where more area drains through, as glaciers and rivers cut them."""
    h, w = z.shape
    zc = cv2.resize(z, (max(2, w // coarse), max(2, h // coarse)), interpolation=cv2.INTER_AREA)
    rec = d8_receivers(zc)
    order = np.argsort(-zc.reshape(-1), kind="stable")
    area = accumulate(np.ones_like(zc), rec, order)
    cut = np.sqrt(area / max(float(area.max()), 1.0)).astype(np.float32)
    cut = carve_m * cv2.GaussianBlur(cut, (0, 0), 1.6) / max(float(cv2.GaussianBlur(cut, (0, 0), 1.6).max()), 1e-6)
    zc = zc - cut
    z = z - cv2.resize(cut, (w, h), interpolation=cv2.INTER_CUBIC)
    rec = d8_receivers(zc)
    order = np.argsort(-zc.reshape(-1), kind="stable")
    return z.astype(np.float32), zc.astype(np.float32), rec, order, accumulate(np.ones_like(zc), rec, order)


def _cast_shadow(z: np.ndarray, az: float, el: float, steps: int, pixel: float) -> np.ndarray:
    """True where a point towards the sun (within ``steps`` coarse cells) rises above the
    line of sight to it (a horizon test on a 4x coarser grid)."""
    h, w = z.shape
    f = 4
    zc = cv2.resize(z, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    dy, dx = -math.cos(az), math.sin(az)  # towards the sun: azimuth clockwise from north, rows grow south
    tan_el = math.tan(el)
    shade = np.zeros(zc.shape, bool)
    for t in range(1, steps + 1):
        sy, sx = int(round(dy * t)), int(round(dx * t))
        moved = np.roll(np.roll(zc, -sy, axis=0), -sx, axis=1)
        shade |= moved > zc + tan_el * t * f * pixel
    return cv2.resize(shade.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def make_terrain(rng: np.random.Generator, shape: Tuple[int, int], px: float, region, cast_shadows: bool = True,
                 ) -> Terrain:
    z = _elevation(rng, shape, px, region.relief_m, region.base_elevation_m, region.roughness)
    coarse, pixel = coarse_factor(px), pixel_m(px)
    z, zc, rec, order, area = _carve(z, region.carve_m, coarse)
    gy, gx = np.gradient(z / pixel)
    slope = np.arctan(np.hypot(gx, gy)).astype(np.float32)
    aspect = np.arctan2(-gx, gy)
    az, el = math.radians(region.sun_azimuth), math.radians(region.sun_elevation)
    cos_i = np.sin(el) * np.cos(slope) + np.cos(el) * np.sin(slope) * np.cos(az - aspect)
    shade = np.clip(cos_i / max(math.sin(el), 1e-3), 0.0, 2.5).astype(np.float32)
    shadow = _cast_shadow(z, az, el, int(60 * px) + 5, pixel) if cast_shadows else np.zeros(shape, bool)
    return Terrain(z, slope, shade, shadow, zc, rec, order, area.astype(np.float32), coarse, pixel)
