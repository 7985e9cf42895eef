"""Outlines: one polygon per 4-connected body, areas the pixel counts times the pixel area,
simplified within the stated tolerance, holes kept."""
import os

import numpy as np
import rasterio


def test_outline_areas_are_pixel_counts_times_pixel_area(mapped):
    """Oracle: scipy's 4-connected components of the class raster, per class."""
    import pyogrio.raw
    import shapely
    from scipy import ndimage

    _, _, _, folder, _ = mapped
    with rasterio.open(os.path.join(folder, "classes.tif")) as ds:
        ids = ds.read(1)
    meta, _, geoms, fields = pyogrio.raw.read(os.path.join(folder, "outlines.gpkg"), layer="outlines")
    cols = dict(zip(meta["fields"], fields))
    assert "32645" in meta["crs"]
    for c in (1, 2, 3):
        sel = cols["class_id"] == c
        _, n = ndimage.label(ids == c, structure=ndimage.generate_binary_structure(2, 1))
        assert sel.sum() == n
        assert cols["pixels"][sel].sum() == (ids == c).sum()
    assert np.allclose(cols["area_km2"], cols["pixels"] * 900 / 1e6)
    polys = shapely.from_wkb(geoms)
    assert shapely.is_valid(polys).all()
    # simplified to 45 m: the stored area is within perimeter x tolerance of the exact one
    err = np.abs(shapely.area(polys) / 1e6 - cols["area_km2"])
    assert (err <= cols["perimeter_km"] * 0.045 + 1e-9).all()

def test_exact_outlines_keep_holes(tmp_path):
    """--simplify 0: the polygons are the pixel edges; a ring of debris keeps its hole."""
    import pyogrio.raw
    import shapely

    from glacier_submit.mapping.outputs import write_outlines
    from rasterio.transform import from_origin

    ids = np.zeros((9, 9), np.uint8)
    ids[1:8, 1:8] = 2
    ids[3:6, 3:6] = 1  # glacier inside a ring of debris
    ids[0, 8] = 255
    path = str(tmp_path / "c.tif")
    with rasterio.open(path, "w", driver="GTiff", height=9, width=9, count=1, dtype="uint8", nodata=255,
                       crs="EPSG:32645", transform=from_origin(0, 270, 30, 30)) as ds:
        ds.write(ids, 1)
    got = write_outlines(path, str(tmp_path / "o.gpkg"), ["background", "glacier", "debris", "lake"], 0)
    assert got["polygons"] == {"glacier": 1, "debris": 1, "lake": 0}
    meta, _, geoms, fields = pyogrio.raw.read(str(tmp_path / "o.gpkg"))
    polys = dict(zip(fields[0], shapely.from_wkb(geoms)))
    assert len(polys[2].interiors) == 1 and polys[2].area == (49 - 9) * 900 and polys[1].area == 9 * 900
