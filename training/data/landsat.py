"""A synthetic georeferenced Landsat 8 Collection 2 Level-1 scene folder, as USGS
distributes one: per-band GeoTIFFs named ``LC08_L1TP_<path><row>_<date>_<date>_02_T1_B<n>.TIF``
on a UTM grid (EPSG:32645, 30 m), a ``QA_PIXEL`` band and an ``MTL.txt``; the scene's
footprint is tilted as a real scene's is, with fill (0 in every band, QA fill bit) around it.

The bands are the synthetic generator's (training/data/scenes/: the competition's B2, B3,
B4, B6, B10 as Landsat-8 DNs) or, with ``content="noise"``, cheap random values of the same
range (memory and speed tests, where the picture does not matter). ``glacier-train
synth-scene`` writes one.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from glacier_runtime.atomic import atomic_write_text

BANDS = ("B2", "B3", "B4", "B6", "B10")
CRS = "EPSG:32645"     # UTM 45N: the central Himalaya
ORIGIN = (300_000.0, 3_100_000.0)
PIXEL = 30.0


@dataclass
class SyntheticScene:
    folder: str
    name: str
    labels: Optional[np.ndarray]  # (H, W) class ids, None for noise
    valid: np.ndarray             # (H, W) inside the footprint
    transform: object


def scene_id(path_row: str = "140041", date: str = "20211015") -> str:
    return f"LC08_L1TP_{path_row}_{date}_{date}_02_T1"


def footprint(h: int, w: int, tilt_deg: float = 12.0, inset: float = 0.08) -> np.ndarray:
    """(H, W) bool: a rectangle rotated by ``tilt_deg``, as a Landsat path crosses its UTM grid."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    a = math.radians(tilt_deg)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    return (np.abs(u) <= (0.5 - inset) * w) & (np.abs(v) <= (0.5 - inset) * h)


def _bands(h: int, w: int, seed: int, content: str, region) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if content == "noise":
        rng = np.random.default_rng(seed)
        lo = np.array([7000, 6500, 6000, 5500, 20000], np.float32).reshape(5, 1, 1)
        return (lo + rng.random((5, h, w), dtype=np.float32) * 8000).astype(np.float32), None
    from training.data.scenes import TRAIN_REGION, generate_scene

    tile = 512
    rows, cols = math.ceil(h / tile), math.ceil(w / tile)
    bands, labels = generate_scene(rows, cols, (tile, tile), seed, region or TRAIN_REGION)
    return np.ascontiguousarray(bands[:, :h, :w]), np.ascontiguousarray(labels[:h, :w])


def write_landsat_scene(root: str, height: int, width: int, seed: int = 0, content: str = "synthetic", region=None,
                        cloud_share: float = 0.05, name: Optional[str] = None, tilt_deg: float = 12.0) -> SyntheticScene:
    """Write a scene folder under ``root`` (named after the scene id); returns what was written."""
    import rasterio
    from rasterio.transform import from_origin

    if content not in ("synthetic", "noise"):
        raise ValueError(f"content must be synthetic or noise, got {content!r}")
    name = name or scene_id()
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    bands, labels = _bands(height, width, seed, content, region)
    valid = footprint(height, width, tilt_deg)
    transform = from_origin(ORIGIN[0], ORIGIN[1], PIXEL, PIXEL)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "crs": CRS, "transform": transform,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    for b, band in enumerate(BANDS):
        dn = np.where(valid, np.clip(bands[b], 1, 65535), 0).astype(np.uint16)  # L1 DNs: uint16, fill 0
        with rasterio.open(os.path.join(folder, f"{name}_{band}.TIF"), "w", dtype="uint16", **profile) as ds:
            ds.write(dn, 1)
    del bands
    rng = np.random.default_rng(seed + 1)
    qa = np.where(valid, 1 << 6, 1).astype(np.uint16)  # bit 6 clear sky; bit 0 fill
    if cloud_share > 0:
        blob = rng.random((max(1, height // 64), max(1, width // 64))) < cloud_share
        cloudy = np.kron(blob, np.ones((64, 64), bool))[:height, :width]
        cloudy = np.pad(cloudy, ((0, height - cloudy.shape[0]), (0, width - cloudy.shape[1])))
        qa = np.where(cloudy & valid, (1 << 3) | (1 << 1), qa).astype(np.uint16)
    with rasterio.open(os.path.join(folder, f"{name}_QA_PIXEL.TIF"), "w", dtype="uint16", **profile) as ds:
        ds.write(qa, 1)
    atomic_write_text(os.path.join(folder, f"{name}_MTL.txt"),
                      f"GROUP = LANDSAT_METADATA_FILE\n  LANDSAT_PRODUCT_ID = \"{name}\"\n  SPACECRAFT_ID = \"LANDSAT_8\"\n"
                      f"  PROCESSING_LEVEL = \"L1TP\"\n  REFLECTIVE_LINES = {height}\n  REFLECTIVE_SAMPLES = {width}\n"
                      "  NOTE = \"synthetic scene written by glacier-train synth-scene\"\nEND_GROUP = LANDSAT_METADATA_FILE\nEND\n")
    return SyntheticScene(folder, name, None if labels is None else np.where(valid, labels, 0), valid, transform)
