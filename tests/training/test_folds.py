"""Spatial folds: disjoint, complete, deterministic, grid blocks kept together, rare classes spread."""
import numpy as np
import pytest

from training.folds import make_folds, spatial_groups


def _counts(n_rows=5, n_cols=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for r in range(n_rows):
        for c in range(n_cols):
            lake = int(rng.random() < 0.3) * int(rng.integers(10, 100))
            out[f"{r:02d}_{c:02d}"] = [1000, 300, int(rng.integers(0, 80)), lake]
    return out


def test_folds_disjoint_complete_deterministic():
    counts = _counts()
    a = make_folds(counts, k=5, seed=1, block=2)
    b = make_folds(counts, k=5, seed=1, block=2)
    assert a == b
    vals = [t for f in a["folds"] for t in f["val"]]
    assert sorted(vals) == sorted(counts) and len(vals) == len(set(vals))
    for f in a["folds"]:
        assert set(f["train"]) | set(f["val"]) == set(counts)
        assert not set(f["train"]) & set(f["val"])
        assert f["val"]


def test_folds_keep_grid_blocks_together():
    a = make_folds(_counts(), k=4, seed=0, block=2)
    fold_of = {t: f["fold"] for f in a["folds"] for t in f["val"]}
    groups = spatial_groups(list(fold_of), 2)
    for t, g in groups.items():
        assert all(fold_of[u] == fold_of[t] for u, h in groups.items() if h == g)
    # 00_00 and 01_01 share a 2x2 block
    assert fold_of["00_00"] == fold_of["01_01"]


def test_folds_spread_rare_classes():
    counts = {f"{i:02d}_00": [1000, 200, 0, 0] for i in range(10)}
    for i in (0, 3, 6, 9, 7):
        counts[f"{i:02d}_00"][3] = 50  # five lake tiles
    a = make_folds(counts, k=5, seed=0, block=1)
    lakes_per_fold = [f["val_class_pixels"][3] > 0 for f in a["folds"]]
    assert all(lakes_per_fold)


def test_folds_too_few_groups():
    with pytest.raises(ValueError, match="spatial groups"):
        make_folds({"00_00": [1, 1, 0, 0], "00_01": [1, 0, 0, 0]}, k=5, block=2)


def test_non_grid_ids_are_own_groups():
    g = spatial_groups(["img001", "img002", "03_04"], 2)
    assert g["img001"] != g["img002"] and g["03_04"] == "g1_2"
