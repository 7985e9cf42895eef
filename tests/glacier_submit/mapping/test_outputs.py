"""Outlines: one polygon per 4-connected body, areas the pixel counts times the pixel area,
simplified within the stated tolerance, holes kept."""
import json
import os

import numpy as np
import pytest
import rasterio
import rasterio.features


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
    assert shapely.is_valid(polys).all() and not shapely.is_empty(polys).any()
    # simplified at 45 m: each stored outline within the stated 4 x tolerance of the exact one
    # (the same body traced to its pixel edges by rasterio, matched by class and pixel count), and
    # so its area within perimeter x that distance of area_km2
    with rasterio.open(os.path.join(folder, "classes.tif")) as ds:
        transform = ds.transform
    exact = {}
    for geom, value in rasterio.features.shapes(ids, mask=(ids != 0) & (ids != 255), connectivity=4,
                                                transform=transform):
        body = shapely.geometry.shape(geom)
        exact.setdefault((int(value), round(body.area / 900)), []).append(body)
    for poly, c, n in zip(polys, cols["class_id"], cols["pixels"]):
        twins = exact[(int(c), int(n))]
        assert min(shapely.hausdorff_distance(poly, t) for t in twins) <= 4 * 45 + 1e-6
    err = np.abs(shapely.area(polys) / 1e6 - cols["area_km2"])
    assert (err <= cols["perimeter_km"] * 4 * 0.045 + 1e-9).all()


def test_simplified_outlines_share_their_boundaries(mapped):
    """Neighbouring bodies (debris beside clean ice, a lake in a glacier's hole) keep one shared
    boundary after simplification: no overlaps and no slivers between them. Oracle: pairwise
    intersections over shapely's STRtree, and the union's area against the sum of areas."""
    import pyogrio.raw
    import shapely

    _, _, _, folder, _ = mapped
    _, _, geoms, _ = pyogrio.raw.read(os.path.join(folder, "outlines.gpkg"), layer="outlines")
    polys = shapely.from_wkb(geoms)
    left, right = shapely.STRtree(polys).query(polys, predicate="intersects")
    pairs = left < right
    assert pairs.sum() >= 10  # the scene has neighbours to share edges
    overlap = shapely.area(shapely.intersection(polys[left[pairs]], polys[right[pairs]]))
    assert overlap.max() < 1e-6
    assert shapely.coverage_is_valid(polys)
    with open(os.path.join(folder, "summary.json")) as f:
        assert json.load(f)["outlines"]["simplification"] == "coverage"


def _lake_in_glacier(tmp_path) -> str:
    """A 40 x 40 glacier with one jagged lake inside (a class raster on a 30 m UTM grid)."""
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    ids = np.ones((40, 40), np.uint8)
    for y in range(8, 33):  # one interval a row about the centre: one lake, one glacier around it
        half = int(np.sqrt(max(12 ** 2 - (y - 20) ** 2, 1))) + int(rng.integers(-2, 3))
        ids[y, 20 - max(half, 1): 20 + max(half, 1)] = 3
    path = str(tmp_path / "c.tif")
    with rasterio.open(path, "w", driver="GTiff", height=40, width=40, count=1, dtype="uint8", nodata=255,
                       crs="EPSG:32645", transform=from_origin(0, 1200, 30, 30)) as ds:
        ds.write(ids, 1)
    return path


@pytest.mark.parametrize("budget", ["coverage", "douglas_peucker"])
def test_a_lake_in_a_glaciers_hole_fills_it_after_simplification(tmp_path, monkeypatch, budget):
    """Simplified as one coverage, the lake's outline and the glacier's hole are one line (no
    overlap; the union has the area of the two, no hole left). Over the vertex budget each
    polygon is simplified alone, the result says so, and the two overlap (which is why the
    coverage is the default: this oracle sees the difference)."""
    import pyogrio.raw
    import shapely

    from glacier_submit.mapping import outputs

    if budget == "douglas_peucker":
        monkeypatch.setattr(outputs, "COVERAGE_MAX_VERTICES", 100)
    got = outputs.write_outlines(_lake_in_glacier(tmp_path), str(tmp_path / "o.gpkg"),
                                 ["background", "glacier", "debris", "lake"], 30)
    assert got["simplification"] == budget
    _, _, geoms, fields = pyogrio.raw.read(str(tmp_path / "o.gpkg"))
    polys = dict(zip(fields[0], shapely.from_wkb(geoms)))
    glacier, lake = polys[1], polys[3]
    overlap = shapely.area(shapely.intersection(glacier, lake))
    union = shapely.union_all([glacier, lake])
    if budget == "coverage":
        assert overlap < 1e-6 and len(union.interiors) == 0 and abs(union.area - 1200 * 1200) < 1e-6
    else:
        assert overlap > 100


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
