"""The scene's band GeoTIFFs read together, window by window (rasterio): never the whole
scene in memory.

A pixel is **valid** when it is finite, no band holds its file's nodata value and not every
band is 0 (Landsat's fill). Invalid pixels are returned as 0 in every band, which is what
the runtime's masked-pixel rule and per-tile statistics skip.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from .scene import SceneError

Box = Tuple[int, int, int, int]  # y0, y1, x0, x1


def window_of(box: Box) -> Window:
    """A rasterio window of a (y0, y1, x0, x1) box."""
    y0, y1, x0, x1 = box
    return Window(x0, y0, x1 - x0, y1 - y0)


def pixel_area(transform) -> float:
    """A pixel's area in the CRS's units squared (rotated grids included)."""
    return abs(transform.a * transform.e - transform.b * transform.d)


def _open(path: str):
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise SceneError(f"{path}: cannot be read as a GeoTIFF ({exc}); re-download it") from None


class SceneReader:
    """Open band files of one grid; :meth:`read` a window as a (C, h, w) float32 array."""

    def __init__(self, paths: Sequence[str], qa_pixel: Optional[str] = None, cloud: Optional[str] = None):
        self.paths = list(paths)
        self.datasets = []
        try:
            for p in self.paths:
                self.datasets.append(_open(p))
            ref = self.datasets[0]
            for p, ds in zip(self.paths[1:], self.datasets[1:]):
                if (ds.width, ds.height) != (ref.width, ref.height) or ds.transform != ref.transform or ds.crs != ref.crs:
                    raise SceneError(f"{p}: {ds.width}x{ds.height} on {ds.crs} {tuple(ds.transform)[:6]} is not on the grid "
                                     f"of {self.paths[0]} ({ref.width}x{ref.height} on {ref.crs}); resample the bands "
                                     "onto one grid first (e.g. gdalwarp -tr 30 30 -tap)")
            if ref.crs is None:
                raise SceneError(f"{self.paths[0]}: no coordinate reference system; a scene to map must be georeferenced")
            self.cloud_kind, self.cloud_ds = None, None
            for kind, p in (("qa_pixel", qa_pixel), ("cloud", cloud)):
                if p:
                    ds = _open(p)
                    self.datasets.append(ds)
                    if (ds.width, ds.height) != (ref.width, ref.height):
                        raise SceneError(f"{p}: {ds.width}x{ds.height}, the bands are {ref.width}x{ref.height}")
                    self.cloud_kind, self.cloud_ds = kind, ds
        except BaseException:
            self.close()
            raise
        self.bands = self.datasets[: len(self.paths)]
        self.height, self.width = ref.height, ref.width
        self.crs, self.transform = ref.crs, ref.transform
        self.nodata = [ds.nodata for ds in self.bands]

    @property
    def shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def read(self, box: Box) -> Tuple[np.ndarray, np.ndarray]:
        """(C, h, w) float32 of the window and its (h, w) valid mask; invalid pixels 0 in every band."""
        win = window_of(box)
        img = np.stack([ds.read(1, window=win).astype(np.float32, copy=False) for ds in self.bands])
        return self._clean(img)

    def _clean(self, img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        valid = np.isfinite(img).all(axis=0) & ~np.all(img == 0, axis=0)
        for b, nd in enumerate(self.nodata):
            if nd is not None and np.isfinite(nd):
                valid &= img[b] != np.float32(nd)
        img[:, ~valid] = 0.0
        return img, valid

    def cloudy(self, box: Box, valid: np.ndarray) -> Optional[np.ndarray]:
        """Cloud pixels of the window (QA_PIXEL bit 3 cloud or bit 1 dilated cloud; a cloud
        file: non-zero), or None when the scene has no cloud information."""
        if self.cloud_ds is None:
            return None
        q = self.cloud_ds.read(1, window=window_of(box))
        if self.cloud_kind == "qa_pixel":
            q = q.astype(np.uint32)
            return (((q >> 3) & 1) | ((q >> 1) & 1)).astype(bool) & valid
        return (q != 0) & valid

    def overview(self, max_side: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
        """The whole scene decimated (nearest) to at most ``max_side`` pixels a side, cleaned as
        :meth:`read`: for scene-wide statistics and the quick-look."""
        f = max(1, int(np.ceil(max(self.height, self.width) / max_side)))
        shape = (max(1, self.height // f), max(1, self.width // f))
        img = np.stack([ds.read(1, out_shape=shape, resampling=Resampling.nearest).astype(np.float32)
                        for ds in self.bands])
        return self._clean(img)

    def close(self) -> None:
        for ds in self.datasets:
            ds.close()
        self.datasets = []

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

