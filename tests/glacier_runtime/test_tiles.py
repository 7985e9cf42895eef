"""Reading tiles: keys and platform ids from file names, unreadable files named, a declared size
too large refused before decoding, one float buffer per tile, the OpenCV fallback for LZW tiles."""
import os
import sys
import tracemalloc

import numpy as np
import pytest

from glacier_runtime.tiles import TileReadError, read_band, tile_id, tile_key
from glacier_submit.sandbox import run_bundle

from tests.helpers import huge_tiff, write_test_folder


def test_tile_keys_and_platform_ids():
    assert tile_key("B2_B2_masked_02_07.tif") == "02_07"
    assert tile_key("Y_output_resized_02_07.tif") == "02_07"
    assert tile_key("img001.tif") == "img001"
    assert tile_id("img001.tif") == "001"
    assert tile_id("B10_B10_masked_02_07.tif") == "02_07"
    assert tile_id("scene.tif") == "scene"


def test_garbage_file_runtime_reader(tmp_path):
    p = tmp_path / "x.tif"
    p.write_bytes(b"not a tiff at all")
    with pytest.raises(TileReadError, match="x.tif"):
        read_band(str(p))


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


def test_read_tile_holds_one_float_buffer(tmp_path):
    """read_tile fills one (C, H, W) float32 buffer: peak ~ 1x the result, not 2x (list + stack)."""
    from glacier_runtime.tiles import list_tiles, read_tile

    root = write_test_folder(str(tmp_path / "d"), n=1, size=(400, 500))
    paths = list_tiles(root)[0]["img001"]
    tracemalloc.start()
    try:
        out = read_tile(paths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (5, 400, 500) and peak < 1.5 * out.nbytes


def test_lzw_tile_read_through_opencv_fallback_in_sandbox(setup, messy_test_data, tmp_path):
    from glacier_runtime.entry import predict_folder
    from glacier_runtime.predictor import Predictor, load_payload

    bundle, _, _, _ = setup
    res = run_bundle(bundle, messy_test_data, "imagepath", str(tmp_path / "m"), timeout=300)
    assert res.ok, res.tail()
    assert "img005.tif: decoded with OpenCV" in res.stderr  # the LZW tile: tifffile failed, cv2 read it
    ref = predict_folder(Predictor.from_payload(load_payload(os.path.join(bundle, "model.pth")), device="cpu"),
                         messy_test_data, None, progress=False)
    assert np.array_equal(res.masks["005"], ref["005"])
