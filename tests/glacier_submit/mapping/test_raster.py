"""Reading a scene's bands together: one grid or a named refusal, an unreadable file named,
the valid-pixel rule."""
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from glacier_submit.mapping.raster import SceneReader
from glacier_submit.mapping.scene import SceneError

from tests.helpers import write_band_tif as _tif


def test_bands_off_one_grid_are_refused(tmp_path):
    folder = str(tmp_path)
    _tif(os.path.join(folder, "a.tif"))
    _tif(os.path.join(folder, "b.tif"), transform=from_origin(300015, 3100000, 30, 30))
    with pytest.raises(SceneError, match="b.tif.*not on the grid of .*a.tif.*gdalwarp"):
        SceneReader([os.path.join(folder, "a.tif"), os.path.join(folder, "b.tif")])


def test_unreadable_band_is_named(tmp_path):
    bad = tmp_path / "blue.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(SceneError, match="blue.tif: cannot be read as a GeoTIFF"):
        SceneReader([str(bad)])


def test_validity_follows_fill_nodata_and_nan(tmp_path):
    """Valid = finite, no band at its nodata value, not 0 in every band; invalid pixels read as 0."""
    a, b = str(tmp_path / "a.tif"), str(tmp_path / "b.tif")
    tr = from_origin(0, 0, 30, 30)
    with rasterio.open(a, "w", driver="GTiff", height=1, width=4, count=1, dtype="float32", crs="EPSG:32645",
                       transform=tr, nodata=-9999) as ds:
        ds.write(np.array([[0, 5, -9999, np.nan]], np.float32), 1)
    with rasterio.open(b, "w", driver="GTiff", height=1, width=4, count=1, dtype="float32", crs="EPSG:32645",
                       transform=tr) as ds:
        ds.write(np.array([[0, 0, 7, 7]], np.float32), 1)
    with SceneReader([a, b]) as r:
        img, valid = r.read((0, 1, 0, 4))
    assert valid.tolist() == [[False, True, False, False]]
    assert img[:, 0, [0, 2, 3]].tolist() == [[0, 0, 0], [0, 0, 0]] and img[:, 0, 1].tolist() == [5, 0]
