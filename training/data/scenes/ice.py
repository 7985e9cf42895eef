"""Glaciers shaped by the terrain: ice gathers above the snow line (the equilibrium-line
altitude) and flows down the valleys as dendritic tongues until ablation has eaten the flux;
debris covers the lower tongues; lakes form at termini and as ponds on the debris.

The mass balance ``b(z) = clip(gradient * (z - ELA))`` is routed downstream along the
terrain's D8 drainage on the coarse grid: a cell carries ice where the flux from upstream
is still positive. Steep rock walls above the line stay bare.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

from training.data.scenes.terrain import Terrain, accumulate, noise


@dataclass
class Ice:
    glacier: np.ndarray     # bool: clean ice, firn and snow-covered accumulation area (labelled glacier)
    debris: np.ndarray      # bool: debris-covered ice (labelled debris)
    lakes: np.ndarray       # bool: glacial lakes (proglacial and supraglacial)
    frozen: np.ndarray      # bool: lakes with an ice/snow cover (look like snow)
    turbid: np.ndarray      # bool: lakes with suspended sediment (brighter, greener)
    firn: np.ndarray        # bool: the accumulation area (snow-covered ice)
    ela: float              # the snow line found for the region's glacier share (m)
    inventory: Optional[np.ndarray] = None  # uint8 0/1/2: the inventory's glacier and debris (labels' source)


def _flux(t: Terrain, region, ela: float) -> np.ndarray:
    """Routed ice flux on the coarse grid (relative units): the mass balance summed down the
    drainage; snow falling on walls steeper than ``max_ice_slope`` avalanches into the
    basin below (it counts, but the wall itself holds no ice)."""
    zc = t.coarse_elev
    b = np.clip(region.balance_gradient * (zc - ela), -region.max_ablation, region.max_accumulation)
    return accumulate(b.astype(np.float32), t.receiver, t.order).astype(np.float32)


def _ice_cells(t: Terrain, region, ela: float, flux: np.ndarray) -> np.ndarray:
    """Coarse cells that hold ice: valley cells (enough area drains through them) with ice
    flux still positive, and gentle cells above the snow line."""
    gy, gx = np.gradient(t.coarse_elev / (t.pixel_m * t.coarse))
    gentle = np.degrees(np.arctan(np.hypot(gx, gy))) < region.max_ice_slope
    valley = t.area >= region.min_basin_cells
    return (flux > 0) & (valley | ((t.coarse_elev > ela) & gentle))


def _outline(flux: np.ndarray, cells: np.ndarray, shape: Tuple[int, int], margin: np.ndarray, coarse: int,
             ) -> np.ndarray:
    """Fine-grid glacier mask: every ice cell painted as a disc whose radius grows with the
    flux through it (wide trunks, narrow tributaries), with a ragged margin."""
    h, w = shape
    f = min(2, coarse)  # paint at half resolution (where a cell is 2 pixels or more), then upsample
    radius = np.where(cells, np.clip(0.55 + 0.28 * np.log1p(np.maximum(flux, 0.0)), 0.55, 2.6), 0.0)
    radius = cv2.resize(radius.astype(np.float32), (w // f, h // f), interpolation=cv2.INTER_NEAREST)
    scale = coarse / f
    paint = np.zeros(radius.shape, np.float32)
    for r in (0.55, 0.9, 1.3, 1.8, 2.3):  # radius classes in coarse cells
        core = (radius >= r).astype(np.uint8)
        if core.any():
            k = max(1, int(round(r * scale)))
            disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
            paint = np.maximum(paint, cv2.dilate(core, disc).astype(np.float32))
    fine = cv2.resize(cv2.GaussianBlur(paint, (0, 0), 1.5), (w, h), interpolation=cv2.INTER_LINEAR)
    return fine + margin > 0.5


def _solve_ela(terrain: Terrain, region, margin: np.ndarray, steep: np.ndarray):
    """The snow line that gives the region's glacier share (bisection on the ELA): the
    region says how much of the scene is ice, the terrain says where it lies. ``make_ice``
    solves it on the inventory's definition (headwalls included), the share labels show."""
    zc = terrain.coarse_elev
    lo, hi = float(np.quantile(zc, 0.02)), float(np.quantile(zc, 0.999))
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        share = float(_glacier_at(terrain, region, mid, margin, steep)[1].mean())
        lo, hi = (mid, hi) if share > region.glacier_share else (lo, mid)
    ela = 0.5 * (lo + hi)
    flux, glacier = _glacier_at(terrain, region, ela, margin, steep)
    return ela, flux, glacier


def _glacier_at(terrain: Terrain, region, ela: float, margin: np.ndarray, steep: np.ndarray):
    """(routed flux, fine glacier mask) of the terrain's ice with the snow line at ``ela``."""
    flux = _flux(terrain, region, ela)
    cells = _ice_cells(terrain, region, ela, flux)
    return flux, _outline(flux, cells, terrain.elev.shape, margin, terrain.coarse) & ~steep


def _inventory(rng, terrain: Terrain, region, ela_inv: float, glacier: np.ndarray, px: float) -> np.ndarray:
    """The glacier inventory the labels are taken from, mapped on other imagery years
    earlier: glaciers were larger then (its snow line ``ela_inv`` is
    ``inventory_ela_shift_m`` below the image's, so the tongues reached further), basins
    are drawn up to the ridge (steep snow-covered headwalls included, as inventories do:
    ``glacier``), debris was mapped by its own analyst, and the polygons are generalised
    (concavities and nunataks under about 100 m smoothed away)."""
    debris = _debris(glacier, terrain, region, ela_inv, px, rng)
    out = np.zeros(glacier.shape, np.uint8)
    out[glacier] = 1
    out[debris] = 2
    sigma = max(0.5, 1.5 * px)  # generalisation at the inventory's map scale
    votes = np.stack([cv2.GaussianBlur((out == c).astype(np.float32), (0, 0), sigma) for c in range(3)])
    return votes.argmax(0).astype(np.uint8)


def _debris(glacier: np.ndarray, terrain: Terrain, region, ela: float, px: float, rng) -> np.ndarray:
    """The lower tongues: ice below the snow line, most of it towards the termini, with
    patchy margins and medial stripes from noise."""
    z = terrain.elev
    below = (ela - z) / max(region.debris_depth_m, 1.0)
    field = below + 0.25 * noise(rng, z.shape, 14 * px, aniso=3.0) + 0.1 * noise(rng, z.shape, 4 * px)
    tongue = glacier & (below > 0.05)
    if not tongue.any() or region.debris_fraction <= 0:
        return np.zeros(z.shape, bool)
    want = min(region.debris_fraction * glacier.sum() / tongue.sum(), 0.95)  # of the tongues
    thr = np.quantile(field[tongue], 1.0 - want)
    deb = tongue & (field > thr)
    return _open(deb, px)


def _termini(flux: np.ndarray, receiver: np.ndarray) -> List[int]:
    """Coarse cells where the ice ends: positive flux draining into a cell with none."""
    f = flux.reshape(-1)
    return [int(i) for i in np.nonzero(f > 0)[0] if f[receiver[i]] <= 0 and receiver[i] != i]


def _open(mask: np.ndarray, px: float) -> np.ndarray:
    """Morphological opening that removes specks of under ~90 m (3 pixels at px = 1); an odd
    kernel, since OpenCV's opening with an even one is not contained in the mask."""
    k = max(1, int(round(3 * px))) | 1
    if k < 3:
        return mask
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((k, k), np.uint8)).astype(bool)


def _place_lakes(rng, shape, px, region, flux, receiver, glacier, debris, n_tiles: int, coarse: int) -> np.ndarray:
    h, w = shape
    wc = flux.shape[1]
    lakes = np.zeros(shape, np.uint8)
    ends = _termini(flux, receiver)
    rng.shuffle(ends)
    n_pro = rng.poisson(region.proglacial_lakes_per_tile * n_tiles)
    for i in ends[:n_pro]:  # proglacial: just beyond a terminus, dammed by its moraine
        cy, cx = (i // wc) * coarse + coarse // 2, (i % wc) * coarse + coarse // 2
        a = max(2, int(rng.uniform(5, 14) * px))
        cv2.ellipse(lakes, (int(cx), int(cy)), (a, max(2, int(a * rng.uniform(0.5, 0.9)))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
    ys, xs = np.nonzero(debris)
    for _ in range(rng.poisson(region.ponds_per_tile * n_tiles) if ys.size else 0):  # supraglacial ponds
        j = rng.integers(ys.size)
        r = max(1, int(rng.uniform(2.0, 5.0) * px))
        cv2.circle(lakes, (int(xs[j]), int(ys[j])), r, 1, -1)
    return lakes.astype(bool) & ~(glacier & ~debris)  # never on clean ice


def make_ice(rng: np.random.Generator, terrain: Terrain, px: float, region, n_tiles: int,
             inventory_rng: Optional[np.random.Generator] = None) -> Ice:
    """The scene's ice as the image shows it; with ``inventory_rng`` also the inventory the
    labels are drawn from (`_inventory`)."""
    shape = terrain.elev.shape
    margin = 0.2 * noise(rng, shape, 8 * px) + 0.08 * noise(rng, shape, 2 * px)
    steep = np.degrees(terrain.slope) > region.max_ice_slope + 25
    # the region's glacier share is the labelled share (the inventory's, headwalls
    # included); the image's snow line lies higher. Solved the same way whether or not the
    # labels are taken from the inventory, so that ablating it leaves the image unchanged.
    ela_inv, _, inventory_glacier = _solve_ela(terrain, region, margin, np.zeros(shape, bool))
    ela = ela_inv + region.inventory_ela_shift_m
    flux, glacier = _glacier_at(terrain, region, ela, margin, steep)
    glacier = _open(glacier, px)
    debris = _debris(glacier, terrain, region, ela, px, rng)
    lakes = _place_lakes(rng, shape, px, region, flux, terrain.receiver, glacier, debris, n_tiles, terrain.coarse)
    n, comp = cv2.connectedComponents(lakes.astype(np.uint8))
    kind = rng.random(n)
    frozen = lakes & (kind[comp] < region.frozen_lake_share)
    turbid = lakes & ~frozen & (kind[comp] > 1.0 - region.turbid_lake_share)
    firn = glacier & ~debris & (terrain.elev > ela)
    inventory = None
    if inventory_rng is not None:
        inventory = _inventory(inventory_rng, terrain, region, ela_inv, inventory_glacier, px)
    return Ice(glacier & ~debris & ~lakes, debris & ~lakes, lakes, frozen, turbid, firn & ~lakes, ela, inventory)
