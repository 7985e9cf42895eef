"""What a mapped scene leaves: a Cloud-Optimised GeoTIFF, outlines in a GeoPackage and a
quick-look PNG.

Outlines: one polygon per 4-connected body of each class but background (8-connected
bodies would touch at corners, which is not a valid polygon), holes kept. ``area_km2`` is
the body's exact area (its pixels times the pixel area); the stored geometry is simplified
(Douglas-Peucker, topology preserved) to ``tolerance`` metres: every vertex of the exact
outline is within ``tolerance`` of the stored one, so the stored polygon's area differs
from ``area_km2`` by at most its perimeter times ``tolerance``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import rasterio
import rasterio.features
import rasterio.shutil
from PIL import Image
from rasterio.enums import Resampling

from .classify import NODATA, PALETTE
from .raster import pixel_area


def to_cog(src: str, dst: str) -> None:
    """Copy the tiled GeoTIFF with its overviews into a Cloud-Optimised GeoTIFF."""
    rasterio.shutil.copy(src, dst, driver="COG", compress="DEFLATE", overview_resampling="MODE", blocksize=512,
                         BIGTIFF="IF_SAFER")


def metre_crs(crs) -> bool:
    try:
        return crs.is_projected and (crs.linear_units or "").lower() in ("metre", "meter", "m")
    except Exception:  # noqa: BLE001 - an odd CRS object: treat as not metric
        return False


def write_outlines(classes_path: str, out_path: str, class_names: Sequence[str], tolerance: float) -> Dict[str, Any]:
    """Polygons of every non-background class into ``out_path`` (GeoPackage, layer
    ``outlines``); returns polygons per class. Reads the class raster whole (1 byte per pixel)."""
    import pyogrio.raw
    import shapely

    with rasterio.open(classes_path) as ds:
        ids = ds.read(1)
        crs, transform = ds.crs, ds.transform
    pixel_m2 = pixel_area(transform)
    metric = metre_crs(crs)
    geoms, cls, names, areas, pixels, perims = [], [], [], [], [], []
    keep = (ids != NODATA) & (ids != 0)
    for geom, value in rasterio.features.shapes(ids, mask=keep, connectivity=4, transform=transform):
        exact = shapely.geometry.shape(geom)
        n = int(round(exact.area / pixel_m2))
        simple = shapely.simplify(exact, tolerance, preserve_topology=True) if tolerance > 0 else exact
        geoms.append(shapely.to_wkb(simple))
        cls.append(int(value))
        names.append(class_names[int(value)])
        pixels.append(n)
        areas.append(exact.area / 1e6 if metric else np.nan)
        perims.append(simple.length / 1e3 if metric else np.nan)
    fields = ["class_id", "class_name", "pixels", "area_km2", "perimeter_km"]
    data = [np.asarray(cls, np.int32), np.asarray(names, object), np.asarray(pixels, np.int64),
            np.asarray(areas, np.float64), np.asarray(perims, np.float64)]
    pyogrio.raw.write(out_path, np.asarray(geoms, dtype=object), data, fields, driver="GPKG", layer="outlines",
                      geometry_type="Polygon", crs=crs.to_wkt(), promote_to_multi=False)
    counts = {class_names[c]: 0 for c in range(1, len(class_names))}
    for c in cls:
        counts[class_names[c]] += 1
    return {"polygons": counts, "areas_exact": metric}


def _stretch(band: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if not valid.any():
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(band[valid], [2, 98])
    out = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    out[~valid] = 0
    return out.astype(np.uint8)


def write_quicklook(classes_path: str, overview: np.ndarray, valid: np.ndarray, rgb: Sequence[int], out_path: str,
                    n_classes: int) -> None:
    """The scene (a stretched colour composite) beside its classes, side by side, at the
    overview's size."""
    h, w = overview.shape[1:]
    with rasterio.open(classes_path) as ds:
        ids = ds.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    colour = np.stack([_stretch(overview[b], valid) for b in rgb], axis=-1)
    lut = np.zeros((256, 3), np.uint8)
    lut[:n_classes] = np.asarray(PALETTE[:n_classes], np.uint8)
    lut[NODATA] = (255, 255, 255)
    classes = lut[ids]
    gap = np.full((h, max(4, w // 100), 3), 255, np.uint8)
    Image.fromarray(np.concatenate([colour, gap, classes], axis=1)).save(out_path)


def rgb_bands(roles: List[str]) -> List[int]:
    """Indices of red, green, blue among the bands (a false-colour stand-in where missing)."""
    order = []
    for want in ("red", "green", "blue"):
        order.append(roles.index(want) if want in roles else min(len(order), len(roles) - 1))
    return order
