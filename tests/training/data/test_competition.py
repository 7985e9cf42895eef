"""The competition reader: layout, bands with different names, label decoding, and every bad input
(unknown label values, missing bands, shape mismatches, NaN/nodata, corrupt files, stray files)."""
import os

import numpy as np
import pytest

from glacier_runtime.tiles import TileReadError, list_tiles, read_tile
from training.data.competition import CompetitionDataset, DataError, LabelError, decode_label

from tests.helpers import make_tile, write_geotiff


def test_matches_bands_with_different_names(tmp_path):
    make_tile(str(tmp_path), "02_07")
    make_tile(str(tmp_path), "02_08", seed=1)
    ds = CompetitionDataset(str(tmp_path))
    assert ds.keys == ["02_07", "02_08"]
    img = ds.image("02_07")
    assert img.shape == (5, 40, 44) and img.dtype == np.float32
    assert set(np.unique(ds.label("02_07"))) <= {0, 1, 2, 3}


def test_test_naming_same_name_everywhere(tmp_path):
    make_tile(str(tmp_path), "001", naming="test")
    ds = CompetitionDataset(str(tmp_path))
    assert ds.keys == ["img001"]


def test_label_decoding_multiclass_and_binary():
    raw = np.array([[0, 85], [170, 255]], np.uint8)
    assert decode_label(raw, "x.tif").tolist() == [[0, 1], [2, 3]]
    assert decode_label(np.array([0, 1, 1], np.uint8), "x.tif", "binary").tolist() == [0, 1, 1]
    assert decode_label(np.array([0, 255], np.uint8), "x.tif", "binary").tolist() == [0, 1]


def test_unknown_label_values_listed_with_counts():
    raw = np.array([0, 0, 85, 100, 100, 7], np.uint8)
    with pytest.raises(LabelError) as exc:
        decode_label(raw, "lab.tif")
    msg = str(exc.value)
    assert "lab.tif" in msg and "100 (2 px)" in msg and "7 (1 px)" in msg


def test_binary_mask_in_multiclass_mode_hints_flag():
    with pytest.raises(LabelError, match="--label-mode binary"):
        decode_label(np.array([0, 1, 1], np.uint8), "lab.tif")


def test_nan_label_is_an_error():
    with pytest.raises(LabelError, match="NaN"):
        decode_label(np.array([0.0, np.nan], np.float32), "lab.tif")


def test_tile_missing_a_band_is_skipped_and_reported(tmp_path):
    make_tile(str(tmp_path), "00_00")
    make_tile(str(tmp_path), "00_01", seed=2)
    os.remove(tmp_path / "Band3" / "B4_B4_masked_00_01.tif")
    ds = CompetitionDataset(str(tmp_path))
    assert ds.keys == ["00_00"]
    assert any("00_01" in p and "Band3" in p for p in ds.problems)


def test_band_shapes_differ_names_files(tmp_path):
    make_tile(str(tmp_path), "00_00")
    write_geotiff(str(tmp_path / "Band4" / "B6_B6_masked_00_00.tif"), np.zeros((30, 44), np.float32))
    ds = CompetitionDataset(str(tmp_path))
    with pytest.raises(DataError) as exc:
        ds.image("00_00")
    assert "B6_B6_masked_00_00.tif: 30x44" in str(exc.value) and "differ" in str(exc.value)


def test_label_shape_mismatch(tmp_path):
    make_tile(str(tmp_path), "00_00")
    write_geotiff(str(tmp_path / "label" / "Y_output_resized_00_00.tif"), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="must match"):
        CompetitionDataset(str(tmp_path)).label("00_00")


def test_nan_and_nodata_counted(tmp_path):
    make_tile(str(tmp_path), "00_00")
    arr = np.ones((40, 44), np.float32)
    arr[0, :5] = np.nan
    arr[1, :3] = -9999
    arr[2, 0] = np.inf
    write_geotiff(str(tmp_path / "Band2" / "B3_B3_masked_00_00.tif"), arr, nodata=-9999)
    ds = CompetitionDataset(str(tmp_path))
    img = ds.image("00_00")
    assert ds.tiles["00_00"].invalid_pixels == 9
    assert np.isnan(img[1]).sum() == 9


def test_corrupt_tiff_names_file(tmp_path):
    make_tile(str(tmp_path), "00_00")
    p = tmp_path / "Band1" / "B2_B2_masked_00_00.tif"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    ds = CompetitionDataset(str(tmp_path))
    with pytest.raises(TileReadError) as exc:
        ds.image("00_00")
    assert "B2_B2_masked_00_00.tif" in str(exc.value) and "re-" in str(exc.value)


def test_empty_folder(tmp_path):
    for b in range(1, 6):
        (tmp_path / f"Band{b}").mkdir()
    (tmp_path / "label").mkdir()
    with pytest.raises(DataError, match="no complete tiles"):
        CompetitionDataset(str(tmp_path))


def test_missing_band_folders(tmp_path):
    (tmp_path / "Band1").mkdir()
    with pytest.raises(DataError, match="Band2"):
        CompetitionDataset(str(tmp_path))


def test_stray_files_ignored_with_warning(tmp_path):
    make_tile(str(tmp_path), "00_00")
    (tmp_path / "Band1" / "notes.txt").write_text("hi")
    (tmp_path / "label" / "Thumbs.db").write_text("x")
    ds = CompetitionDataset(str(tmp_path))
    assert ds.keys == ["00_00"]
    assert sum("non-TIFF" in p for p in ds.problems) == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_dtypes_and_odd_sizes(tmp_path, dtype):
    make_tile(str(tmp_path), "00_00", h=500 // 10, w=517 // 10, dtype=dtype)
    ds = CompetitionDataset(str(tmp_path))
    img = ds.image("00_00")
    assert img.shape == (5, 50, 51) and img.dtype == np.float32
    assert ds.tiles["00_00"].dtypes[0] == np.dtype(dtype).name


@pytest.mark.parametrize("compress,tiled", [("lzw", False), ("deflate", False), ("lzw", True), (None, True)])
def test_compressed_and_tiled(tmp_path, compress, tiled):
    make_tile(str(tmp_path), "00_00", compress=compress, tiled=tiled)
    ds = CompetitionDataset(str(tmp_path))
    ref = make_ref(tmp_path)
    assert np.array_equal(ds.image("00_00"), ref)
    # the runtime reader (tifffile -> OpenCV -> PIL) decodes the same pixels, LZW included
    tiles, problems = list_tiles(str(tmp_path))
    assert np.array_equal(read_tile(tiles["00_00"]), ref)


def make_ref(tmp_path):
    ref_dir = tmp_path.parent / (tmp_path.name + "_ref")
    make_tile(str(ref_dir), "00_00")
    return CompetitionDataset(str(ref_dir)).image("00_00")


def test_disk_cache_roundtrip(tmp_path):
    make_tile(str(tmp_path / "d"), "00_00")
    a = CompetitionDataset(str(tmp_path / "d"), cache_dir=str(tmp_path / "c")).image("00_00")
    assert len(os.listdir(tmp_path / "c")) == 1
    b = CompetitionDataset(str(tmp_path / "d"), cache_dir=str(tmp_path / "c")).image("00_00")
    assert np.array_equal(a, b)


def test_in_memory_cache_decodes_once(tmp_path, monkeypatch):
    make_tile(str(tmp_path), "00_00")
    ds = CompetitionDataset(str(tmp_path))
    calls = []
    orig = ds._read_image
    monkeypatch.setattr(ds, "_read_image", lambda k: calls.append(k) or orig(k))
    ds.image("00_00")
    ds.image("00_00")
    assert calls == ["00_00"]
