"""Tile discovery and TIFF I/O with fallbacks that survive the platform's environment.

The platform's tifffile has no ``imagecodecs``, so LZW-compressed GeoTIFFs fail there;
OpenCV and PIL decode them. Readers are tried in that order.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .atomic import atomic_write_bytes

log = logging.getLogger("glacier.tiles")

BAND_FOLDERS: Tuple[str, ...] = ("Band1", "Band2", "Band3", "Band4", "Band5")
TIFF_SUFFIXES: Tuple[str, ...] = (".tif", ".tiff")
_GRID_RE = re.compile(r"(\d+_\d+)$")
_DIGITS_RE = re.compile(r"(\d+)")
# GDAL stores the nodata value as ASCII in this private TIFF tag.
_GDAL_NODATA_TAG = 42113


class TileReadError(RuntimeError):
    """A band file could not be decoded by any reader."""


class BandShapeError(TileReadError):
    """The bands of one tile do not share one grid."""


def is_tiff(name: str) -> bool:
    return name.lower().endswith(TIFF_SUFFIXES)


def tile_key(filename: str) -> str:
    """Key shared by all band files of one tile.

    Training tiles carry different names per band folder but end in the same grid id
    (``B2_B2_masked_02_07.tif`` and ``Y_output_resized_02_07.tif`` share ``02_07``);
    test tiles share the whole stem (``img001.tif``).
    """
    stem = os.path.splitext(os.path.basename(filename))[0]
    m = _GRID_RE.search(stem)
    return m.group(1) if m else stem


def tile_id(filename: str) -> str:
    """The platform's id for a tile: grid id if present, else the numeric part of the name.

    ``img001.tif`` -> ``001``; ``B2_B2_masked_02_07.tif`` -> ``02_07``; a name with no
    digits keeps its stem.
    """
    stem = os.path.splitext(os.path.basename(filename))[0]
    m = _GRID_RE.search(stem)
    if m:
        return m.group(1)
    digits = _DIGITS_RE.findall(stem)
    return digits[-1] if digits else stem


def _nodata_from_tifffile(tif) -> Optional[float]:
    try:
        tag = tif.pages[0].tags.get(_GDAL_NODATA_TAG)
        if tag is None:
            return None
        value = tag.value
        if isinstance(value, bytes):
            value = value.decode("ascii", "ignore")
        value = str(value).strip().strip("\x00")
        return float(value) if value else None
    except Exception:  # noqa: BLE001 - nodata is best effort
        return None


def _squeeze_band(arr: np.ndarray, path: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3:
        # (1,H,W) or (H,W,1): a single band stored with a channel axis.
        if arr.shape[0] == 1:
            arr = arr[0]
        elif arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            raise TileReadError(
                f"{path}: expected one band per file, found an array of shape {arr.shape}; "
                "store each band in its own Band1..Band5 file"
            )
    if arr.ndim != 2:
        raise TileReadError(f"{path}: expected a 2-D band, found shape {arr.shape}")
    return arr


def read_band(path: str) -> Tuple[np.ndarray, Optional[float]]:
    """Read one single-band TIFF. Returns (array with its stored dtype, nodata value or None).

    Tries tifffile, then OpenCV (``IMREAD_UNCHANGED`` keeps uint16/float32), then PIL.
    """
    errors: List[str] = []
    nodata: Optional[float] = None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            nodata = _nodata_from_tifffile(tif)
            arr = tif.asarray()
        return _squeeze_band(arr, path), nodata
    except TileReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - fall through to the next reader
        errors.append(f"tifffile: {exc}")
    try:
        import cv2

        arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if arr is not None:
            return _squeeze_band(arr, path), nodata
        errors.append("cv2: could not decode")
    except TileReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        errors.append(f"cv2: {exc}")
    try:
        from PIL import Image

        with Image.open(path) as img:
            arr = np.array(img)
        return _squeeze_band(arr, path), nodata
    except TileReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        errors.append(f"PIL: {exc}")
    raise TileReadError(
        f"cannot read {path}: " + "; ".join(errors)
        + ". Check that the file is a complete single-band TIFF (re-export or re-download it)."
    )


def read_tile(paths: Mapping[str, str], bands: Tuple[str, ...] = BAND_FOLDERS,
              reader: Callable[[str], Tuple[np.ndarray, Optional[float]]] = read_band,
              dtypes: Optional[List[str]] = None) -> np.ndarray:
    """Read the bands of one tile into a float32 (C, H, W) array.

    Invalid pixels (the file's nodata value, +-inf) become NaN, for the normalisation to
    fill. ``reader`` maps a path to (array, nodata): the runtime's fallback chain by
    default, rasterio in training. ``dtypes``, if given, receives each band's stored dtype.
    """
    arrays = []
    for band in bands:
        if band not in paths:
            raise TileReadError(f"tile is missing {band} (have {sorted(paths)})")
        raw, nodata = reader(paths[band])
        if dtypes is not None:
            dtypes.append(str(raw.dtype))
        arr = raw.astype(np.float32)
        if nodata is not None and np.isfinite(nodata):
            arr[arr == np.float32(nodata)] = np.nan
        arr[~np.isfinite(arr)] = np.nan
        arrays.append(arr)
    if len({a.shape for a in arrays}) != 1:
        detail = "; ".join(f"{paths[b]}: {a.shape[0]}x{a.shape[1]}" for b, a in zip(bands, arrays))
        raise BandShapeError(f"band shapes differ ({detail}). All bands of a tile must share one grid; "
                             "resample the odd band or remove the tile.")
    return np.stack(arrays, axis=0)


BandSource = Union[str, os.PathLike, Mapping[str, str]]


def band_dirs(source: BandSource, bands: Tuple[str, ...] = BAND_FOLDERS) -> Dict[str, str]:
    """Resolve a data folder or a ``{band_folder_name: folder}`` dict to band folders.

    Folder names match case-insensitively, so ``band1`` works as well as ``Band1``.
    """
    if isinstance(source, Mapping):
        found = {str(k).lower(): str(v) for k, v in source.items()}
    else:
        root = os.fspath(source)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"input folder {root} does not exist")
        found = {
            name.lower(): os.path.join(root, name)
            for name in os.listdir(root)
            if os.path.isdir(os.path.join(root, name))
        }
    out: Dict[str, str] = {}
    for band in bands:
        if band.lower() in found:
            out[band] = found[band.lower()]
    return out


def scan_tiffs(folder: str) -> Tuple[Dict[str, str], List[str]]:
    """``{tile key: path}`` of the TIFFs in one folder, and the problems seen: stray
    non-TIFF files (ignored) and duplicate keys (the first file in name order is kept)."""
    entries: Dict[str, str] = {}
    problems: List[str] = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if not os.path.isfile(full) or name.startswith("."):
            continue
        if not is_tiff(name):
            problems.append(f"ignored non-TIFF file {full}")
            continue
        key = tile_key(name)
        if key in entries:
            problems.append(f"duplicate tile key {key!r} in {folder}: {entries[key]} and {full}")
            continue
        entries[key] = full
    return entries, problems


def list_tiles(
    source: BandSource, bands: Tuple[str, ...] = BAND_FOLDERS
) -> Tuple[Dict[str, Dict[str, str]], List[str]]:
    """Match band files across folders by tile key.

    Returns ``({key: {band: path}}, problems)``. ``problems`` lists stray files and tiles
    missing a band; a caller decides whether these are fatal. Tile order follows the
    first band folder's sorted file names.
    """
    dirs = band_dirs(source, bands)
    problems: List[str] = []
    missing = [b for b in bands if b not in dirs]
    if missing:
        raise FileNotFoundError(
            f"band folders {missing} not found in {source!r}; expected sub-folders "
            f"{list(bands)} each holding one .tif per tile"
        )
    per_band: Dict[str, Dict[str, str]] = {}
    for band in bands:
        per_band[band], found = scan_tiffs(dirs[band])
        problems += found
    keys: List[str] = list(per_band[bands[0]])
    for band in bands[1:]:
        keys += [k for k in per_band[band] if k not in keys]
    tiles: Dict[str, Dict[str, str]] = {}
    for key in keys:
        paths = {b: per_band[b][key] for b in bands if key in per_band[b]}
        if len(paths) != len(bands):
            lacking = [b for b in bands if b not in paths]
            problems.append(f"tile {key!r} is missing {lacking}")
        tiles[key] = paths
    return tiles, problems


def write_mask(path: str, mask: np.ndarray) -> None:
    """Write a uint8 mask as an uncompressed TIFF, atomically."""
    import io as _io

    import tifffile

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    buf = _io.BytesIO()
    tifffile.imwrite(buf, mask)
    atomic_write_bytes(path, buf.getvalue())
