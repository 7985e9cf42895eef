"""The synthetic Landsat scene folder: USGS names, one UTM grid, fill outside a tilted
footprint in every band and in QA_PIXEL's fill bit, clouds in its cloud bits."""
import os

import numpy as np
import rasterio

from training.data.landsat import BANDS, footprint, write_landsat_scene


def test_footprint_is_tilted_and_inset():
    f = footprint(200, 300, tilt_deg=12)
    assert not f[0, 0] and not f[-1, -1] and f[100, 150]
    assert 0.6 < f.mean() < 0.8
    rows = np.flatnonzero(f.any(axis=1))
    assert f[rows[0]].argmax() != f[rows[-1]].argmax()  # first and last rows start at different columns


def test_scene_folder(tmp_path):
    s = write_landsat_scene(str(tmp_path), 320, 256, seed=2, content="noise", cloud_share=0.3)
    names = sorted(os.listdir(s.folder))
    assert names == sorted([f"{s.name}_{b}.TIF" for b in BANDS] + [f"{s.name}_QA_PIXEL.TIF", f"{s.name}_MTL.txt"])
    for b in BANDS:
        with rasterio.open(os.path.join(s.folder, f"{s.name}_{b}.TIF")) as ds:
            assert ds.crs.to_epsg() == 32645 and ds.res == (30.0, 30.0) and ds.shape == (320, 256)
            dn = ds.read(1)
        assert dn.dtype == np.uint16 and (dn[~s.valid] == 0).all() and (dn[s.valid] > 0).all()
    with rasterio.open(os.path.join(s.folder, f"{s.name}_QA_PIXEL.TIF")) as ds:
        qa = ds.read(1)
    assert ((qa & 1).astype(bool) == ~s.valid).all()
    cloud = (qa >> 3) & 1
    assert cloud[~s.valid].sum() == 0 and 0.1 < cloud[s.valid].mean() < 0.5


def test_synthetic_content_has_labels(tmp_path):
    s = write_landsat_scene(str(tmp_path), 300, 280, seed=0)
    assert s.labels.shape == (300, 280) and (s.labels[~s.valid] == 0).all()
    assert len(np.unique(s.labels[s.valid])) >= 2
