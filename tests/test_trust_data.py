"""Bad input at scale and runs that cannot lose files (issue 13, items 10, 12, 13)."""
import os
import shutil
import sys
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn
from click.testing import CliRunner

from glacier_runtime.backends import TorchRunner
from glacier_runtime.normalize import identity_stats
from glacier_runtime.predictor import Member, Predictor
from glacier_runtime.tiles import read_band

BANDS = ("Band1", "Band2", "Band3", "Band4", "Band5")


def _predictor(**inference):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(5, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    return Predictor([Member(TorchRunner(net, "cpu", fold_bn=False), identity_stats(5), n_classes=4)], inference)


def huge_tiff(path: str, side: int = 40000) -> str:
    """A ~300-byte deflate TIFF whose header declares side x side pixels."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as t:
        tags = t.pages[0].tags
        tags["ImageWidth"].overwrite(side)
        tags["ImageLength"].overwrite(side)
        tags["RowsPerStrip"].overwrite(side)
    return path


def _test_folder(root: str, n: int = 3, size=(40, 44)) -> str:
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        for b in BANDS:
            os.makedirs(os.path.join(root, b), exist_ok=True)
            tifffile.imwrite(os.path.join(root, b, f"img{i:03d}.tif"), rng.random(size).astype(np.float32))
    return root


# ---- item 13: declared size checked before decoding; large tiles block by block ---------------------------------

def test_huge_declared_size_refused_before_decoding(tmp_path):
    from glacier_runtime.tiles import MAX_TILE_PIXELS, TileTooLargeError, band_shape

    p = huge_tiff(str(tmp_path / "huge.tif"))
    assert os.path.getsize(p) < 1000
    tracemalloc.start()
    try:
        with pytest.raises(TileTooLargeError) as exc:
            read_band(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6  # nothing near 40000 x 40000 was allocated
    msg = str(exc.value)
    assert p in msg and "40000x40000" in msg and f"{MAX_TILE_PIXELS:,}" in msg
    with pytest.raises(TileTooLargeError):
        band_shape(p)


def test_huge_declared_size_refused_on_the_pil_header_path(tmp_path, monkeypatch):
    """Without tifffile (the OpenCV/PIL fallback path) the size is read from PIL's header first."""
    from glacier_runtime.tiles import TileTooLargeError

    p = huge_tiff(str(tmp_path / "huge.tif"))
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(TileTooLargeError, match="40000x40000"):
        read_band(p)


def test_huge_tile_is_one_failure_not_a_crash(tmp_path):
    from glacier_runtime.entry import predict_folder

    root = _test_folder(str(tmp_path / "d"))
    for b in BANDS:
        huge_tiff(os.path.join(root, b, "img009.tif"))
    report = {}
    res = predict_folder(_predictor(), root, str(tmp_path / "o"), progress=False, report=report)
    assert sorted(res) == ["001", "002", "003"] and report["failed"] == ["img009"]
    assert sorted(os.listdir(tmp_path / "o")) == ["img001.tif", "img002.tif", "img003.tif"]


def test_block_prediction_equals_whole_and_bounds_memory():
    img = np.random.default_rng(0).normal(size=(5, 700, 600)).astype(np.float32)
    peaks, ids = {}, {}
    for block in (0, 192):
        pred = _predictor(block=block, window=128)
        tracemalloc.start()
        try:
            ids[block] = pred.predict_ids(img)
            peaks[block] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert np.array_equal(ids[0], ids[192])
    per_px = {k: v / (700 * 600) for k, v in peaks.items()}
    # whole tile: ~85 B/px of working memory; by blocks: the uint8 result plus one block's working set
    assert per_px[0] > 50 and peaks[192] < 700 * 600 * 1.5 + 100 * (192 + 2 * 32) ** 2, per_px


def test_block_prediction_with_receptive_field_matches_whole():
    """A 3x3-conv net (receptive field 7): the 32-pixel block margin gives every core pixel its
    context; the crops (96 + 2 x 32) are much smaller than the 300 x 260 tile."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1))
    img = np.random.default_rng(1).normal(size=(5, 300, 260)).astype(np.float32)

    def run(block):
        m = Member(TorchRunner(net, "cpu", fold_bn=False), identity_stats(5), n_classes=4)
        return Predictor([m], {"block": block, "window": 256}).predict_ids(img)

    whole, blocks = run(0), run(96)
    assert (whole == blocks).mean() > 0.995, (whole == blocks).mean()  # window-edge blending differs slightly


def test_read_tile_holds_one_float_buffer(tmp_path):
    """read_tile fills one (C, H, W) float32 buffer: peak ~ 1x the result, not 2x (list + stack)."""
    from glacier_runtime.tiles import list_tiles, read_tile

    root = _test_folder(str(tmp_path / "d"), n=1, size=(400, 500))
    paths = list_tiles(root)[0]["img001"]
    tracemalloc.start()
    try:
        out = read_tile(paths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (5, 400, 500) and peak < 1.5 * out.nbytes


# ---- item 10: per-tile failures, a count, non-zero exit ------------------------------------------------------

def test_unwritable_mask_is_a_per_tile_failure(tmp_path, caplog):
    from glacier_runtime.entry import predict_folder

    root = _test_folder(str(tmp_path / "d"))
    out = tmp_path / "o"
    (out / "img002.tif").mkdir(parents=True)  # the mask path is taken by a folder: the write fails
    report = {}
    with caplog.at_level("WARNING"):
        predict_folder(_predictor(), root, str(out), progress=False, report=report)
    assert report["failed"] == ["img002"] and report["ok"] == 2
    assert os.path.isfile(out / "img001.tif") and os.path.isfile(out / "img003.tif")
    assert "cannot write its mask" in caplog.text and "3 tiles: 2 ok, 0 fell back, 1 failed" in caplog.text


def test_memory_error_reading_a_tile_is_a_per_tile_fallback(tmp_path, monkeypatch, caplog):
    import glacier_runtime.entry as entry

    root = _test_folder(str(tmp_path / "d"))
    real = entry.read_tile

    def boom(paths, *a, **k):
        if "img002" in paths["Band1"]:
            raise MemoryError("cannot allocate")
        return real(paths, *a, **k)

    monkeypatch.setattr(entry, "read_tile", boom)
    report = {}
    with caplog.at_level("WARNING"):
        res = entry.predict_folder(_predictor(), root, str(tmp_path / "o"), progress=False, report=report)
    assert sorted(res) == ["001", "002", "003"] and not res["002"].any()  # background, right size
    assert res["002"].shape == (40, 44) and report["fallback"] == ["img002"] and report["failed"] == []
    assert "out of memory" in caplog.text


def test_predict_cli_exits_nonzero_when_a_tile_failed(tiny_members, tmp_path):
    from glacier_submit.cli import cli

    root = _test_folder(str(tmp_path / "d"))
    out = tmp_path / "o"
    (out / "img003.tif").mkdir(parents=True)
    res = CliRunner().invoke(cli, ["predict", "--models", tiny_members[0], "--input", root, "--output", str(out),
                                   "--device", "cpu"])
    assert res.exit_code == 1 and "1 tiles failed: img003" in res.output, res.output
    assert "3 tiles: 2 ok, 0 fell back, 1 failed" in res.output
    shutil.rmtree(out / "img003.tif")
    res = CliRunner().invoke(cli, ["predict", "--models", tiny_members[0], "--input", root, "--output", str(out),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output


# ---- item 12: synth never overwrites what it did not write ---------------------------------------------------

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
