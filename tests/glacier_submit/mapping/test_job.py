"""One scene mapped into OUT/<scene>/: the class COG on the input's grid, the summary's counts
against the rasters, finished scenes skipped, another model refused, a failure leaving no
partial scene."""
import json
import os
import shutil

import numpy as np
import pytest
import rasterio

from glacier_submit.mapping.job import MapOptions, ModelSource, map_scene
from glacier_submit.mapping.scene import SceneError
from training.data.landsat import write_landsat_scene

from tests.helpers import make_member


def test_cog_on_the_scene_grid(mapped):
    scene, _, _, folder, _ = mapped
    with rasterio.open(os.path.join(scene.folder, f"{scene.name}_B2.TIF")) as src, \
            rasterio.open(os.path.join(folder, "classes.tif")) as ds:
        assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
        assert ds.nodata == 255 and ds.dtypes[0] == "uint8"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1) and ds.block_shapes[0] == (512, 512)
        assert ds.colormap(1)[1][:3] == (120, 200, 255)
        ids = ds.read(1)
    assert ((ids == 255) == ~scene.valid).all()  # nodata exactly where the scene has none

def test_summary_counts_nodata_and_cloud(mapped):
    scene, _, _, folder, r = mapped
    s = json.load(open(os.path.join(folder, "summary.json")))
    with rasterio.open(os.path.join(folder, "classes.tif")) as ds:
        ids = ds.read(1)
    with rasterio.open(os.path.join(scene.folder, f"{scene.name}_QA_PIXEL.TIF")) as ds:
        qa = ds.read(1).astype(np.uint32)
    cloud = (((qa >> 3) & 1) | ((qa >> 1) & 1)).astype(bool) & scene.valid
    assert s["nodata_share"] == pytest.approx(1 - scene.valid.mean(), abs=1e-12)
    assert s["cloud_share"] == pytest.approx(cloud.sum() / scene.valid.sum(), abs=1e-12) and s["cloud_share"] > 0
    for c, name in enumerate(["background", "glacier", "debris", "lake"]):
        assert s["classes"][name]["pixels"] == int((ids == c).sum())
        assert s["classes"][name]["area_km2"] == pytest.approx((ids == c).sum() * 900 / 1e6)
    assert s["crs"] == "EPSG:32645" and s["shape"] == [1536, 2048] and s["bands"]["B6"]["role"] == "swir1"
    assert not any("radiometry" in w for w in s["warnings"])  # the member's numbers are the scene's
    assert s["scene"] in r.stdout
    from PIL import Image

    with Image.open(os.path.join(folder, "quicklook.png")) as im:
        assert im.size[1] == 768 and im.size[0] > 2 * 1024  # the scene decimated 2x, twice side by side

def test_finished_scene_is_skipped_and_another_model_refused(mapped, tmp_path):
    scene, member, out, folder, _ = mapped
    before = os.path.getmtime(os.path.join(folder, "classes.tif"))
    src = ModelSource(members=(member,), device="cpu", overrides={})
    s = map_scene(scene.folder, out, ModelSource(members=(member,), device="cpu"), MapOptions(simplify=45))
    assert s["skipped"] and os.path.getmtime(os.path.join(folder, "classes.tif")) == before
    other = make_member(str(tmp_path / "other.pt"), seed=5)
    with pytest.raises(SceneError, match="mapped with another model or other options.*--force"):
        map_scene(scene.folder, out, ModelSource(members=(other,), device="cpu"))
    with pytest.raises(SceneError, match="other options"):  # outlines at another tolerance are not "done"
        map_scene(scene.folder, out, ModelSource(members=(member,), device="cpu"), MapOptions(simplify=10))
    assert src.fingerprint() != ModelSource(members=(other,)).fingerprint()

def test_a_failure_leaves_no_partial_scene(tmp_path, monkeypatch):
    import glacier_submit.mapping.outputs as outputs

    scene = write_landsat_scene(str(tmp_path / "s"), 300, 400, seed=1, content="noise")
    member = make_member(str(tmp_path / "m.pt"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs, "write_outlines", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        map_scene(scene.folder, str(tmp_path / "out"), ModelSource(members=(member,), device="cpu"), progress=False)
    assert os.listdir(tmp_path / "out") == []
    monkeypatch.undo()
    s = map_scene(scene.folder, str(tmp_path / "out"), ModelSource(members=(member,), device="cpu"), progress=False)
    assert not s["skipped"] and sorted(os.listdir(tmp_path / "out" / scene.name)) == [
        "classes.tif", "outlines.gpkg", "quicklook.png", "summary.json"]


def test_outlines_over_the_vertex_budget_are_simplified_alone_with_a_warning(tmp_path, monkeypatch):
    import glacier_submit.mapping.outputs as outputs

    scene = write_landsat_scene(str(tmp_path / "s"), 300, 400, seed=1, content="noise")
    member = make_member(str(tmp_path / "m.pt"))
    monkeypatch.setattr(outputs, "COVERAGE_MAX_VERTICES", 1)
    s = map_scene(scene.folder, str(tmp_path / "out"), ModelSource(members=(member,), device="cpu"), progress=False)
    assert sum(s["outlines"]["polygons"].values()) > 0
    assert s["outlines"]["simplification"] == "douglas_peucker"
    assert any(w.startswith("outlines: over 1 vertices") and "--simplify 0" in w for w in s["warnings"])

def test_scene_window_holds_a_block_and_its_margin_in_one_pass():
    """Naive oracle: the smallest multiple of the stride whose margin (window // 8, on the
    stride) leaves room for the block, found by counting up."""
    from glacier_submit.mapping.job import scene_window

    def margin(w, s):
        return max(s, w // 8 // s * s)

    for stride in (16, 32):
        for block in range(128, 3000, 97):
            w = stride
            while block + 2 * margin(w, stride) > w:
                w += stride
            assert scene_window(block, stride) == w, (block, stride)


_PEAK = """
import json, sys
sys.path.insert(0, sys.argv[4])
from _rss import PeakSampler
from glacier_submit.mapping.job import MapOptions, ModelSource, map_scene
src, opts = ModelSource(members=(sys.argv[1],), device="cpu"), MapOptions(block=256)
loaded = src.load(opts.block)
with PeakSampler() as p:
    map_scene(sys.argv[2], sys.argv[3], src, opts, loaded=loaded, progress=False)
print(json.dumps([p.start_mb, p.peak_mb]))
"""


@pytest.mark.slow
def test_peak_memory_stays_bounded_as_the_scene_grows(tmp_path):
    """A scene with 4x the pixels (2560^2 -> 5120^2, 256 px blocks, outlines on) raises the
    mapping's peak heap (RssAnon beyond the loaded model, benchmarks/_rss.py) by less than 4
    bytes per added pixel plus 64 MB of allocator noise (docs/MAPPING.md): reading the scene
    whole would cost 20 bytes per pixel (five float32 bands). Both scenes have interior blocks
    and fill GDAL's capped block cache, so what grows is only what scales with the scene."""
    import subprocess
    import sys

    from tests.helpers import ROOT, repo_env

    member = make_member(str(tmp_path / "m.pt"))
    growth = {}
    for n in (2560, 5120):
        s = write_landsat_scene(str(tmp_path / f"s{n}"), n, n, seed=n, content="noise")
        r = subprocess.run([sys.executable, "-c", _PEAK, member, s.folder, str(tmp_path / f"o{n}"),
                            os.path.join(ROOT, "benchmarks")], env={**repo_env(), "MALLOC_ARENA_MAX": "2"},
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        before, peak = json.loads(r.stdout.strip().splitlines()[-1])
        growth[n] = peak - before
        shutil.rmtree(s.folder)
    added = 5120 ** 2 - 2560 ** 2
    assert growth[5120] - growth[2560] < 4 * added / 2 ** 20 + 64, growth


def test_missing_extra_is_named_with_its_install_line(monkeypatch):
    import importlib.util

    from glacier_submit.mapping.job import missing_extras

    assert missing_extras(many=True) is None  # installed here (the map extra is in .[all])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("shapely", "distributed") else real(name, *a))
    assert missing_extras() == ("glacier-submit map needs shapely: pip install 'glacier-submit[map]' (or pip install -e "
                                "'.[map]' in a checkout)")
    assert "shapely, distributed" in missing_extras(many=True)


def test_stale_temporaries_of_this_scene_only_are_removed(tmp_path):
    from glacier_submit.mapping.job import _remove_stale_temps

    for name in (".tmp-site-123", ".tmp-site-2-456", ".tmp-site-x", "site"):
        (tmp_path / name).mkdir()
    _remove_stale_temps(str(tmp_path), "site")
    assert sorted(os.listdir(tmp_path)) == [".tmp-site-2-456", ".tmp-site-x", "site"]


def test_areas_are_left_empty_in_a_geographic_crs(tmp_path):
    """EPSG:4326 pixels have no area in metres: area_km2 is empty, never a wrong number."""
    from rasterio.transform import from_origin

    folder = tmp_path / "geo"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for role in ("blue", "green", "red", "swir1", "tir"):
        with rasterio.open(folder / f"{role}.tif", "w", driver="GTiff", height=96, width=96, count=1, dtype="float32",
                           crs="EPSG:4326", transform=from_origin(86.0, 28.0, 0.0003, 0.0003)) as ds:
            ds.write((rng.random((96, 96)) + 0.1).astype(np.float32), 1)
    s = map_scene(str(folder), str(tmp_path / "out"), ModelSource(members=(make_member(str(tmp_path / "m.pt")),),
                  device="cpu"), progress=False)
    assert all(v["area_km2"] is None for v in s["classes"].values()) and s["outlines"]["areas_exact"] is False
    assert sum(v["pixels"] for v in s["classes"].values()) == 96 * 96
