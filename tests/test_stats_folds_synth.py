import os

import numpy as np
import pytest

from glacier_runtime.normalize import normalize
from training.data.competition import CompetitionDataset
from training.data.synth import generate_dataset, generate_scene
from training.folds import make_folds, spatial_groups
from training.stats import compute_stats


def test_stats_robust_to_outliers_and_nan():
    rng = np.random.default_rng(0)
    img = rng.normal(10, 2, (2, 100, 100)).astype(np.float32)
    img[0, 0, :20] = 1e9
    img[1, 1, :50] = np.nan
    st = compute_stats([img], ["a", "b"])
    assert abs(st["mean"][0] - 10) < 0.2 and abs(st["std"][0] - 2) < 0.3
    assert st["hi"][0] < 100


def test_normalize_fills_invalid_with_zero_and_clips():
    st = {"mean": [1.0], "std": [2.0], "lo": [0.0], "hi": [5.0]}
    x = np.array([[[1.0, np.nan, np.inf, 100.0]]], np.float32)
    y = normalize(x, st)
    assert y.tolist() == [[[0.0, 0.0, 0.0, 2.0]]]


def test_normalize_rejects_wrong_band_count():
    with pytest.raises(ValueError, match="3 values for 2 bands"):
        normalize(np.zeros((2, 4, 4), np.float32), {"mean": [0] * 3, "std": [1] * 3, "lo": [0] * 3, "hi": [1] * 3})


def test_stats_wrong_shape():
    with pytest.raises(ValueError, match="expected"):
        compute_stats([np.zeros((3, 4, 4))], ["a", "b"])


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


def test_synth_deterministic_and_layout(tmp_path):
    a = generate_scene(2, 2, (64, 64), seed=5)
    b = generate_scene(2, 2, (64, 64), seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = generate_scene(2, 2, (64, 64), seed=6)
    assert not np.array_equal(a[0], c[0])
    ids = generate_dataset(str(tmp_path), n_tiles=3, size=(48, 80), seed=1, unseen_tiles=2)
    assert ids["train"] == ["00_00", "00_01", "01_00"] and ids["unseen"] == ["001", "002"]
    assert os.path.exists(tmp_path / "train" / "Band5" / "B10_B10_masked_01_00.tif")
    assert os.path.exists(tmp_path / "train" / "label" / "Y_output_resized_00_01.tif")
    assert os.path.exists(tmp_path / "unseen" / "Band3" / "img002.tif")
    ds = CompetitionDataset(str(tmp_path / "train"))
    assert ds.image("00_00").shape == (5, 48, 80)


def test_synth_class_shares_close_to_real():
    _, lab = generate_scene(3, 3, (256, 256), seed=0)
    share = np.bincount(lab.ravel(), minlength=4) / lab.size
    assert 0.6 < share[0] < 0.8 and 0.17 < share[1] < 0.32 and 0.025 < share[2] < 0.08
    assert 0 < share[3] < 0.01


def test_synth_debris_touches_glacier():
    import cv2

    _, lab = generate_scene(2, 2, (128, 128), seed=2)
    n, comp = cv2.connectedComponents((lab == 2).astype(np.uint8), connectivity=8)
    near_ice = cv2.dilate((lab == 1).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    for i in range(1, n):
        piece = comp == i
        # pieces cut by a masked gap may lose contact; everything else touches clean ice
        assert (piece & near_ice).any() or piece.sum() < 50


def test_synth_validates_args(tmp_path):
    with pytest.raises(ValueError, match="tiles"):
        generate_dataset(str(tmp_path), n_tiles=0)
    with pytest.raises(ValueError, match="size"):
        generate_dataset(str(tmp_path), n_tiles=1, size=(8, 8))


def test_stats_ignore_masked_zero_pixels():
    rng = np.random.default_rng(0)
    img = rng.normal(270, 3, (2, 50, 50)).astype(np.float32)
    img[:, :, :5] = 0.0  # a masked gap: zero in every band
    st = compute_stats([img], ["a", "b"])
    assert abs(st["mean"][1] - 270) < 0.5 and st["std"][1] < 4 and st["lo"][1] > 250
    raw = compute_stats([img], ["a", "b"], ignore_masked=False)
    assert raw["std"][1] > 50
