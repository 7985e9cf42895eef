"""Classify a whole scene block by block with the runtime's block path, writing a tiled
GeoTIFF as it goes: the working memory is one block's, whatever the scene's size.

Each block (``block`` pixels a side, default 1024) is read with the predictor's context
margin around it, predicted with :meth:`Predictor.block_ids` (the code ``solution.py``
runs on a large tile), post-processed on the crop (so components that cross the block's
edge are judged with the margin's context), and its core written. Normalisation uses the
**scene's** numbers: a fold-mode member's own statistics, a per-tile mode's percentiles of
the whole scene (from a decimated read), as a large tile would be normalised.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import rasterio

from glacier_runtime import postprocess
from glacier_runtime.normalize import mode_of
from glacier_runtime.window import plan_blocks

from .raster import SceneReader, window_of

#: the class raster's nodata value (class ids are 0..K-1)
NODATA = 255
#: colours of the class raster's palette and the quick-look (background, glacier, debris, lake)
PALETTE = [(38, 38, 38), (120, 200, 255), (200, 130, 60), (20, 60, 230)]


def radiometry_warnings(predictor, overview: np.ndarray, valid: np.ndarray, band_names: List[str],
                        level: str) -> List[str]:
    """Say where the scene's values do not look like the members' training tiles'."""
    member = predictor.members[0]
    mode = mode_of(member.stats)
    if mode != "fold":
        return [f"normalisation: the members use per-tile statistics ({mode}); the scene ({level}) is normalised with "
                "its own percentiles over the whole scene, so its units (DN or reflectance) do not matter"]
    if not valid.any():
        return []
    off = []
    for b, name in enumerate(band_names):
        med = float(np.median(overview[b][valid]))
        lo, hi = float(member.stats["lo"][b]), float(member.stats["hi"][b])
        if not lo <= med <= hi:
            off.append(f"{name} median {med:.4g} (tiles {lo:.4g}..{hi:.4g})")
    if not off:
        return []
    return [f"radiometry: the scene's values lie outside the training tiles' range in band(s) {'; '.join(off)}. The "
            f"members normalise with their training folds' numbers (fold mode), so a scene in other units ({level}) "
            "is predicted as if it were in the tiles' units and the classes may be meaningless. Map scenes of the "
            "tiles' product, or train members with --set data.normalization=tile_percentile"]


def write_profile(reader: SceneReader, block: int = 512) -> Dict[str, Any]:
    return {"driver": "GTiff", "dtype": "uint8", "count": 1, "height": reader.height, "width": reader.width,
            "crs": reader.crs, "transform": reader.transform, "nodata": NODATA, "tiled": True,
            "blockxsize": block, "blockysize": block, "compress": "deflate", "BIGTIFF": "IF_SAFER"}


def classify_scene(predictor, reader: SceneReader, path: str, norms: Sequence[Mapping[str, Any]], block: int = 1024,
                   progress=None) -> Dict[str, Any]:
    """Write the class raster to ``path`` (GeoTIFF, uint8 class ids, :data:`NODATA` where
    the scene has no data); returns pixel counts (per class, nodata, cloud). ``norms``: the
    members' numbers for the whole scene (``predictor.tile_norms`` of its overview);
    ``progress``: a tqdm bar, given its total here."""
    n_classes = predictor.n_classes
    first = norms[0]  # the CRF's appearance term: the first member's numbers
    counts = np.zeros(n_classes, np.int64)
    nodata, cloud, cloud_known = 0, 0, reader.cloud_ds is not None
    plan = plan_blocks(reader.height, reader.width, block, predictor.block_margin())
    if progress is not None:
        progress.reset(total=len(plan))
    with rasterio.open(path, "w", **write_profile(reader)) as dst:
        dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(PALETTE[:n_classes])})
        for (y0, y1, x0, x1), crop_box in plan:
            ya, yb, xa, xb = crop_box
            crop, valid = reader.read(crop_box)
            core = (slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa))
            out = np.full((y1 - y0, x1 - x0), NODATA, np.uint8)
            if valid[core].any():
                ids = predictor.block_ids(crop, (0, yb - ya, 0, xb - xa), norms, first)
                ids = postprocess.apply(ids, predictor.rules, n_classes)
                keep = valid[core]
                out[keep] = ids[core][keep]
                counts += np.bincount(out[keep], minlength=n_classes)[:n_classes]
            nodata += int((~valid[core]).sum())
            if cloud_known:
                c = reader.cloudy((y0, y1, x0, x1), valid[core])
                cloud += int(c.sum())
            dst.write(out, 1, window=window_of((y0, y1, x0, x1)))
            if progress is not None:
                progress.update(1)
    return {"class_pixels": counts.tolist(), "nodata_pixels": nodata,
            "cloud_pixels": cloud if cloud_known else None, "blocks": len(plan)}


def build_overviews(path: str, factors: Optional[List[int]] = None) -> None:
    """Internal overviews by the most common class (a class map must not be averaged)."""
    with rasterio.open(path, "r+") as ds:
        side = max(ds.width, ds.height)
        factors = factors or [f for f in (2, 4, 8, 16, 32, 64) if side // f >= 256] or [2]
        ds.build_overviews(factors, rasterio.enums.Resampling.mode)
        ds.update_tags(ns="rio_overview", resampling="mode")
