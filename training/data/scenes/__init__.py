"""Synthetic Himalayan scenes as hard as the real task, through named physical effects
(training/data/scenes/regions.py): terrain-shaped glaciers, labels made as real labels are,
mixed pixels, shading and cast shadows, cloud, snow, lake variants, weak debris thermal
contrast, calibration and haze, Landsat-8 DNs. ``generate_scene`` renders a whole scene;
``training/data/synth.py`` cuts it into the competition's tiles."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from training.data.scenes.ice import make_ice
from training.data.scenes.labels import make_labels
from training.data.scenes.regions import ALL_ON, REGIONS, TRAIN_REGION, UNSEEN_REGION, Effects, Region
from training.data.scenes.render import (DEBRIS, FIRN, FROZEN, ICE, NIR, ROCK, SNOW, TURBID, VEG, WATER, add_clouds,
                                         dirty_ice, illumination, reflectance, sensor, temperature)
from training.data.scenes.terrain import make_terrain, noise

__all__ = ["ALL_ON", "REGIONS", "TRAIN_REGION", "UNSEEN_REGION", "Effects", "Region", "generate_scene"]


def _materials(rng, t, ice, px: float, region, effects) -> np.ndarray:
    mat = np.full(t.elev.shape, ROCK, np.uint8)
    low = t.elev < np.quantile(t.elev, 0.12)
    mat[low & (noise(rng, t.elev.shape, 30 * px) > 0.0)] = VEG
    # seasonal snow lies high, on gentle ground, in wind-blown patches: next to the glaciers it
    # looks like their accumulation areas
    gentle = np.clip(1.0 - np.degrees(t.slope) / 45.0, 0.0, 1.0)
    snow_field = ((t.elev - ice.ela) / 400.0 + 0.8 * gentle + 0.5 * noise(rng, t.elev.shape, 25 * px)
                  + 0.2 * noise(rng, t.elev.shape, 6 * px))
    if effects.snow and region.seasonal_snow > 0:
        free = ~(ice.glacier | ice.debris | ice.lakes)
        thr = np.quantile(snow_field[free], 1.0 - region.seasonal_snow) if free.any() else np.inf
        mat[free & (snow_field > thr)] = SNOW
    mat[ice.debris] = DEBRIS
    if effects.snow and region.snow_on_debris > 0 and ice.debris.any():
        thr = np.quantile(snow_field[ice.debris], 1.0 - region.snow_on_debris)
        mat[ice.debris & (snow_field > thr)] = SNOW
    mat[ice.glacier] = ICE
    mat[ice.firn] = FIRN
    mat[ice.lakes] = WATER
    if effects.lake_variants:
        mat[ice.turbid] = TURBID
        mat[ice.frozen] = FROZEN
    return mat


def _gaps(rng, bands: np.ndarray, labels: np.ndarray, rows: int, cols: int, tile: Tuple[int, int]) -> None:
    """Masked scene edges (zero in every band), labelled background as in the real tiles."""
    th, tw = tile
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.1:
                gw = int(rng.uniform(0.05, 0.2) * tw)
                x0 = c * tw + (0 if rng.random() < 0.5 else tw - gw)
                bands[:, r * th:(r + 1) * th, x0:x0 + gw] = 0.0
                labels[r * th:(r + 1) * th, x0:x0 + gw] = 0


def generate_scene(rows: int, cols: int, size: Tuple[int, int], seed: int, region: Region = TRAIN_REGION,
                   return_extras: bool = False, effects: Effects = ALL_ON):
    """(bands float32 (5, H, W) Landsat-8 DNs, labels uint8 (H, W) class ids) of a whole
    scene of ``rows x cols`` tiles; with ``return_extras`` also {"elevation", "slope", "nir",
    "truth"} (the fake HKH channels; the truth the bands were rendered from)."""
    # one random stream per part: switching an effect off changes nothing else of the scene
    terrain_rng, ice_rng, mat_rng, refl_rng, cloud_rng, sensor_rng, label_rng, gap_rng, inventory_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(9))
    shape = (rows * size[0], cols * size[1])
    px = max(size) / 512.0
    t = make_terrain(terrain_rng, shape, px, region, cast_shadows=effects.cast_shadows)
    ice = make_ice(ice_rng, t, px, region, rows * cols, inventory_rng if effects.inventory_labels else None)
    truth = np.zeros(shape, np.uint8)
    truth[ice.glacier | ice.firn] = 1
    truth[ice.debris] = 2
    truth[ice.lakes] = 3
    mat = _materials(mat_rng, t, ice, px, region, effects)
    illum = illumination(t.shade, t.shadow, effects.topo_shading, effects.cast_shadows)
    refl = reflectance(refl_rng, mat, px, illum)
    dirty_ice(refl, mat, t.elev, ice.ela)
    temp = temperature(refl_rng, mat, t.elev, t.shade if effects.topo_shading else np.ones_like(t.shade), px, region,
                       effects)
    if effects.clouds:
        add_clouds(cloud_rng, refl, temp, px, region, tuple(size), rows, cols)
    bands = sensor(sensor_rng, refl, temp, px, region, effects, rows, cols, tuple(size))
    source = truth
    if ice.inventory is not None:  # the inventory's glacier and debris; lakes as the image shows them
        source = np.where(ice.lakes, 3, ice.inventory).astype(np.uint8)
    labels = make_labels(source, label_rng, px, region, effects)
    _gaps(gap_rng, bands, labels, rows, cols, size)
    if not return_extras:
        return bands, labels
    nir = np.clip(NIR[mat] * illum + sensor_rng.normal(0, 0.008, shape).astype(np.float32), 0, 1)
    return bands, labels, {"elevation": t.elev, "slope": np.degrees(t.slope).astype(np.float32),
                           "nir": nir.astype(np.float32), "truth": truth}
