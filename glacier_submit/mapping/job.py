"""Map one scene: find its bands, classify, write the outputs, all into a temporary folder
renamed into place at the end, so a scene folder under ``--out`` is always complete.

``OUT/<scene>/``: ``classes.tif`` (COG, class ids, nodata 255), ``outlines.gpkg``,
``quicklook.png``, ``summary.json``. A scene whose folder is there and was mapped by the
same model is skipped; one mapped by another model is refused unless ``force``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from glacier_runtime.atomic import atomic_write_text

from .scene import SceneError, find_scene

SUMMARY = "summary.json"
#: GDAL's raster block cache while mapping, MB (each band is read once, window by window)
GDAL_CACHE_MB = 64


@dataclass(frozen=True)
class ModelSource:
    """A bundle folder (its model.pth) or member checkpoints, with the settings to override."""
    bundle: Optional[str] = None
    members: Sequence[str] = ()
    device: Optional[str] = None
    backend: str = "auto"
    overrides: Dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        files = [os.path.join(self.bundle, "model.pth")] if self.bundle else sorted(self.members)
        for p in files:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(json.dumps(self.overrides, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def load(self, block: Optional[int] = None):
        """(predictor, payload): the runtime's Predictor, as ``glacier-submit predict`` builds it;
        with ``block``, its window is the one that holds a block and its margin (:func:`scene_window`)."""
        from glacier_runtime.predictor import Predictor
        from glacier_runtime.settings import InferenceSettings
        from glacier_submit.members import payload_of

        payload = payload_of(self.bundle, self.members)
        overrides = dict(self.overrides)
        if block:
            stride = InferenceSettings.from_dict({**(payload.get("inference") or {}), **overrides}).stride
            overrides["window"] = scene_window(block, int(stride))
        pred = Predictor.from_payload(payload, device=self.device, backend=self.backend, overrides=overrides)
        return pred, payload


def scene_window(block: int, stride: int = 32) -> int:
    """The smallest window (a multiple of ``stride``) that holds a ``block`` and its context
    margin (the predictor's ``window // 8``) in one forward pass: no overlapping windows inside
    a block, so a pixel is computed 1.7 times, not 4 (1024 px blocks: windows of 1344)."""
    w = -(-(block + 2 * stride) // stride) * stride  # the margin is at least one stride
    while block + 2 * max(stride, w // 8 // stride * stride) > w:
        w += stride
    return w


@dataclass(frozen=True)
class MapOptions:
    block: int = 1024                 # pixels a side per block (working memory: docs/MAPPING.md)
    simplify: Optional[float] = None  # outline tolerance in metres; None: one pixel
    outlines: bool = True
    quicklook_side: int = 1024
    force: bool = False


def missing_extras(many: bool = False) -> Optional[str]:
    """What ``map`` lacks of its extra (None when nothing), as the line that installs it."""
    import importlib.util

    need = ["rasterio", "shapely", "pyogrio"] + (["distributed"] if many else [])
    lacking = [m for m in need if importlib.util.find_spec(m) is None]
    if not lacking:
        return None
    return (f"glacier-submit map needs {', '.join(lacking)}: pip install 'glacier-submit[map]' "
            "(or pip install -e '.[map]' in a checkout)")


def run_fingerprint(source: ModelSource, options: MapOptions) -> str:
    """What a mapped scene was made with: the model (files and settings) and the options
    that change its files (block, outline tolerance, outlines on/off)."""
    h = hashlib.sha256(source.fingerprint().encode())
    simplify = None if options.simplify is None else float(options.simplify)
    h.update(json.dumps([int(options.block), simplify, bool(options.outlines)]).encode())
    return h.hexdigest()[:16]


def finished(out: str, name: str, fingerprint: str, force: bool) -> Optional[Dict[str, Any]]:
    """The summary of scene ``name`` mapped already with this model and options (None: map
    it); one mapped otherwise is an error unless ``force``."""
    path = os.path.join(out, name, SUMMARY)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    if summary.get("model") == fingerprint:
        return summary
    if force:
        return None
    raise SceneError(f"{os.path.join(out, name)} was mapped with another model or other options (--block, --simplify, "
                     f"--no-outlines; {summary.get('model')}, this run is {fingerprint}): map into a new --out, or pass "
                     "--force to replace it")


def _remove_stale_temps(out: str, name: str) -> None:
    """Temporary folders of this scene left by a killed run (exactly ``.tmp-<name>-<pid>``;
    one task maps a scene at a time)."""
    pattern = re.compile(rf"^\.tmp-{re.escape(name)}-\d+$")
    for entry in os.listdir(out):
        if pattern.match(entry):
            shutil.rmtree(os.path.join(out, entry), ignore_errors=True)


def map_scene(scene_folder: str, out: str, source: ModelSource, options: MapOptions = MapOptions(),
              loaded=None, progress: bool = True, fingerprint: Optional[str] = None) -> Dict[str, Any]:
    """Map one scene into ``out/<scene>/``; returns its summary (``skipped: true`` when it
    was done already). ``loaded``: a (predictor, payload) to reuse; ``fingerprint``: this
    run's :func:`run_fingerprint`, computed once for many scenes."""
    fingerprint = fingerprint or run_fingerprint(source, options)
    scene = find_scene(scene_folder)
    done = finished(out, scene.name, fingerprint, options.force)
    if done is not None:
        return {**done, "skipped": True}
    pred, payload = loaded or source.load(options.block)
    final = os.path.join(out, scene.name)
    os.makedirs(out, exist_ok=True)
    _remove_stale_temps(out, scene.name)
    tmp = os.path.join(out, f".tmp-{scene.name}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        import rasterio

        # GDAL's block cache defaults to 5 % of the RAM (1.2 GB of 24 GB): bounded, as the blocks are
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 1024 * 1024):
            summary = _map_into(scene, tmp, pred, payload, options, fingerprint, progress)
        atomic_write_text(os.path.join(tmp, SUMMARY), json.dumps(summary, indent=2) + "\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "skipped": False}


def _map_into(scene, folder: str, pred, payload, options: MapOptions, fingerprint: str, progress: bool) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    from training.bands import COMPETITION_SENSOR, get_band

    from glacier_runtime.normalize import mode_of

    from .classify import build_overviews, classify_scene, radiometry_warnings
    from .outputs import COVERAGE_MAX_VERTICES, metre_crs, rgb_bands, to_cog, write_outlines, write_quicklook
    from .raster import SceneReader, pixel_area

    t0 = time.perf_counter()
    sensor = payload.get("sensor") or COMPETITION_SENSOR
    names = list(payload["bands"])
    chosen = scene.paths_for(sensor, names)
    roles = [get_band(sensor, n).role for n in names]
    class_names = list(payload.get("class_map", {}).get("names") or [])[: pred.n_classes]
    warnings: List[str] = list(scene.notes)
    if pred.cfg.adapt:
        warnings.append("adapt: the bundle's test-time batch-norm adaptation is not run on scenes (it needs a pass "
                        "over the whole scene first); the members' stored statistics are used")
    with SceneReader([p for _, p in chosen], scene.qa_pixel, scene.cloud) as reader:
        overview, valid = reader.overview(options.quicklook_side)
        warnings += radiometry_warnings(pred, overview, valid, [k for k, _ in chosen], scene.level)
        norms = pred.tile_norms(overview)  # the scene's numbers, as a large tile's
        raw = os.path.join(folder, "classes.raw.tif")
        bar = tqdm(desc=scene.name[:40], unit="block", disable=not progress, leave=False)
        try:
            counts = classify_scene(pred, reader, raw, norms, options.block, bar)
        finally:
            bar.close()
        build_overviews(raw)
        to_cog(raw, os.path.join(folder, "classes.tif"))
        os.remove(raw)
        res = abs(reader.transform.a)
        tolerance = res if options.simplify is None else float(options.simplify)
        outlines = (write_outlines(os.path.join(folder, "classes.tif"), os.path.join(folder, "outlines.gpkg"),
                                   class_names, tolerance) if options.outlines else None)
        if outlines and outlines["simplification"] == "douglas_peucker":
            warnings.append(f"outlines: over {COVERAGE_MAX_VERTICES:,} vertices, so each polygon was simplified alone "
                            "(Douglas-Peucker): neighbouring bodies may overlap along their shared edges; --simplify 0 "
                            "keeps the pixel edges, which neighbours share exactly")
        write_quicklook(os.path.join(folder, "classes.tif"), overview, valid, rgb_bands(roles),
                        os.path.join(folder, "quicklook.png"), pred.n_classes)
        t = reader.transform
        pixel_m2 = pixel_area(t) if metre_crs(reader.crs) else None
        total = reader.height * reader.width
        crs = reader.crs.to_string()
        shape = [reader.height, reader.width]
    valid_px = total - counts["nodata_pixels"]
    classes = {name: {"pixels": n, "area_km2": None if pixel_m2 is None else n * pixel_m2 / 1e6,
                      "share_of_valid": n / valid_px if valid_px else None}
               for name, n in zip(class_names, counts["class_pixels"])}
    summary = {
        "scene": scene.name, "folder": os.path.abspath(scene.folder), "product": scene.product, "level": scene.level,
        "sensor": scene.sensor, "bands": {k: {"file": os.path.basename(p), "role": r}
                                          for (k, p), r in zip(chosen, roles)},
        "crs": crs, "transform": list(t)[:6], "shape": shape, "pixel_area_m2": pixel_m2,
        "classes": classes, "nodata_share": counts["nodata_pixels"] / total,
        "cloud_share": (counts["cloud_pixels"] / valid_px if valid_px else None)
        if counts["cloud_pixels"] is not None else None,
        "cloud_source": "QA_PIXEL" if scene.qa_pixel else ("cloud.tif" if scene.cloud else None),
        "outlines": None if outlines is None else {**outlines, "simplify_m": tolerance, "connectivity": 4},
        "block": options.block, "blocks": counts["blocks"], "model": fingerprint,
        "normalisation": sorted({mode_of(m.stats) for m in pred.members}),
        "warnings": warnings, "seconds": round(time.perf_counter() - t0, 2),
    }
    return summary


def summary_line(s: Dict[str, Any]) -> str:
    if s.get("skipped"):
        return f"{s['scene']}: mapped already by this model, skipped"
    areas = ", ".join(f"{k} {v['area_km2']:.2f} km2" if v["area_km2"] is not None else f"{k} {v['pixels']} px"
                      for k, v in s["classes"].items() if k != "background")
    cloud = "cloud unknown" if s["cloud_share"] is None else f"cloud {s['cloud_share']:.1%}"
    return f"{s['scene']}: {areas}; nodata {s['nodata_share']:.1%}, {cloud} ({s['seconds']:.0f} s)"

