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

from .atomic import remove_stale_temps
from .tiles import (BAND_FOLDERS, TileReadError, TileTooLargeError, band_shape, list_tiles, read_tile, tile_ids,
                    write_mask)

log = logging.getLogger("glacier.runtime")

#: Folder of the rendered solution.py; the bundle sets it at import time.
BUNDLE_DIR: Optional[str] = None
#: model.pth bytes embedded in a --single-file bundle (used when no model.pth is found).
EMBEDDED_MODEL: Optional[bytes] = None
MODEL_FILE = "model.pth"
_PREDICTORS: Dict[str, Any] = {}


def default_model_path() -> str:
    """The bundle's own model.pth, beside solution.py; never one from the working directory."""
    candidate = os.path.join(BUNDLE_DIR, MODEL_FILE) if BUNDLE_DIR else None
    if candidate and os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"{MODEL_FILE} not found beside solution.py ({candidate or 'no bundle folder known'}); "
        "put model.pth beside solution.py or pass its path as the second argument"
    )


def get_predictor(model_path: Optional[str] = None):
    """The predictor of ``model_path``, else of the embedded weights (``--single-file``),
    else of model.pth beside solution.py. Loaded with weights_only=True (never unpickled)."""
    from .predictor import Predictor, load_payload

    device = os.environ.get("GLACIER_DEVICE") or None
    backend = os.environ.get("GLACIER_BACKEND", "auto")
    if model_path is None and EMBEDDED_MODEL is not None:
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
    """(H, W) from the first band header that reads (nothing decoded), else None."""
    for p in paths.values():
        try:
            return band_shape(p)
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


def _predict_tile(predictor, key: str, paths: Mapping[str, str]):
    """(mask or None, how): ``ok``, ``fallback`` (a lesser prediction or background) or
    ``failed`` (no band readable, or too large). Never raises for a bad tile."""
    first = paths.get("Band1") or next(iter(paths.values()))
    try:
        image = read_tile(paths, BAND_FOLDERS)
        mask, note = predictor.predict_pixels_safe(image, name=os.path.basename(first))
        del image
        return mask, ("fallback" if note else "ok")
    except TileTooLargeError as exc:
        log.error("%s: %s; no mask for this tile", key, exc)
        return None, "failed"
    except (TileReadError, OSError, ValueError, MemoryError) as exc:
        what = "out of memory reading it" if isinstance(exc, MemoryError) else str(exc)
        shape = _tile_shape(paths)
        if shape is None:
            log.error("%s: no band of this tile can be read (%s); skipped", key, what)
            return None, "failed"
        log.warning("%s: %s; writing background", key, what)
        return np.zeros(shape, np.uint8), "fallback"


def _adapt(predictor, tiles) -> None:
    """Test-time batch-norm adaptation on every readable tile (read once per member and
    again for prediction, so no more than one tile is held). Never raises: a failure keeps
    the trained statistics."""
    warned = set()

    def images():
        for key, paths in tiles.items():
            try:
                yield read_tile(paths, BAND_FOLDERS)
            except Exception as exc:  # noqa: BLE001 - a bad tile is dealt with when it is predicted
                if key not in warned:
                    warned.add(key)
                    log.warning("%s: not read for batch-norm adaptation (%s)", key, exc)

    try:
        t0 = time.time()
        predictor.adapt_bn(images)
        log.info("batch-norm adaptation took %.1f s", time.time() - t0)
    except Exception as exc:  # noqa: BLE001 - adaptation is an improvement, never a reason to fail
        log.error("batch-norm adaptation stopped (%s); members not adapted keep their trained statistics", exc)


def _prepare_out(out_dir: Optional[str]) -> None:
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for stale in remove_stale_temps(out_dir):
            log.warning("removed a temporary file left by an earlier, killed run: %s", stale)


def predict_folder(predictor, imagepath: Union[str, Mapping[str, str]], out_dir: Optional[str] = None,
                   progress: bool = True, report: Optional[Dict[str, Any]] = None) -> Dict[str, np.ndarray]:
    """Predict every tile of a folder or band dict; one bad tile never aborts the run.

    Returns ``{tile_id: uint8 mask}``; writes masks named as the Band1 files if ``out_dir``.
    A tile that cannot be read, is too large, runs out of memory or whose mask cannot be
    written is a per-tile failure with a log line; ``report`` (if given) receives
    ``{"tiles", "ok", "fallback": [...], "failed": [...]}`` and the run ends with the count.
    Two tiles with one platform id are an error naming both files, before any prediction.
    """
    tiles, problems = list_tiles(imagepath, BAND_FOLDERS)
    for p in problems:
        log.warning(p)
    ids = tile_ids(tiles)
    _prepare_out(out_dir)
    results: Dict[str, np.ndarray] = {}
    fallback: list = []
    failed: list = []
    start = time.time()
    if getattr(predictor.cfg, "adapt", None) == "bn":
        _adapt(predictor, tiles)
    items = _progress(tiles.items(), len(tiles)) if progress else tiles.items()
    for key, paths in items:
        mask, how = _predict_tile(predictor, key, paths)
        if mask is None:
            failed.append(key)
            continue
        results[ids[key]] = mask
        if out_dir:
            first = paths.get("Band1") or next(iter(paths.values()))
            try:
                write_mask(os.path.join(out_dir, os.path.basename(first)), mask)
            except (OSError, MemoryError, ValueError) as exc:
                log.error("%s: cannot write its mask to %s (%s); counted as failed", key, out_dir, exc)
                failed.append(key)
                continue
        if how == "fallback":
            fallback.append(key)
    ok = len(tiles) - len(fallback) - len(failed)
    log.info("predicted %d tiles in %.1f s", len(results), time.time() - start)
    line = f"{len(tiles)} tiles: {ok} ok, {len(fallback)} fell back, {len(failed)} failed"
    (log.warning if (fallback or failed) else log.info)(
        line + (f" (failed: {', '.join(failed)})" if failed else ""))
    if report is not None:
        report.update(tiles=len(tiles), ok=ok, fallback=list(fallback), failed=list(failed), summary=line)
    return results


def maskgeration(imagepath: Union[str, Mapping[str, str]], out_dir: Optional[str] = None,
                 model_path: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Predict every tile; returns ``{tile_id: uint8 mask}`` and writes masks if given a folder.
    The second argument is an output folder, or the path of model.pth (then nothing is
    written); ``model_path`` names the weights explicitly."""
    if out_dir is not None and os.path.isfile(os.fspath(out_dir)):
        model_path, out_dir = os.fspath(out_dir), None
    return predict_folder(get_predictor(model_path), imagepath, out_dir)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Glacier segmentation submission")
    parser.add_argument("--imagepath", type=str, help="folder with Band1..Band5 sub-folders")
    parser.add_argument("--output", type=str, help="folder for the predicted masks")
    parser.add_argument("--model_path", "--model-path", dest="model_path", type=str,
                        help="model.pth to use (default: the one beside solution.py)")
    parser.add_argument("--data", type=str, help="(earlier template) folder with band sub-folders")
    parser.add_argument("--masks", type=str, help="(earlier template) ground-truth folder, unused here")
    parser.add_argument("--out", type=str, help="(earlier template) folder for the predicted masks")
    return parser


def main(argv=None) -> None:
    """The organisers' entry point. Arguments it does not know are reported and ignored:
    harnesses pass extra ones (``--model_path FILE`` is known), and dying on them costs the run."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if unknown:
        log.warning("ignoring arguments this solution.py does not know: %s", " ".join(unknown))
    model = args.model_path
    if model is not None and not os.path.isfile(model):
        log.warning("--model_path %s is not a file; using the model.pth beside solution.py", model)
        model = None
    if args.data:
        band_dict = {name: os.path.join(args.data, name) for name in sorted(os.listdir(args.data))
                     if os.path.isdir(os.path.join(args.data, name))}
        maskgeration(band_dict, args.out or args.output, model)
    elif args.imagepath:
        maskgeration(args.imagepath, args.output or args.out, model)
    else:
        parser.error("pass --imagepath DIR --output DIR (or --data DIR --out DIR)")
