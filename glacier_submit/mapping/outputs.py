"""What a mapped scene leaves: a Cloud-Optimised GeoTIFF, outlines in a GeoPackage and a
quick-look PNG.

Outlines: one polygon per 4-connected body of each class but background (8-connected
bodies would touch at corners, which is not a valid polygon), holes kept. ``area_km2`` is
the body's exact area (its pixels times the pixel area). The stored geometry is simplified
as one coverage (GEOS coverage simplification, Visvalingam-Whyatt: a corner goes when its
triangle is smaller than about ``tolerance`` squared), so neighbouring bodies (debris beside
clean ice, a lake in a glacier's hole) keep one shared boundary: no overlaps, no slivers.
The triangles removed are bounded, not the distance: each stored outline lies within
4 x ``tolerance`` of its pixel edges (tested; measured up to 2.8 x, 99 % of bodies within
1.5 x), so its area differs from ``area_km2`` by at most its perimeter times that. Beyond
:data:`COVERAGE_MAX_VERTICES` each polygon is simplified alone and the summary says so.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

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
    metric = metre_crs(crs)
    exact, cls = trace_bodies(ids, transform)
    del ids
    simple, method = simplify_coverage(exact, tolerance, pixel_edge(transform))
    area = shapely.area(exact)
    names = np.asarray([class_names[c] for c in cls], object)
    pixels = np.rint(area / pixel_area(transform)).astype(np.int64)
    nan = np.full(len(exact), np.nan)
    areas, perims = (area / 1e6, shapely.length(simple) / 1e3) if metric else (nan, nan)
    fields = ["class_id", "class_name", "pixels", "area_km2", "perimeter_km"]
    data = [cls, names, pixels, areas, perims]
    pyogrio.raw.write(out_path, shapely.to_wkb(simple), data, fields, driver="GPKG", layer="outlines",
                      geometry_type="Polygon", crs=crs.to_wkt(), promote_to_multi=False)
    counts = {class_names[c]: 0 for c in range(1, len(class_names))}
    for c in cls:
        counts[class_names[int(c)]] += 1
    return {"polygons": counts, "areas_exact": metric, "simplification": method}


def trace_bodies(ids: np.ndarray, transform) -> Tuple[np.ndarray, np.ndarray]:
    """(polygons, class ids): every 4-connected body of a class raster but background and
    nodata, traced along its pixel edges (GDAL's polygonize, through rasterio)."""
    import shapely

    bodies, values = [], []
    keep = (ids != NODATA) & (ids != 0)
    for geom, value in rasterio.features.shapes(ids, mask=keep, connectivity=4, transform=transform):
        bodies.append(shapely.geometry.shape(geom))
        values.append(int(value))
    return np.asarray(bodies, dtype=object), np.asarray(values, np.int32)


def pixel_edge(transform) -> float:
    """The shorter side of a pixel, in the CRS's units (rotated grids included)."""
    return min(float(np.hypot(transform.a, transform.d)), float(np.hypot(transform.b, transform.e)))


#: the most vertices (a vertex at every pixel corner) simplified as one coverage; GEOS needs
#: 100-240 bytes of heap a vertex for it (benchmarks/outline_simplify.py), so 1-2.4 GB. Beyond
#: it each polygon is simplified alone (Douglas-Peucker), and the summary warns. A fixed
#: number, not the free memory: the same scene and options always give the same file.
COVERAGE_MAX_VERTICES = 10_000_000


def simplify_coverage(polys: np.ndarray, tolerance: float, edge: float) -> Tuple[np.ndarray, str]:
    """The pixel-edge polygons of a class raster simplified together, keeping shared edges;
    returns them and the method used (``exact``, ``coverage`` or ``douglas_peucker``).

    GDAL traces a straight run of pixel edges as one segment, so a neighbour's corner in the
    middle of it has no vertex to match (not a valid coverage); a vertex at every pixel corner
    (``segmentize`` by one pixel edge) makes the edges match before GEOS simplifies them."""
    import shapely

    if tolerance <= 0 or len(polys) == 0:
        return polys, "exact"
    if float(shapely.length(polys).sum()) / edge > COVERAGE_MAX_VERTICES:  # a vertex per pixel edge
        return shapely.simplify(polys, tolerance, preserve_topology=True), "douglas_peucker"
    return shapely.coverage_simplify(shapely.segmentize(polys, edge), tolerance), "coverage"


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
