"""Synthetic scenes: deterministic, the competition layout, class shares close to the real data,
debris next to glacier; synth never overwrites files it did not write."""
import os

import numpy as np
import pytest
from click.testing import CliRunner

from training.data.competition import CompetitionDataset
from training.data.synth import generate_dataset, generate_scene


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


def test_synth_refuses_a_folder_with_foreign_files(tmp_path):
    from training.cli import cli

    real = tmp_path / "data" / "train" / "Band1" / "B2_B2_masked_00_00.tif"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"real competition tile")
    args = ["synth", "--out", str(tmp_path / "data"), "--tiles", "2", "--size", "32", "32"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "did not write" in res.output and "--force" in res.output
    assert real.read_bytes() == b"real competition tile"
    assert not (tmp_path / "data" / "train" / "Band2").exists()
    res = CliRunner().invoke(cli, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert real.read_bytes() != b"real competition tile"


def test_synth_rewrites_its_own_folder(tmp_path):
    from training.cli import cli

    args = ["synth", "--out", str(tmp_path / "s"), "--tiles", "2", "--size", "32", "32", "--unseen-tiles", "1"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    res = CliRunner().invoke(cli, args)  # same command again: only its own files are there
    assert res.exit_code == 0, res.output
    (tmp_path / "s" / "train" / "notes.txt").write_text("mine")
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "train/notes.txt" in res.output
