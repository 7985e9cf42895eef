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
#: Largest tile accepted, in pixels per band (about 12000 x 12000). Checked on the file's
#: header before anything is decoded; a larger declared size is refused (docs/DATA.md).
MAX_TILE_PIXELS = 150_000_000


class TileReadError(RuntimeError):
    """A band file could not be decoded by any reader."""


class BandShapeError(TileReadError):
    """The bands of one tile do not share one grid."""


class TileTooLargeError(TileReadError):
    """A band's header declares more pixels than :data:`MAX_TILE_PIXELS`; nothing was decoded."""


class TileIdCollision(ValueError):
    """Two tiles map to one platform tile id; their masks would overwrite each other."""


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


def _check_declared(path: str, shape) -> Tuple[int, int]:
    """(H, W) of a declared page shape; refuses sizes over :data:`MAX_TILE_PIXELS`."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3 and shape[0] == 1:
        h, w = shape[1], shape[2]
    elif len(shape) >= 2:
        h, w = shape[0], shape[1]
    else:
        h, w = (shape[0] if shape else 1), 1
    pixels = 1
    for d in shape:
        pixels *= int(d)
    if pixels > MAX_TILE_PIXELS:
        raise TileTooLargeError(
            f"{path}: the file declares {'x'.join(str(int(d)) for d in shape)} = {pixels:,} pixels, over the "
            f"{MAX_TILE_PIXELS:,}-pixel limit; refused before decoding. Cut the scene into tiles "
            "(e.g. gdal_retile.py) or check that the file is not damaged.")
    return h, w


def band_shape(path: str) -> Tuple[int, int]:
    """(H, W) of a band from its header only (tifffile, else PIL); nothing is decoded.
    Raises :class:`TileTooLargeError` for sizes over the limit, :class:`TileReadError` when
    no header can be read."""
    errors: List[str] = []
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return _check_declared(path, tif.pages[0].shape)
    except TileTooLargeError:
        raise
    except Exception as exc:  # noqa: BLE001
        errors.append(f"tifffile: {exc}")
    try:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # our own limit applies, from the header
        with Image.open(path) as img:
            w, h = img.size
            bands = len(img.getbands())
        return _check_declared(path, (h, w) if bands == 1 else (h, w, bands))
    except TileTooLargeError:
        raise
    except Exception as exc:  # noqa: BLE001
        errors.append(f"PIL: {exc}")
    raise TileReadError(f"cannot read the header of {path}: " + "; ".join(errors))


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
    The declared size is checked on the header first: over :data:`MAX_TILE_PIXELS` the file
    is refused (:class:`TileTooLargeError`) before any reader decodes it.
    """
    errors: List[str] = []
    nodata: Optional[float] = None
    header_checked = False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            _check_declared(path, tif.pages[0].shape)
            header_checked = True
            nodata = _nodata_from_tifffile(tif)
            arr = tif.asarray()
        return _squeeze_band(arr, path), nodata
    except TileReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - fall through to the next reader
        errors.append(f"tifffile: {exc}")
    if not header_checked:
        try:
            band_shape(path)  # PIL reads the header without decoding
        except TileTooLargeError:
            raise
        except TileReadError:
            pass  # no header reader understood it: OpenCV's own pixel limit still applies
    try:
        import cv2

        arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if arr is not None:
            log.info("%s: decoded with OpenCV (%s)", path, errors[-1] if errors else "tifffile failed")
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
        log.info("%s: decoded with PIL (%s)", path, "; ".join(errors))
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
    out: Optional[np.ndarray] = None
    shapes: List[Tuple[int, int]] = []
    for i, band in enumerate(bands):
        if band not in paths:
            raise TileReadError(f"tile is missing {band} (have {sorted(paths)})")
        raw, nodata = reader(paths[band])
        if dtypes is not None:
            dtypes.append(str(raw.dtype))
        shapes.append(raw.shape)
        if out is None:
            # one float32 (C, H, W) buffer filled band by band: no per-band float copies, no stack
            out = np.empty((len(bands),) + raw.shape, np.float32)
        elif raw.shape != out.shape[1:]:
            for b in bands[i + 1:]:
                if b in paths:
                    shapes.append(reader(paths[b])[0].shape)
            detail = "; ".join(f"{paths[b]}: {s[0]}x{s[1]}" for b, s in zip(bands, shapes))
            raise BandShapeError(f"band shapes differ ({detail}). All bands of a tile must share one grid; "
                                 "resample the odd band or remove the tile.")
        arr = out[i]
        arr[...] = raw
        del raw
        if nodata is not None and np.isfinite(nodata):
            arr[arr == np.float32(nodata)] = np.nan
        arr[~np.isfinite(arr)] = np.nan
    if out is None:
        raise TileReadError("no bands requested")
    return out


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


def tile_ids(tiles: Mapping[str, Mapping[str, str]]) -> Dict[str, str]:
    """``{tile key: platform tile id}``; two tiles with one id are an error naming both
    files (their masks would overwrite each other and both be scored against one)."""
    ids: Dict[str, str] = {}
    owner: Dict[str, str] = {}
    for key, paths in tiles.items():
        first = paths.get(BAND_FOLDERS[0]) or next(iter(paths.values()))
        tid = tile_id(first)
        if tid in owner:
            raise TileIdCollision(
                f"tile id collision: {owner[tid]} and {first} both have the platform tile id {tid!r}; "
                "their masks would overwrite each other. Rename one of them (the id is the grid id "
                "row_col, else the last run of digits, else the whole name).")
        owner[tid] = first
        ids[key] = tid
    return ids


def write_mask(path: str, mask: np.ndarray) -> None:
    """Write a uint8 mask as an uncompressed TIFF, atomically."""
    import io as _io

    import tifffile

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    buf = _io.BytesIO()
    tifffile.imwrite(buf, mask)
    atomic_write_bytes(path, buf.getvalue())
