"""The platform's entry points: ``maskgeration`` and ``main``, for all three conventions.

1. CLI ``--imagepath DIR --output DIR``: read DIR/Band1..Band5, write one mask per tile
   named as its Band1 file.
2. CLI ``--data DIR --masks DIR --out DIR``: ``main`` builds ``{band_folder: path}`` from
   the sub-folders of ``--data`` and calls ``maskgeration(that_dict, out_dir)``.
3. Import and call ``maskgeration(band_dict, model_path)`` (the second argument is the
   path of model.pth), using the returned ``{tile_id: uint8 mask}``.

So: the first argument is a folder or a band dict; the second is an output folder unless
it is an existing file; the dict is always returned; masks are written when given a
folder; model.pth is found beside solution.py when no path is given.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from .tiles import BAND_FOLDERS, TileReadError, list_tiles, read_band, read_tile, tile_id, write_mask

log = logging.getLogger("glacier.runtime")

#: Folder of the rendered solution.py; the bundle sets it at import time.
BUNDLE_DIR: Optional[str] = None
#: model.pth bytes embedded in a --single-file bundle (used when no model.pth is found).
EMBEDDED_MODEL: Optional[bytes] = None
MODEL_FILE = "model.pth"
_PREDICTORS: Dict[str, Any] = {}


def default_model_path() -> str:
    env = os.environ.get("GLACIER_MODEL_PATH")
    candidates = [env] if env else []
    if BUNDLE_DIR:
        candidates.append(os.path.join(BUNDLE_DIR, MODEL_FILE))
    candidates.append(os.path.join(os.getcwd(), MODEL_FILE))
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"{MODEL_FILE} not found (looked in: {', '.join(c for c in candidates if c)}); "
        "put model.pth beside solution.py or pass its path as the second argument"
    )


def get_predictor(model_path: Optional[str] = None):
    from .predictor import Predictor, load_payload

    device = os.environ.get("GLACIER_DEVICE") or None
    backend = os.environ.get("GLACIER_BACKEND", "auto")
    if model_path is None and EMBEDDED_MODEL is not None:
        try:
            model_path = default_model_path()
        except FileNotFoundError:
            if "<embedded>" not in _PREDICTORS:
                import io

                _PREDICTORS["<embedded>"] = Predictor.from_payload(
                    load_payload(io.BytesIO(EMBEDDED_MODEL)), device=device, backend=backend)
            return _PREDICTORS["<embedded>"]
    path = os.path.abspath(model_path or default_model_path())
    if path not in _PREDICTORS:
        _PREDICTORS[path] = Predictor.from_payload(load_payload(path), device=device, backend=backend)
    return _PREDICTORS[path]


def _tile_shape(paths: Mapping[str, str]):
    for p in paths.values():
        try:
            return read_band(p)[0].shape
        except Exception:  # noqa: BLE001
            continue
    return None


def _progress(items, total: int):
    try:
        from tqdm import tqdm

        return tqdm(items, total=total, desc="tiles", unit="tile", file=sys.stderr,
                    disable=not sys.stderr.isatty())
    except Exception:  # noqa: BLE001
        return items


def predict_folder(predictor, imagepath: Union[str, Mapping[str, str]], out_dir: Optional[str] = None,
                   progress: bool = True) -> Dict[str, np.ndarray]:
    """Predict every tile of a folder or band dict; one bad tile never aborts the run.

    Returns ``{tile_id: uint8 mask}``; writes masks named as the Band1 files if ``out_dir``.
    """
    tiles, problems = list_tiles(imagepath, BAND_FOLDERS)
    for p in problems:
        log.warning(p)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    results: Dict[str, np.ndarray] = {}
    start = time.time()
    items = _progress(tiles.items(), len(tiles)) if progress else tiles.items()
    for key, paths in items:
        first = paths.get("Band1") or next(iter(paths.values()))
        tid = tile_id(first)
        try:
            image = read_tile(paths, BAND_FOLDERS)
            mask, _ = predictor.predict_pixels_safe(image, name=os.path.basename(first))
        except (TileReadError, OSError, ValueError) as exc:
            shape = _tile_shape(paths)
            if shape is None:
                log.error("%s: no band of this tile can be read (%s); skipped", key, exc)
                continue
            log.warning("%s: %s; writing background", key, exc)
            mask = np.zeros(shape, np.uint8)
        results[tid] = mask
        if out_dir:
            write_mask(os.path.join(out_dir, os.path.basename(first)), mask)
    log.info("predicted %d tiles in %.1f s", len(results), time.time() - start)
    return results


def maskgeration(imagepath: Union[str, Mapping[str, str]], out_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Predict every tile; returns ``{tile_id: uint8 mask}`` and writes masks if given a folder."""
    model_path = None
    if out_dir is not None and os.path.isfile(os.fspath(out_dir)):
        model_path, out_dir = os.fspath(out_dir), None
    return predict_folder(get_predictor(model_path), imagepath, out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Glacier segmentation submission")
    parser.add_argument("--imagepath", type=str, help="folder with Band1..Band5 sub-folders")
    parser.add_argument("--output", type=str, help="folder for the predicted masks")
    parser.add_argument("--data", type=str, help="(earlier template) folder with band sub-folders")
    parser.add_argument("--masks", type=str, help="(earlier template) ground-truth folder, unused here")
    parser.add_argument("--out", type=str, help="(earlier template) folder for the predicted masks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.data:
        band_dict = {name: os.path.join(args.data, name) for name in sorted(os.listdir(args.data))
                     if os.path.isdir(os.path.join(args.data, name))}
        maskgeration(band_dict, args.out or args.output)
    elif args.imagepath:
        maskgeration(args.imagepath, args.output or args.out)
    else:
        parser.error("pass --imagepath DIR --output DIR (or --data DIR --out DIR)")
