"""Synthetic scenes: deterministic, the competition layout, class shares close to the real data,
debris next to glacier; synth never overwrites files it did not write."""
import os

import numpy as np
import pytest
from click.testing import CliRunner

from training.data.competition import CompetitionDataset
from training.data.synth import generate_dataset, generate_scene


def test_synth_deterministic_and_layouts(tmp_path):
    """Phase 2 by default: one name in every folder, labels/, numbered in a shuffled order,
    float32 DNs and uint8 labels; the grid layout keeps the binary phase's names; the marker
    says where every tile lay."""
    import json

    import tifffile

    a = generate_scene(2, 2, (64, 64), seed=5)
    b = generate_scene(2, 2, (64, 64), seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    ids = generate_dataset(str(tmp_path / "p2"), n_tiles=4, size=(48, 80), seed=1, unseen_tiles=2)
    assert ids["train"] == ["001", "002", "003", "004"] and ids["unseen"] == ["001", "002"]
    for folder in ("Band1", "Band5", "labels"):
        assert sorted(os.listdir(tmp_path / "p2" / "train" / folder)) == [f"img00{i}.tif" for i in range(1, 5)]
    band = tifffile.imread(str(tmp_path / "p2" / "train" / "Band1" / "img001.tif"))
    lab = tifffile.imread(str(tmp_path / "p2" / "train" / "labels" / "img001.tif"))
    assert band.dtype == np.float32 and band.max() > 1000 and lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 85, 170, 255}
    marker = json.load(open(tmp_path / "p2" / ".glacier-synth.json"))
    pos = {k: tuple(v) for k, v in marker["tiles"].items() if k.startswith("train/")}
    assert sorted(pos.values()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [k for k, v in sorted(pos.items(), key=lambda kv: kv[1])] != sorted(pos)  # numbering is shuffled
    grid = generate_dataset(str(tmp_path / "g"), n_tiles=3, size=(48, 80), seed=1, layout="grid")
    assert grid["train"] == ["00_00", "00_01", "01_00"]
    assert os.path.exists(tmp_path / "g" / "train" / "Band5" / "B10_B10_masked_01_00.tif")
    assert os.path.exists(tmp_path / "g" / "train" / "label" / "Y_output_resized_00_01.tif")
    ds = CompetitionDataset(str(tmp_path / "g" / "train"))
    assert ds.image("00_00").shape == (5, 48, 80)


def test_synth_class_shares_close_to_real():
    """The Phase-2 training set: background 69.6 %, glacier 25.4 %, debris 4.9 %, lake 0.05 %."""
    _, lab = generate_scene(3, 3, (256, 256), seed=0)
    share = np.bincount(lab.ravel(), minlength=4) / lab.size
    assert 0.62 < share[0] < 0.78 and 0.18 < share[1] < 0.32 and 0.02 < share[2] < 0.08
    assert 0 < share[3] < 0.005


def test_synth_debris_lies_on_ice():
    """Debris-covered ice is part of a glacier: every debris piece touches clean ice or lies
    within a few pixels of it (labels are drawn coarser and shifted)."""
    import cv2

    _, lab = generate_scene(2, 2, (128, 128), seed=2)
    n, comp = cv2.connectedComponents((lab == 2).astype(np.uint8), connectivity=8)
    near_ice = cv2.dilate((lab == 1).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    for i in range(1, n):
        piece = comp == i
        assert (piece & near_ice).any() or piece.sum() < 50


@pytest.mark.slow
def test_default_training_set_matches_the_phase2_facts(tmp_path):
    """25 tiles of 512 x 512: class shares within a few points of the real set's, at least 10
    tiles without a lake pixel, about a thousand lake pixels, band means DN-like (~20,000)."""
    from training.data.inspection import inspect_dataset

    generate_dataset(str(tmp_path), n_tiles=25, size=(512, 512), seed=0)
    ds = CompetitionDataset(str(tmp_path / "train"))
    counts = np.array([ds.class_pixels(k) for k in ds.keys])
    share = counts.sum(0) / counts.sum()
    assert np.all(np.abs(share - np.array([0.696, 0.254, 0.049, 0.0005])) < [0.04, 0.04, 0.025, 0.001]), share
    assert (counts[:, 3] == 0).sum() >= 10 and 300 < counts[:, 3].sum() < 4000
    report = inspect_dataset(ds)
    assert not report["errors"]
    means = np.array([ds.image(k)[:4][:, (ds.image(k) != 0).any(0)].mean(1) for k in ds.keys]).mean(0)
    assert np.all((10_000 < means) & (means < 30_000)), means


def test_synth_validates_args(tmp_path):
    with pytest.raises(ValueError, match="tiles"):
        generate_dataset(str(tmp_path), n_tiles=0)
    with pytest.raises(ValueError, match="size"):
        generate_dataset(str(tmp_path), n_tiles=1, size=(8, 8))


def test_synth_refuses_a_folder_with_foreign_files(tmp_path):
    from training.cli import cli

    real = tmp_path / "data" / "train" / "Band1" / "img001.tif"  # a real Phase-2 tile where synth writes one
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
