"""Which tiles must share a fold: neighbours in the scene they were cut from.

Where a tile lay comes, in this order (``--grouping auto``): from grid ids in the names
(``..._02_07.tif``, the binary phase's), from the files' georeferencing, from a groups file
the user gives (``--groups``: JSON ``{tile: group}`` or CSV ``tile,group``), or by putting
the mosaic back together from edge continuity (training/mosaic.py). Positions are grouped
in ``block x block`` cells; a tile with no known neighbour is its own group, and the folds
command warns when every tile is.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

METHODS = ("auto", "grid", "georeferencing", "file", "edges", "none")


@dataclass
class Grouping:
    groups: Dict[str, str]        # tile key -> group id
    method: str
    detail: str                   # in words, for the command's output and folds.json
    neighbours: int = 0           # neighbour pairs known (0: nothing says which tiles touched)

    @property
    def alone(self) -> bool:
        """No tile is known to touch another and no two share a group: folds cannot keep
        neighbours together (1x1 blocks of known positions are the user's choice, not this)."""
        return not self.neighbours and len(set(self.groups.values())) == len(self.groups)


def blocks(grid: Mapping[str, Tuple[int, int]], keys, block: int) -> Dict[str, str]:
    """Tile -> ``g{row // block}_{col // block}`` (tiles without a position: their own group)."""
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    return {k: (f"g{grid[k][0] // block}_{grid[k][1] // block}" if k in grid else f"t{k}") for k in keys}


def read_groups_file(path: str, keys) -> Dict[str, str]:
    """``{tile: group}`` from JSON or a two-column CSV; every tile of the data must be named."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
        groups = {str(k): str(v) for k, v in (data.get("groups", data) if isinstance(data, dict) else {}).items()}
    except json.JSONDecodeError:
        rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].startswith("#")]
        if rows and rows[0][0].strip().lower() in ("tile", "key", "id"):
            rows = rows[1:]
        groups = {r[0].strip(): r[1].strip() for r in rows if len(r) >= 2}
    missing = sorted(set(keys) - set(groups))
    if missing:
        raise ValueError(f"--groups {path} names no group for tiles {missing[:8]}{' ...' if len(missing) > 8 else ''}: "
                         "give every tile a group (JSON {\"img001\": \"A\", ...} or CSV lines img001,A)")
    return {k: f"f{groups[k]}" for k in keys}


def georeferencing(ds) -> Dict[str, Optional[tuple]]:
    """Per tile (x0, y0, pixel width, pixel height, width, height) of its Band1 file, or None
    where the file has no CRS or an identity transform."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    out = {}
    for k, info in ds.tiles.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(info.bands["Band1"]) as src:
                t = src.transform
                ok = src.crs is not None and not t.is_identity
                out[k] = (t.c, t.f, t.a, t.e, src.width, src.height) if ok else None
    return out


def group_tiles(ds, block: int, method: str = "auto", groups_file: Optional[str] = None) -> Grouping:
    """The tiles' groups by ``method`` (see the module docstring for ``auto``)."""
    from training.folds import grid_position
    from training.mosaic import from_edges, from_georeferencing, pair_set

    if method not in METHODS:
        raise ValueError(f"--grouping must be one of {METHODS}, got {method!r}")
    keys = list(ds.keys)
    if groups_file or method == "file":
        if not groups_file:
            raise ValueError("--grouping file needs --groups FILE")
        g = read_groups_file(groups_file, keys)
        return Grouping(g, "file", f"groups from {os.path.basename(groups_file)}: {len(set(g.values()))} groups",
                        len(keys) - len(set(g.values())))
    grid = {k: grid_position(k) for k in keys}
    if method in ("auto", "grid") and all(grid.values()):
        return Grouping(blocks(grid, keys, block), "grid", f"grid ids in the file names, {block}x{block} blocks",
                        len(pair_set(grid)))
    if method == "grid":
        raise ValueError("--grouping grid: the tile names carry no grid id (row_col); use edges or --groups")
    if method in ("auto", "georeferencing"):
        lay = from_georeferencing(georeferencing(ds))
        if lay is not None:
            return Grouping(blocks(lay.grid(), keys, block), "georeferencing",
                            f"the files' georeferencing, {block}x{block} blocks", len(pair_set(lay.grid())))
        if method == "georeferencing":
            raise ValueError("--grouping georeferencing: not every tile's Band1 file has a CRS and transform")
    if method in ("auto", "edges"):
        lay = from_edges({k: ds.image(k) for k in keys})
        mosaics = len({p[0] for p in lay.positions.values()})
        return Grouping(blocks(lay.grid(), keys, block), "edges",
                        f"the mosaic rebuilt from edge continuity: {len(lay.pairs)} neighbour pairs, {mosaics} "
                        f"mosaic(s) of {len(keys)} tiles, {block}x{block} blocks", len(pair_set(lay.grid())))
    return Grouping({k: f"t{k}" for k in keys}, "none", "none: every tile its own group")
