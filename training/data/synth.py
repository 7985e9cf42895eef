"""The synthetic benchmark in the exact competition layout (the embedded default dataset).

Scenes come from ``training/data/scenes/`` (terrain-shaped glaciers, labels made as real
labels are, mixed pixels, shading and cast shadows, cloud, snow, lake variants, weak debris
thermal contrast, calibration and haze, Landsat-8 DNs stored as float32), one region per
scene. Each scene is cut into 512 x 512 tiles that continue each other across their
borders, as tiles cut from one Landsat scene do.

Layouts: ``phase2`` (the default, the 4-class phase's): ``Band1..Band5/img001.tif ...`` and
``labels/img001.tif`` with the same name in every folder, tiles numbered in a shuffled
order (the names tell nothing about neighbours); ``grid`` (the binary phase's): per-folder
names ending in the grid id, ``Band1/B2_B2_masked_02_07.tif`` and
``label/Y_output_resized_02_07.tif``. Where each tile lay in its scene is recorded in
``.glacier-synth.json`` (``tiles``), so grouping methods can be measured against it.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from glacier_runtime.atomic import atomic_write_with
from glacier_runtime.classes import CLASS_VALUES
from glacier_runtime.tiles import BAND_FOLDERS, tile_key
from training.data.scenes import ALL_ON, REGIONS, TRAIN_REGION, UNSEEN_REGION, Effects, Region, generate_scene

__all__ = ["ALL_ON", "REGIONS", "TRAIN_REGION", "UNSEEN_REGION", "Effects", "Region", "generate_scene",
           "generate_dataset", "write_split", "LAYOUTS"]

TRAIN_NAMES = ("B2_B2_masked_{id}.tif", "B3_B3_masked_{id}.tif", "B4_B4_masked_{id}.tif",
               "B6_B6_masked_{id}.tif", "B10_B10_masked_{id}.tif")
TRAIN_LABEL = "Y_output_resized_{id}.tif"
LAYOUTS = ("phase2", "grid")


def _write_tif(path: str, arr: np.ndarray) -> None:
    import tifffile

    atomic_write_with(path, lambda tmp: tifffile.imwrite(tmp, arr))


def _names(layout: str, r: int, c: int, number: int) -> Tuple[str, List[str], str, str]:
    """(tile id, band file names, label folder, label file name) of one tile."""
    if layout == "grid":
        tid = f"{r:02d}_{c:02d}"
        return tid, [n.format(id=tid) for n in TRAIN_NAMES], "label", TRAIN_LABEL.format(id=tid)
    tid = f"{number:03d}"
    return tid, [f"img{tid}.tif"] * 5, "labels", f"img{tid}.tif"


def write_split(out: str, n_tiles: int, size: Tuple[int, int], seed: int, region: Region,
                layout: str = "phase2", written: Optional[List[str]] = None, effects: Effects = ALL_ON,
                labels: bool = True, grid: Optional[Dict[str, Tuple[int, int]]] = None, root: Optional[str] = None,
                ) -> List[str]:
    """Write ``n_tiles`` tiles of one scene of ``region``; returns the tile ids. Appends every
    file written to ``written`` and each tile's (row, col) in its scene to ``grid`` (keyed by
    ``<split folder relative to root>/<tile key as the reader keys it>``).
    ``phase2`` numbers the tiles in a seeded shuffled order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cols = int(math.ceil(math.sqrt(n_tiles)))
    rows = int(math.ceil(n_tiles / cols))
    bands, lab = generate_scene(rows, cols, size, seed, region, effects=effects)
    numbers = np.random.default_rng(seed + 77).permutation(n_tiles) + 1
    lut = np.array(CLASS_VALUES, np.uint8)
    th, tw = size
    ids = []
    for i in range(n_tiles):
        r, c = divmod(i, cols)
        ys, xs = slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw)
        tid, names, lfolder, lname = _names(layout, r, c, int(numbers[i]))
        paths = [os.path.join(out, BAND_FOLDERS[b], names[b]) for b in range(5)]
        for b in range(5):
            _write_tif(paths[b], np.ascontiguousarray(bands[b, ys, xs]))
        if labels:
            paths.append(os.path.join(out, lfolder, lname))
            _write_tif(paths[-1], lut[lab[ys, xs]])
        if written is not None:
            written += paths
        if grid is not None:
            grid[f"{os.path.relpath(out, root) if root else os.path.basename(os.path.normpath(out))}/{tile_key(names[0])}"] = (r, c)
        ids.append(tid)
    return sorted(ids)


#: Written into every folder ``generate_dataset`` writes: the files it wrote (relative paths).
SYNTH_MARKER = ".glacier-synth.json"


class ForeignFilesError(ValueError):
    """The output folder holds files the generator did not write (e.g. real data)."""


def _our_files(out: str) -> List[str]:
    import json

    try:
        with open(os.path.join(out, SYNTH_MARKER)) as fh:
            return list(json.load(fh).get("files", []))
    except (OSError, ValueError):
        return []


def foreign_files(out: str) -> List[str]:
    """Files under ``out`` (relative paths) that no earlier ``generate_dataset`` listed in its marker."""
    if not os.path.isdir(out):
        return []
    ours = set(_our_files(out))
    found = []
    for folder, _, files in os.walk(out):
        for f in files:
            rel = os.path.relpath(os.path.join(folder, f), out)
            if rel != SYNTH_MARKER and rel not in ours:
                found.append(rel)
    return sorted(found)


def _check_out(out: str, force: bool) -> None:
    foreign = foreign_files(out)
    if foreign and not force:
        raise ForeignFilesError(
            f"{out} holds {len(foreign)} files that `glacier-train synth` did not write (e.g. "
            f"{', '.join(foreign[:3])}); synthetic tiles use the competition's file names and would overwrite "
            "them. Pick an empty or new folder, or pass --force to write into it anyway.")


def _region(name) -> Region:
    if isinstance(name, Region):
        return name
    if name not in REGIONS:
        raise ValueError(f"unknown region {name!r}; regions: {sorted(REGIONS)}")
    return REGIONS[name]


def generate_dataset(out: str, n_tiles: int = 25, size: Tuple[int, int] = (512, 512), seed: int = 0,
                     unseen_tiles: int = 0, force: bool = False, layout: str = "phase2", region=TRAIN_REGION,
                     unseen_region=UNSEEN_REGION, regions=(), effects: Effects = ALL_ON) -> Dict[str, List[str]]:
    """Write ``out/train`` (``n_tiles`` of ``region``), with ``unseen_tiles`` also ``out/unseen``
    (another region, test names), and for every name in ``regions`` ``out/regions/<name>``
    (``n_tiles`` of that region: the leave-one-region-out benchmark).

    Refuses (:class:`ForeignFilesError`) a folder holding files it did not write (real data
    shares the competition's file names and would be overwritten) unless ``force``; what it
    writes, and where each tile lay in its scene, is listed in ``out/.glacier-synth.json``."""
    import json

    from glacier_runtime.atomic import atomic_write_text

    if n_tiles < 1:
        raise ValueError(f"--tiles must be >= 1, got {n_tiles}")
    if min(size) < 32:
        raise ValueError(f"--size must be at least 32x32, got {size}")
    _check_out(out, force)
    written: List[str] = []
    grid: Dict[str, Tuple[int, int]] = {}
    train = _region(region)
    result = {"train": write_split(os.path.join(out, "train"), n_tiles, size, seed, train, layout, written, effects,
                                   grid=grid, root=out)}
    if unseen_tiles:
        result["unseen"] = write_split(os.path.join(out, "unseen"), unseen_tiles, size, seed + 10_000,
                                       _region(unseen_region), "phase2", written, effects, grid=grid, root=out)
    for k, name in enumerate(regions):
        result[f"regions/{name}"] = write_split(os.path.join(out, "regions", name), n_tiles, size,
                                                seed + 20_000 + 1_000 * k, _region(name), layout, written, effects,
                                                grid=grid, root=out)
    ours = set(_our_files(out)) | {os.path.relpath(p, out) for p in written}
    marker = {"tool": "glacier-train synth", "files": sorted(ours), "layout": layout, "train_region": train.name,
              "unseen_region": _region(unseen_region).name if unseen_tiles else None, "regions": list(regions),
              "tiles": {k: list(v) for k, v in sorted(grid.items())}}
    atomic_write_text(os.path.join(out, SYNTH_MARKER), json.dumps(marker, indent=1) + "\n")
    return result
