"""What the sensor sees: materials -> top-of-atmosphere reflectance (B2, B3, B4, B6) and
brightness temperature (B10), with illumination, cast shadows, snow, clouds and their
shadows, haze and calibration, the point-spread function, noise, then Landsat-8 Collection-2
digital numbers stored as float32 (the real files' DN-like values, band means ~20,000).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import cv2
import numpy as np

from training.data.scenes.terrain import noise, pixel_m

#: material ids of the material map
ROCK, VEG, DEBRIS, ICE, FIRN, SNOW, WATER, TURBID, FROZEN = range(9)
#: TOA reflectance in B2, B3, B4, B6 (blue, green, red, SWIR-1)
SPECTRA = np.array([
    [0.150, 0.170, 0.190, 0.270],   # rock (mean; lithology varies around it)
    [0.060, 0.080, 0.070, 0.170],   # vegetation on valley floors
    [0.146, 0.166, 0.186, 0.262],   # debris on ice: the rock it came from, a shade darker
    [0.440, 0.410, 0.370, 0.045],   # bare glacier ice
    [0.720, 0.690, 0.650, 0.080],   # firn and snow on the accumulation area
    [0.720, 0.690, 0.650, 0.080],   # seasonal snow on rock and debris: the same as firn
    [0.075, 0.068, 0.048, 0.010],   # clear water
    [0.120, 0.140, 0.105, 0.016],   # turbid (sediment-laden) water
    [0.600, 0.580, 0.550, 0.070],   # frozen lake, snow-covered
], np.float32)
CLOUD = np.array([0.680, 0.670, 0.660, 0.420], np.float32)
HAZE_SHAPE = np.array([1.0, 0.7, 0.45, 0.08], np.float32)   # path radiance falls with wavelength
NIR = np.array([0.26, 0.30, 0.23, 0.36, 0.62, 0.60, 0.03, 0.06, 0.55], np.float32)  # for fake HKH only
#: Landsat-8 Collection-2 Level-1 scaling (reflectance = DN * M + A) and TIRS band 10 constants
REFL_MULT, REFL_ADD = 2.0e-5, -0.1
RAD_MULT, RAD_ADD, K1, K2 = 3.342e-4, 0.1, 774.8853, 1321.0789
DIFFUSE = 0.18                      # share of sky light, which reaches shadows too


def illumination(shade: np.ndarray, shadow: np.ndarray, topo: bool, cast: bool) -> np.ndarray:
    """Direct sun by slope and aspect plus diffuse sky light; a cast shadow gets sky light only."""
    direct = shade if topo else np.ones_like(shade)
    if cast:
        direct = np.where(shadow, 0.0, direct)
    return (DIFFUSE + (1.0 - DIFFUSE) * direct).astype(np.float32)


def reflectance(rng, mat: np.ndarray, px: float, illum: np.ndarray) -> np.ndarray:
    """(4, H, W) surface reflectance: the material spectra with lithology and texture."""
    geology = noise(rng, mat.shape, 60 * px)
    texture = noise(rng, mat.shape, 3 * px)
    out = SPECTRA[mat].transpose(2, 0, 1).copy()
    rocky = (mat == ROCK) | (mat == DEBRIS)
    out *= 1.0 + (0.22 * geology + 0.06 * texture) * rocky  # lithology: dark schist to bright granite
    icy = (mat == ICE)
    out[:3] *= 1.0 + 0.08 * texture * icy                    # crevasses, dirt bands
    return out * illum[None]


def dirty_ice(refl: np.ndarray, mat: np.ndarray, elev: np.ndarray, ela: float) -> None:
    """Bare ice darkens towards the terminus (dust, cryoconite, thin debris): at 600 m below
    the snow line its visible albedo is about half that of clean ice (in place)."""
    below = np.clip((ela - elev) / 600.0, 0.0, 1.0)
    dim = np.where(mat == ICE, 1.0 - 0.5 * below, 1.0).astype(np.float32)
    refl[:3] *= dim[None]


def temperature(rng, mat: np.ndarray, elev: np.ndarray, shade: np.ndarray, px: float, region, effects) -> np.ndarray:
    """B10 brightness temperature (K): lapse rate on land, sun-facing slopes warmer, ice and
    snow at most 273 K, debris cooler than bare rock by a little (thin debris over ice)."""
    land = 285.0 - 6.5 * (elev - 4000.0) / 1000.0 + 6.0 * (np.minimum(shade, 1.6) - 1.0)
    t = land.astype(np.float32)
    cool = region.debris_thermal_k if effects.weak_debris_thermal else 8.0
    t = np.where(mat == DEBRIS, t - cool, t)
    t = np.where(mat == VEG, t + 1.0, t)
    cold = np.isin(mat, (ICE, FIRN, SNOW, FROZEN))
    t = np.where(cold, np.minimum(271.5 + 1.0 * noise(rng, mat.shape, 20 * px), 273.0), t)
    t = np.where(np.isin(mat, (WATER, TURBID)), 277.0, t)
    return t + (region.thermal_offset_k if effects.calibration else 0.0)


def _per_tile(values: np.ndarray, tile: Tuple[int, int], shape: Tuple[int, ...]) -> np.ndarray:
    """A (rows, cols) array of per-tile values spread over the scene's pixels."""
    return np.kron(values, np.ones(tile, values.dtype))[:shape[0], :shape[1]]


def add_clouds(rng, refl: np.ndarray, temp: np.ndarray, px: float, region, tile: Tuple[int, int], rows: int,
               cols: int) -> None:
    """Cloud on a share of the tiles, and its shadow cast away from the sun (in place)."""
    shape = refl.shape[1:]
    field = (0.7 * noise(rng, shape, 70 * px) + 0.3 * noise(rng, shape, 20 * px))
    cover = _per_tile(rng.random((rows, cols)) < region.cloud_tiles, tile, shape)
    alpha = np.clip((field - 0.9) * 1.2, 0.0, 0.9) * cover
    el, az = math.radians(region.sun_elevation), math.radians(region.sun_azimuth)
    reach = 2500.0 / pixel_m(px) / math.tan(el)  # a cloud ~2.5 km above the ground, in pixels
    dy, dx = int(round(math.cos(az) * reach)), int(round(-math.sin(az) * reach))  # away from the sun
    shade = np.roll(np.roll(alpha, dy, axis=0), dx, axis=1)
    refl *= (1.0 - 0.75 * shade)[None]
    refl[:] = (1.0 - alpha)[None] * refl + alpha[None] * CLOUD[:, None, None]
    temp[:] = (1.0 - alpha) * temp + alpha * 250.0


def sensor(rng, refl: np.ndarray, temp: np.ndarray, px: float, region, effects, rows: int, cols: int,
           tile: Tuple[int, int]) -> np.ndarray:
    """Haze, calibration (per region, and a little per tile), PSF, noise -> (5, H, W) float32 DNs."""
    if effects.calibration:
        refl = refl * region.gain + region.offset + region.haze * HAZE_SHAPE[:, None, None]
        jitter = _per_tile(rng.uniform(0.95, 1.05, (rows, cols)), tile, refl.shape[1:])
        refl = refl * jitter[None].astype(np.float32)
    if effects.psf:
        refl = np.stack([cv2.GaussianBlur(b, (0, 0), 0.6 * px) for b in refl])
        temp = cv2.GaussianBlur(temp.astype(np.float32), (0, 0), 1.7 * px)  # TIRS: 100 m pixels
    refl = refl + rng.normal(0, 0.004 * region.noise, refl.shape).astype(np.float32)
    temp = temp + rng.normal(0, 0.35 * region.noise, temp.shape).astype(np.float32)
    dn = np.empty((5,) + refl.shape[1:], np.float32)
    dn[:4] = np.round((np.clip(refl, 0.0, 1.2) - REFL_ADD) / REFL_MULT)
    radiance = K1 / (np.exp(K2 / np.clip(temp, 180.0, 340.0)) - 1.0)
    dn[4] = np.round((radiance - RAD_ADD) / RAD_MULT)
    return dn


def to_reflectance(dn: np.ndarray) -> Dict[str, np.ndarray]:
    """The inverse of the DN scaling: reflectance (4, H, W) and brightness temperature (H, W)."""
    refl = dn[:4] * REFL_MULT + REFL_ADD
    radiance = dn[4] * RAD_MULT + RAD_ADD
    return {"reflectance": refl, "temperature": K2 / np.log(K1 / np.maximum(radiance, 1e-6) + 1.0)}
