"""Reader for the competition layout: ``Band1..Band5/*.tif`` plus ``label/*.tif``.

Tolerant behaviour (documented in docs/DATA.md): stray non-TIFF files are ignored with a
warning; a tile missing a band or its label is skipped with a warning; invalid pixels
(NaN, +-inf, the file's nodata value) are kept as NaN here and counted, and the
normalisation fills them (see ``glacier_runtime.normalize``). Everything else (unreadable file,
band shapes that differ, unknown label values, an empty folder) is an error that names
the file, the value and the fix.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from glacier_runtime.atomic import atomic_write_with
from glacier_runtime.classes import BINARY_CLASS_NAMES, CLASS_NAMES, CLASS_VALUES
from glacier_runtime.tiles import BAND_FOLDERS, BandShapeError, TileReadError, list_tiles, read_tile, scan_tiffs

log = logging.getLogger("glacier.data")

LABEL_FOLDERS = ("label", "labels", "mask", "masks")
LABEL_MODES = ("multiclass", "binary")


def tile_sha256(image: np.ndarray) -> str:
    """The content fingerprint of a decoded tile (its float32 bands): the leakage guard's way to
    know a tile again whatever its name, since Phase-2 training and test tiles are both named
    ``img001.tif ...``."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


class DataError(ValueError):
    """The dataset violates the competition layout; the message says how to fix it."""


class LabelError(DataError):
    pass


def read_raster(path: str) -> Tuple[np.ndarray, Optional[float]]:
    """Read band 1 of a GeoTIFF with rasterio (falls back to the runtime reader)."""
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    except ImportError:  # training extra not installed: the runtime reader still works
        from glacier_runtime.tiles import read_band

        return read_band(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if ds.count != 1:
                    raise TileReadError(
                        f"{path}: expected 1 band per file, found {ds.count}; "
                        "store each band in its own Band1..Band5 file"
                    )
                return ds.read(1), ds.nodata
    except RasterioIOError as exc:
        raise TileReadError(
            f"cannot read {path}: {exc}. The file is corrupt or truncated; re-export or re-download it, "
            "or move it out of the data folder."
        ) from exc
    except TileReadError:
        raise
    except Exception as exc:
        raise TileReadError(
            f"cannot decode {path}: {exc}. The file is corrupt or truncated; re-export or re-download it."
        ) from exc


def decode_label(raw: np.ndarray, path: str, mode: str = "multiclass") -> np.ndarray:
    """Map stored label values to class ids.

    multiclass: {0, 85, 170, 255} -> {0, 1, 2, 3}. binary (earlier phase): {0, 1} or
    {0, 255} -> {0, 1}. Unknown values raise, listing each with its pixel count.
    """
    if mode not in LABEL_MODES:
        raise DataError(f"label mode {mode!r} unknown; use one of {LABEL_MODES}")
    arr = np.asarray(raw)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise LabelError(
                f"{path}: label has {int((~np.isfinite(arr)).sum())} NaN/inf pixels; labels must be "
                "integer class values. Fix the mask file."
            )
        if not np.all(arr == np.round(arr)):
            raise LabelError(f"{path}: label has non-integer values; labels must be class values")
    values, counts = np.unique(arr.astype(np.int64), return_counts=True)
    if mode == "multiclass":
        allowed = {v: i for i, v in enumerate(CLASS_VALUES)}
    else:
        allowed = {0: 0, 1: 1, 255: 1}
        if 1 in values and 255 in values:
            raise LabelError(f"{path}: binary label mixes 1 and 255; use one encoding for glacier")
    unknown = [(int(v), int(c)) for v, c in zip(values, counts) if int(v) not in allowed]
    if unknown:
        listing = ", ".join(f"{v} ({c} px)" for v, c in unknown)
        hint = (
            " This looks like a binary {0,1} mask: pass --label-mode binary."
            if mode == "multiclass" and set(values.tolist()) <= {0, 1}
            else ""
        )
        raise LabelError(
            f"{path}: unexpected label values {listing}; {mode} labels use "
            f"{sorted(allowed)}.{hint} Fix the mask or choose the right --label-mode."
        )
    lut = np.zeros(256, dtype=np.uint8)
    for v, i in allowed.items():
        lut[v] = i
    return lut[arr.astype(np.int64)]


@dataclass
class TileInfo:
    key: str
    bands: Dict[str, str]
    label: Optional[str]
    shape: Optional[Tuple[int, int]] = None
    dtypes: List[str] = field(default_factory=list)
    invalid_pixels: int = 0


class CompetitionDataset:
    """Tiles of one competition-layout folder, decoded once and cached in memory.

    ``cache_dir`` adds an on-disk cache of decoded arrays keyed by file path, size and
    modification time, so a new process skips TIFF decoding too.
    """

    def __init__(
        self,
        root: str,
        label_mode: str = "multiclass",
        bands: Sequence[str] = BAND_FOLDERS,
        require_labels: bool = True,
        cache_dir: Optional[str] = None,
    ):
        self.root = os.fspath(root)
        self.label_mode = label_mode
        self.bands = tuple(bands)
        self.cache_dir = cache_dir
        self.problems: List[str] = []
        self.class_names = CLASS_NAMES if label_mode == "multiclass" else BINARY_CLASS_NAMES
        if not os.path.isdir(self.root):
            raise DataError(f"data folder {self.root} does not exist")
        try:
            tiles, problems = list_tiles(self.root, self.bands)
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from exc
        self.problems.extend(problems)
        label_dir = next(
            (os.path.join(self.root, d) for d in os.listdir(self.root)
             if d.lower() in LABEL_FOLDERS and os.path.isdir(os.path.join(self.root, d))),
            None,
        )
        labels: Dict[str, str] = {}
        if label_dir is not None:
            labels, found = scan_tiffs(label_dir)
            self.problems.extend(found)
        elif require_labels:
            raise DataError(
                f"{self.root} has no label folder; training needs masks in one of "
                f"{', '.join(f + '/' for f in LABEL_FOLDERS)} beside the band folders "
                "(or pass require_labels=False for prediction-only data)"
            )
        self.has_labels = label_dir is not None
        self.tiles: Dict[str, TileInfo] = {}
        for key, paths in tiles.items():
            if len(paths) != len(self.bands):
                continue  # already reported by list_tiles
            if require_labels and key not in labels:
                self.problems.append(f"tile {key!r} has no label file in {label_dir}; skipped")
                continue
            self.tiles[key] = TileInfo(key, paths, labels.get(key))
        for key in labels:
            if key not in tiles:
                self.problems.append(f"label {labels[key]} has no band files; ignored")
        if not self.tiles:
            raise DataError(
                f"no complete tiles found in {self.root}: expected {list(self.bands)} folders with one "
                "matching .tif per tile" + (" and label/" if require_labels else "")
                + (f". Problems: {self.problems[:5]}" if self.problems else "")
            )
        for msg in self.problems:
            log.warning(msg)
        self._images: Dict[str, np.ndarray] = {}
        self._labels: Dict[str, np.ndarray] = {}

    # -- access -------------------------------------------------------------------------
    @property
    def keys(self) -> List[str]:
        return list(self.tiles)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tiles)

    def _disk_cache_path(self, key: str, kind: str) -> Optional[str]:
        if not self.cache_dir:
            return None
        info = self.tiles[key]
        paths = list(info.bands.values()) if kind == "image" else [info.label or ""]
        h = hashlib.sha1()
        for p in paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}|{self.label_mode}".encode())
        return os.path.join(self.cache_dir, f"{kind}-{h.hexdigest()[:20]}.npy")

    def _cached(self, key: str, kind: str, make) -> np.ndarray:
        path = self._disk_cache_path(key, kind)
        if path and os.path.exists(path):
            try:
                return np.load(path)
            except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt
                pass
        arr = make()
        if path:
            atomic_write_with(path, lambda tmp: np.save(tmp, arr))
        return arr

    def image(self, key: str) -> np.ndarray:
        """float32 (C, H, W); invalid pixels (NaN/inf/nodata) are NaN."""
        if key not in self._images:
            self._images[key] = self._cached(key, "image", lambda: self._read_image(key))
        return self._images[key]

    def label(self, key: str) -> np.ndarray:
        """uint8 (H, W) class ids."""
        if key not in self._labels:
            self._labels[key] = self._cached(key, "label", lambda: self._read_label(key))
        return self._labels[key]

    def _read_image(self, key: str) -> np.ndarray:
        info = self.tiles[key]
        dtypes: List[str] = []
        try:
            img = read_tile(info.bands, self.bands, reader=read_raster, dtypes=dtypes)
        except BandShapeError as exc:
            raise DataError(f"tile {key!r}: {exc}") from exc
        info.shape = img.shape[1:]
        info.dtypes = dtypes
        info.invalid_pixels = int(np.isnan(img).any(axis=0).sum())
        if info.invalid_pixels:
            log.info("tile %s: %d invalid pixels (filled by the normalisation rule)", key, info.invalid_pixels)
        return img

    def _read_label(self, key: str) -> np.ndarray:
        info = self.tiles[key]
        if info.label is None:
            raise DataError(f"tile {key!r} has no label")
        raw, _ = read_raster(info.label)
        lab = decode_label(raw, info.label, self.label_mode)
        shape = self.image(key).shape[1:]
        if lab.shape != shape:
            raise DataError(
                f"{info.label}: label is {lab.shape[0]}x{lab.shape[1]} but the bands are "
                f"{shape[0]}x{shape[1]}; masks must match the band grid."
            )
        return lab

    def shape(self, key: str) -> Tuple[int, int]:
        return tuple(self.label(key).shape) if self.has_labels else tuple(self.image(key).shape[1:])

    def class_pixels(self, key: str) -> np.ndarray:
        n = len(self.class_names)
        return np.bincount(self.label(key).reshape(-1), minlength=n)[:n]
