"""K-fold splits over tiles: spatially grouped and stratified on rare classes.

Tiles with grid ids ``row_col`` are grouped in ``block x block`` cells of the scene grid,
so neighbours in one cell never straddle train and validation. Groups are then dealt to
folds greedily, rarest-class-heaviest first, each to the fold that holds least of that
class so far (ties: fewest tiles, then a seeded shuffle). Tiles without a grid id form
their own group.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

_GRID = re.compile(r"^(\d+)_(\d+)$")


def grid_position(key: str):
    m = _GRID.match(key)
    return (int(m.group(1)), int(m.group(2))) if m else None


def spatial_groups(keys: Sequence[str], block: int) -> Dict[str, str]:
    """Tile key -> group id (``g{row//block}_{col//block}`` or the key itself)."""
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    out = {}
    for k in keys:
        pos = grid_position(k)
        out[k] = f"g{pos[0] // block}_{pos[1] // block}" if pos else f"t{k}"
    return out


def _group_counts(keys: Sequence[str], counts: np.ndarray, groups: Mapping[str, str]):
    """Per group: the class pixel counts and the tiles."""
    gids = sorted(set(groups.values()))
    gcount = {g: np.zeros(counts.shape[1]) for g in gids}
    gtiles: Dict[str, List[str]] = {g: [] for g in gids}
    for key, row in zip(keys, counts):
        gcount[groups[key]] += row
        gtiles[groups[key]].append(key)
    return gids, gcount, gtiles


def _rarest(present_counts: np.ndarray, weight: np.ndarray) -> Optional[int]:
    present = np.nonzero(present_counts > 0)[0]
    return int(max(present, key=lambda c: weight[c])) if present.size else None


def _deal(order: Sequence[str], gcount, gtiles, weight: np.ndarray, k: int, n_tiles: int, tie: np.ndarray):
    """Deal groups to folds: each to the fold with least of its rarest class so far (ties:
    fewest tiles, then ``tie``), never far over an even share of tiles."""
    fold_counts = np.zeros((k, weight.shape[0]))
    fold_tiles: List[List[str]] = [[] for _ in range(k)]
    cap = int(np.ceil(n_tiles / k)) + 1
    for g in order:
        rarest = _rarest(gcount[g], weight)

        def cost(f, g=g, rarest=rarest):
            rare = fold_counts[f][rarest] * weight[rarest] if rarest is not None else 0.0
            return (len(fold_tiles[f]) + len(gtiles[g]) > cap, rare, len(fold_tiles[f]), tie[f])

        best = min(range(k), key=cost)
        fold_counts[best] += gcount[g]
        fold_tiles[best].extend(gtiles[g])
    return fold_counts, fold_tiles


def make_folds(
    class_pixels: Mapping[str, Sequence[int]],
    k: int = 5,
    seed: int = 0,
    block: int = 2,
    class_names: Optional[Sequence[str]] = None,
    groups: Optional[Mapping[str, str]] = None,
) -> Dict:
    """Build the folds.json structure from per-tile class pixel counts; ``groups`` (tile ->
    group, training/grouping.py) replaces the grouping by grid ids in the names."""
    keys = sorted(class_pixels)
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    groups = dict(groups) if groups is not None else spatial_groups(keys, block)
    counts = np.array([class_pixels[key] for key in keys], dtype=np.float64)
    gids, gcount, gtiles = _group_counts(keys, counts, groups)
    if len(gids) < k:
        raise ValueError(
            f"only {len(gids)} spatial groups for k={k} folds (block={block}); use a smaller --block or --k"
        )
    # Rarity weight: classes with fewer pixels overall count more.
    total = counts.sum(axis=0)
    weight = np.where(total > 0, 1.0 / np.maximum(total, 1.0), 0.0)
    rng = np.random.default_rng(seed)
    order = list(gids)
    rng.shuffle(order)

    def priority(g):  # the rarest class present in each group decides its priority
        rarest = _rarest(gcount[g], weight)
        rarest = 0 if rarest is None else rarest
        return (-weight[rarest] * (gcount[g][rarest] > 0), -len(gtiles[g]))

    order.sort(key=priority)
    fold_counts, fold_tiles = _deal(order, gcount, gtiles, weight, k, len(keys), rng.permutation(k))
    folds = [{"fold": f, "val": sorted(fold_tiles[f]), "train": sorted(t for t in keys if t not in set(fold_tiles[f])),
              "val_class_pixels": [int(v) for v in fold_counts[f]]} for f in range(k)]
    return {"k": k, "seed": seed, "block": block, "class_names": list(class_names) if class_names else None,
            "groups": groups, "folds": folds}


def data_provenance(files: Mapping[str, Mapping[str, Optional[str]]]) -> Dict:
    """What folds.json was made from: the tile ids and one sha256 over every file of those
    tiles (band files and labels; names and bytes), so ``evaluate --folds`` can check that
    it is given the same data. ``files``: ``{tile key: {band or 'label': path}}``."""
    import hashlib
    import os

    total = hashlib.sha256()
    n = 0
    for key in sorted(files):
        for part in sorted(files[key]):
            path = files[key][part]
            if not path:
                continue
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            total.update(f"{key}\0{part}\0{os.path.basename(path)}\0{h.hexdigest()}\n".encode())
            n += 1
    return {"tiles": sorted(files), "files": n, "content_sha256": total.hexdigest()}


def dataset_files(ds) -> Dict[str, Dict[str, Optional[str]]]:
    """``{tile key: {band: path, 'label': path}}`` of a CompetitionDataset, for :func:`data_provenance`."""
    return {k: {**dict(info.bands), "label": info.label} for k, info in ds.tiles.items()}


def check_provenance(folds: Dict, ds, path: str) -> Optional[str]:
    """None when ``folds`` was made from ``ds`` (same tile ids, same file contents); else what
    differs. Raises ``ValueError`` naming the difference; returns a note when ``folds`` predates
    provenance (nothing to check)."""
    prov = folds.get("provenance")
    if not prov:
        return (f"{path} records no data provenance (made by an older `glacier-train folds`): cannot check it "
                "was made from this data; recreate it with `glacier-train folds DATA`")
    files = dataset_files(ds)
    if any(f.get("label") for f in files.values()):  # folds are made from labelled tiles only
        files = {k: f for k, f in files.items() if f.get("label")}
    have = data_provenance(files)
    if have["tiles"] != prov.get("tiles"):
        extra = sorted(set(have["tiles"]) - set(prov.get("tiles") or []))
        lost = sorted(set(prov.get("tiles") or []) - set(have["tiles"]))
        raise ValueError(f"{path} was made from other data than {ds.root}: tiles only here {extra[:10]}, tiles only "
                         f"in folds.json {lost[:10]}. Use the folds.json made from this folder "
                         "(`glacier-train folds DATA`).")
    if have["content_sha256"] != prov.get("content_sha256"):
        raise ValueError(f"{path} was made from the same tile ids but different file contents than {ds.root} "
                         f"(sha256 {prov.get('content_sha256', '')[:12]}... vs {have['content_sha256'][:12]}...): the "
                         "data changed since the folds were made. Recreate them with `glacier-train folds DATA` "
                         "(and retrain) or evaluate the data they were made from.")
    return None


def save_folds(folds: Dict, path: str) -> None:
    from glacier_runtime.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(folds, indent=2) + "\n").encode())


def load_folds(path: str) -> Dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"folds file {path} not found; create it with `glacier-train folds DATA`") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); recreate it with `glacier-train folds DATA`") from exc
    if "folds" not in data or not isinstance(data["folds"], list):
        raise ValueError(f"{path} has no 'folds' list; recreate it with `glacier-train folds DATA`")
    return data


def fold_split(folds: Dict, fold: int):
    for f in folds["folds"]:
        if f["fold"] == fold:
            return list(f["train"]), list(f["val"])
    raise ValueError(f"fold {fold} not in folds file (has {[f['fold'] for f in folds['folds']]})")
