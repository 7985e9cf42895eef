"""Synthetic Himalayan scenes in the exact competition layout: the embedded benchmark.

What makes it a fair stand-in rather than a toy:

* debris-covered ice has the spectrum of bare rock and of the lateral moraines beside it;
  it differs only by shape and position (the lower, connected tongue of a glacier body),
  a speckled texture (ponds, ice cliffs) and a weak, blurred thermal deficit;
* clean ice is confusable with seasonal snow patches on rock (near-identical spectra:
  snow is told apart by shape and context, patchy on rock rather than a connected body)
  and with thin cloud;
* lakes are small dark water bodies near glacier termini, confusable with terrain shadow
  (shadowed ice and rock are dark with low SWIR too);
* bands carry noise, the odd column striping and masked (zero) gaps; thermal is blurred
  like the 100 m TIRS band; every tile has its own calibration and illumination (gain
  +-15 %, thermal offset +-2 K), so absolute per-pixel thresholds do not transfer;
* the "unseen region" split shifts illumination (sun azimuth/elevation), elevation and
  temperature, gain, and the class mix.

Scenes are generated whole and cut into row_col tiles, so neighbouring tiles continue
each other (which is why folds group tiles spatially).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from glacier_runtime.atomic import atomic_write_with
from glacier_runtime.classes import CLASS_VALUES
from glacier_runtime.tiles import BAND_FOLDERS

TRAIN_NAMES = ("B2_B2_masked_{id}.tif", "B3_B3_masked_{id}.tif", "B4_B4_masked_{id}.tif",
               "B6_B6_masked_{id}.tif", "B10_B10_masked_{id}.tif")
TRAIN_LABEL = "Y_output_resized_{id}.tif"


@dataclass
class Region:
    sun_azimuth: float = 135.0     # degrees
    sun_elevation: float = 45.0    # degrees
    elevation_offset: float = 0.0  # metres
    gain: float = 1.0              # multiplicative reflectance gain
    body_share: float = 0.30       # glacier body (clean + debris) share of the scene
    debris_share: float = 0.05     # debris share of the scene
    snow_share: float = 0.05
    cloud_tiles: float = 0.2       # share of tiles with cloud
    lakes_per_tile: float = 1.2
    noise: float = 1.0


TRAIN_REGION = Region()
UNSEEN_REGION = Region(sun_azimuth=160.0, sun_elevation=38.0, elevation_offset=350.0, gain=0.92,
                       body_share=0.27, debris_share=0.07, snow_share=0.07, cloud_tiles=0.3,
                       lakes_per_tile=1.5, noise=1.2)

# Mean spectra: B2, B3, B4, B6 TOA reflectance; B10 brightness temperature (K) at 4000 m.
SPECTRA = {
    "rock":    (0.120, 0.135, 0.155, 0.220, 286.0),
    "moraine": (0.125, 0.140, 0.160, 0.215, 284.0),
    "debris":  (0.122, 0.137, 0.156, 0.212, 281.0),
    "ice":     (0.520, 0.480, 0.430, 0.060, 271.0),
    "snow":    (0.560, 0.520, 0.465, 0.068, 270.5),  # seasonal snow: near-identical to ice
    "cloud":   (0.580, 0.570, 0.560, 0.330, 258.0),
    "water":   (0.095, 0.105, 0.070, 0.012, 279.0),
}


def _noise(rng: np.random.Generator, shape: Tuple[int, int], scale: float, aniso: float = 1.0) -> np.ndarray:
    """Smooth value noise with feature size ``scale`` pixels (anisotropic if aniso != 1)."""
    h, w = shape
    gh = max(2, int(math.ceil(h / scale)) + 2)
    gw = max(2, int(math.ceil(w / (scale * aniso))) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _fractal(rng, shape, scales, weights) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    for s, wgt in zip(scales, weights):
        out += wgt * _noise(rng, shape, s)
    out -= out.min()
    out /= max(float(out.max()), 1e-6)
    return out


def _quantile_mask(field: np.ndarray, share: float, within: Optional[np.ndarray] = None) -> np.ndarray:
    vals = field[within] if within is not None else field
    if vals.size == 0 or share <= 0:
        return np.zeros(field.shape, bool)
    thr = np.quantile(vals, 1.0 - min(share, 1.0))
    m = field >= thr
    return m & within if within is not None else m


def _terrain(rng: np.random.Generator, shape: Tuple[int, int], px: float, region: Region):
    """Elevation (m), slope, aspect, hill shade and deep terrain shadow under the region's sun."""
    elev = _fractal(rng, shape, [400 * px, 160 * px, 60 * px, 20 * px], [1.0, 0.55, 0.25, 0.08])
    ridges = 1.0 - np.abs(_noise(rng, shape, 220 * px))
    elev = 0.75 * elev + 0.25 * np.clip(ridges, 0, 1)
    elev_m = 3200.0 + 3200.0 * elev + region.elevation_offset
    gy, gx = np.gradient(elev_m / (30.0))  # 30 m pixels
    slope = np.arctan(np.hypot(gx, gy))
    aspect = np.arctan2(-gx, gy)
    az, el = math.radians(region.sun_azimuth), math.radians(region.sun_elevation)
    shade = np.sin(el) * np.cos(slope) + np.cos(el) * np.sin(slope) * np.cos(az - aspect)
    shade = np.clip(shade, 0.0, 1.0).astype(np.float32)
    shadow = shade < np.quantile(shade, 0.06)  # deep terrain shadow
    return elev, elev_m, slope, shade, shadow


def _glaciers(rng: np.random.Generator, shape, px: float, region: Region, elev: np.ndarray, elev_m: np.ndarray):
    """Clean ice, debris (the lower tongue, touching clean ice), moraines and snow patches."""
    flow = _noise(rng, shape, 90 * px, aniso=2.5) + 0.6 * _noise(rng, shape, 35 * px)
    body = _quantile_mask(1.6 * elev + 0.35 * flow, region.body_share)
    body = cv2.morphologyEx(body.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    # debris: the lowest part of each body, then keep only pieces touching clean ice
    tongue_field = -elev_m + 120.0 * _noise(rng, shape, 25 * px)
    debris = _quantile_mask(tongue_field, region.debris_share / max(region.body_share, 1e-3), within=body)
    clean = body & ~debris
    n, comp = cv2.connectedComponents(debris.astype(np.uint8), connectivity=8)
    touch = cv2.dilate(clean.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    keep = np.zeros(n, bool)
    keep[np.unique(comp[touch & debris])] = True
    keep[0] = False
    orphan = debris & ~keep[comp]
    debris &= keep[comp]
    body = clean | debris
    # lateral moraines: a rock ring around bodies, spectrally like debris
    ring = cv2.dilate(body.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))).astype(bool)
    moraine = (ring & ~body) | orphan
    # snow patches on high rock
    snow = _quantile_mask(elev + 0.25 * _noise(rng, shape, 18 * px), region.snow_share, within=~ring)
    return clean, debris, body, moraine, snow


def _lakes(rng: np.random.Generator, shape, px: float, region: Region, n_tiles: int, elev, clean, debris, body):
    """Small lakes near glacier termini (three in four) and in low valleys, never on clean ice."""
    water = np.zeros(shape, bool)
    n_lakes = rng.poisson(region.lakes_per_tile * n_tiles)
    term_y, term_x = np.nonzero(debris & (cv2.dilate((~body).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0))
    for _ in range(n_lakes):
        if term_y.size and rng.random() < 0.75:
            j = rng.integers(term_y.size)
            cy, cx = int(term_y[j]), int(term_x[j])
            cy += int(rng.integers(-6, 7) * px)
            cx += int(rng.integers(-6, 7) * px)
        else:
            low = np.argwhere(elev < np.quantile(elev[::16, ::16], 0.15))
            if not len(low):
                continue
            cy, cx = low[rng.integers(len(low))]
        ax = max(2, int(rng.uniform(3, 11) * px))
        ay = max(2, int(ax * rng.uniform(0.5, 1.0)))
        lake = np.zeros(shape, np.uint8)
        cv2.ellipse(lake, (int(cx), int(cy)), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        water |= lake.astype(bool) & ~clean
    return water


def _reflectance(rng: np.random.Generator, shape, px: float, region: Region, mat: np.ndarray, elev, elev_m,
                 shade, shadow):
    """Bands from the materials: spectra, geology, vegetation, debris texture, illumination,
    and a thermal band with lapse rate, sun-facing warmth and the 100 m blur."""
    spec = np.array([SPECTRA[n] for n in ("rock", "moraine", "debris", "ice", "snow", "water")], np.float32)
    bands = np.empty((5,) + shape, np.float32)
    geology = _noise(rng, shape, 50 * px)
    veg = np.clip(1.2 - 2.5 * elev, 0, 1)  # greener, darker valley floors
    for b in range(5):
        bands[b] = spec[mat, b]
    bands[:4] *= (1.0 + 0.08 * geology * (mat <= 2))[None]
    bands[2] -= 0.03 * veg * (mat == 0)
    bands[3] -= 0.04 * veg * (mat == 0)
    # debris texture: ponds and ice cliffs as speckle
    speck = rng.random(shape)
    cliffs = (mat == 2) & (speck < 0.025)
    ponds = (mat == 2) & (speck > 0.985)
    for b in range(4):
        bands[b][cliffs] = 0.5 * bands[b][cliffs] + 0.5 * SPECTRA["ice"][b]
        bands[b][ponds] = SPECTRA["water"][b]
    illum = 0.25 + 0.75 * shade
    illum[shadow] = rng.uniform(0.08, 0.16)
    bands[:4] *= illum[None] * region.gain
    # thermal: lapse rate, sun-facing slopes warmer, debris cooler beneath, blurred to 100 m
    t = bands[4] - 6.5 * (elev_m - 4000.0) / 1000.0 + 5.0 * (shade - 0.5)
    bands[4] = cv2.GaussianBlur(t, (0, 0), 2.0 * px)
    return bands, veg, illum


def _clouds(rng: np.random.Generator, bands: np.ndarray, px: float, region: Region, rows: int, cols: int,
            size: Tuple[int, int]) -> None:
    """Clouds on a share of the tiles (in place)."""
    th, tw = size
    cloud_field = _fractal(rng, bands.shape[1:], [80 * px, 25 * px], [1.0, 0.4])
    tile_has_cloud = rng.random((rows, cols)) < region.cloud_tiles
    cover = np.kron(tile_has_cloud, np.ones((th, tw), bool))
    alpha = np.clip((cloud_field - 0.62) * 4.0, 0, 0.85) * cover
    for b in range(5):
        bands[b] = (1 - alpha) * bands[b] + alpha * SPECTRA["cloud"][b] * (region.gain if b < 4 else 1.0)


def _sensor(rng: np.random.Generator, bands: np.ndarray, labels: np.ndarray, region: Region, rows: int, cols: int,
            size: Tuple[int, int]) -> None:
    """Sensor noise, then per tile: gain, thermal offset, column striping, masked gaps (in place)."""
    th, tw = size
    shape = bands.shape[1:]
    for b in range(4):
        bands[b] += rng.normal(0, 0.008 * region.noise, shape).astype(np.float32)
    bands[4] += rng.normal(0, 0.6 * region.noise, shape).astype(np.float32)
    for r in range(rows):
        for c in range(cols):
            ys, xs = slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw)
            bands[:4, ys, xs] *= np.float32(rng.uniform(0.85, 1.15))  # per-tile gain
            bands[4, ys, xs] += np.float32(rng.uniform(-2.0, 2.0))   # per-tile thermal offset
            if rng.random() < 0.15:  # column striping in one band
                b = int(rng.integers(0, 5))
                amp = 0.01 if b < 4 else 0.8
                bands[b, ys, xs] += (rng.normal(0, amp, tw) * (rng.random(tw) < 0.1)).astype(np.float32)[None, :]
            if rng.random() < 0.12:  # masked gap (zeros), labelled background like the real tiles
                gw = int(rng.uniform(0.05, 0.2) * tw)
                x0 = c * tw + (0 if rng.random() < 0.5 else tw - gw)
                bands[:, ys, x0:x0 + gw] = 0.0
                labels[ys, x0:x0 + gw] = 0


def generate_scene(rows: int, cols: int, size: Tuple[int, int], seed: int, region: Region = TRAIN_REGION,
                   return_extras: bool = False):
    """Return (bands float32 (5, H, W), labels uint8 (H, W) class ids) for a whole scene;
    with ``return_extras`` also {"elevation", "slope", "nir"} (for the fake HKH channels)."""
    rng = np.random.default_rng(seed)
    shape = (rows * size[0], cols * size[1])
    px = max(size) / 512.0  # keep feature sizes proportional to the tile size
    elev, elev_m, slope, shade, shadow = _terrain(rng, shape, px, region)
    clean, debris, body, moraine, snow = _glaciers(rng, shape, px, region, elev, elev_m)
    labels = np.zeros(shape, np.uint8)
    labels[clean] = 1
    labels[debris] = 2
    water = _lakes(rng, shape, px, region, rows * cols, elev, clean, debris, body)
    labels[water] = 3
    mat = np.zeros(shape, np.uint8)  # 0 rock, 1 moraine, 2 debris, 3 ice, 4 snow, 5 water
    mat[moraine] = 1
    mat[snow] = 4
    mat[debris] = 2
    mat[clean] = 3
    mat[water] = 5
    bands, veg, illum = _reflectance(rng, shape, px, region, mat, elev, elev_m, shade, shadow)
    _clouds(rng, bands, px, region, rows, cols, size)
    _sensor(rng, bands, labels, region, rows, cols, size)
    bands[:4] = np.clip(bands[:4], 0.0, 1.0)
    if not return_extras:
        return bands, labels
    nir_mean = np.array([0.26, 0.27, 0.25, 0.32, 0.60, 0.03], np.float32)[mat] + 0.15 * veg * (mat == 0)
    nir = np.clip(nir_mean * illum * region.gain + rng.normal(0, 0.008, shape).astype(np.float32), 0, 1)
    return bands, labels, {"elevation": elev_m.astype(np.float32), "slope": np.degrees(slope).astype(np.float32),
                           "nir": nir.astype(np.float32)}


def _write_tif(path: str, arr: np.ndarray) -> None:
    import tifffile

    atomic_write_with(path, lambda tmp: tifffile.imwrite(tmp, arr))


def write_split(out: str, n_tiles: int, size: Tuple[int, int], seed: int, region: Region,
                naming: str = "train", written: Optional[List[str]] = None) -> List[str]:
    """Write ``n_tiles`` tiles of one scene in the competition layout; returns tile ids
    (and appends every file path written to ``written`` when given)."""
    cols = int(math.ceil(math.sqrt(n_tiles)))
    rows = int(math.ceil(n_tiles / cols))
    bands, labels = generate_scene(rows, cols, size, seed, region)
    for d in BAND_FOLDERS + ("label",):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    lut = np.array(CLASS_VALUES, np.uint8)
    th, tw = size
    ids = []
    for i in range(n_tiles):
        r, c = divmod(i, cols)
        ys, xs = slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw)
        if naming == "train":
            tid = f"{r:02d}_{c:02d}"
            names = [n.format(id=tid) for n in TRAIN_NAMES]
            lname = TRAIN_LABEL.format(id=tid)
        else:
            tid = f"{i + 1:03d}"
            names = [f"img{tid}.tif"] * 5
            lname = f"img{tid}.tif"
        for b in range(5):
            _write_tif(os.path.join(out, BAND_FOLDERS[b], names[b]), np.ascontiguousarray(bands[b, ys, xs]))
        _write_tif(os.path.join(out, "label", lname), lut[labels[ys, xs]])
        if written is not None:
            written += [os.path.join(out, f"Band{b + 1}", names[b]) for b in range(5)]
            written.append(os.path.join(out, "label", lname))
        ids.append(tid)
    return ids


#: Written into every folder ``generate_dataset`` writes: the files it wrote (relative paths).
SYNTH_MARKER = ".glacier-synth.json"


class ForeignFilesError(ValueError):
    """The output folder holds files the generator did not write (e.g. real data)."""


def _our_files(out: str) -> List[str]:
    import json

    try:
        with open(os.path.join(out, SYNTH_MARKER)) as fh:
            return list(json.load(fh).get("files", []))
    except (OSError, ValueError):
        return []


def foreign_files(out: str) -> List[str]:
    """Files under ``out`` (relative paths) that no earlier ``generate_dataset`` listed in its marker."""
    if not os.path.isdir(out):
        return []
    ours = set(_our_files(out))
    found = []
    for folder, _, files in os.walk(out):
        for f in files:
            rel = os.path.relpath(os.path.join(folder, f), out)
            if rel != SYNTH_MARKER and rel not in ours:
                found.append(rel)
    return sorted(found)


def generate_dataset(out: str, n_tiles: int = 25, size: Tuple[int, int] = (512, 512), seed: int = 0,
                     unseen_tiles: int = 0, force: bool = False) -> Dict[str, List[str]]:
    """Write ``out/train`` (grid naming) and, if asked, ``out/unseen`` (test naming).

    Refuses (:class:`ForeignFilesError`) a folder holding files it did not write (real data
    shares the competition's file names and would be overwritten) unless ``force``; what it
    writes is listed in ``out/.glacier-synth.json``."""
    import json

    from glacier_runtime.atomic import atomic_write_text

    if n_tiles < 1:
        raise ValueError(f"--tiles must be >= 1, got {n_tiles}")
    if min(size) < 32:
        raise ValueError(f"--size must be at least 32x32, got {size}")
    foreign = foreign_files(out)
    if foreign and not force:
        raise ForeignFilesError(
            f"{out} holds {len(foreign)} files that `glacier-train synth` did not write (e.g. "
            f"{', '.join(foreign[:3])}); synthetic tiles use the competition's file names and would overwrite "
            "them. Pick an empty or new folder, or pass --force to write into it anyway.")
    written: List[str] = []
    result = {"train": write_split(os.path.join(out, "train"), n_tiles, size, seed, TRAIN_REGION, "train", written)}
    if unseen_tiles:
        result["unseen"] = write_split(os.path.join(out, "unseen"), unseen_tiles, size, seed + 10_000,
                                       UNSEEN_REGION, "test", written)
    ours = set(_our_files(out)) | {os.path.relpath(p, out) for p in written}
    atomic_write_text(os.path.join(out, SYNTH_MARKER),
                      json.dumps({"tool": "glacier-train synth", "files": sorted(ours)}, indent=1) + "\n")
    return result
