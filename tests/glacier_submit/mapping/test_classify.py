"""Block-by-block classification of a scene: the runtime's `predict` on the same pixels, and
the warning for a scene in other units than the members' tiles."""
import os

import numpy as np
import rasterio

from glacier_submit.mapping.job import MapOptions, ModelSource, map_scene
from training.data.landsat import write_landsat_scene

from tests.helpers import make_member, read_landsat_bands


def test_classes_equal_predict_on_the_same_pixels(mapped):
    """Oracle: the runtime's Predictor.predict_ids on the whole scene read with rasterio
    (fill as 0 in every band), blocks of the same size."""
    from glacier_runtime.predictor import Predictor
    from glacier_submit.members import load_members, make_payload

    scene, member, _, folder, _ = mapped
    pred = Predictor.from_payload(make_payload(load_members([member]), {}), device="cpu",
                                  overrides={"block": 1024, "window": 1344})  # map's default block and its window
    want = pred.predict_ids(read_landsat_bands(scene))
    with rasterio.open(os.path.join(folder, "classes.tif")) as ds:
        got = ds.read(1)
    assert np.array_equal(got[scene.valid], want[scene.valid])
    shares = np.bincount(want[scene.valid], minlength=4) / scene.valid.sum()
    assert (np.sort(shares)[-2:] > 0.01).all(), shares  # not one class everywhere: the comparison can fail

def test_a_scene_in_other_units_is_warned_about(tmp_path):
    """A fold-mode member with reflectance-like numbers on a Level-1 DN scene: the summary
    names the bands and the fix."""
    scene = write_landsat_scene(str(tmp_path / "s"), 256, 256, seed=1, content="noise")
    s = map_scene(scene.folder, str(tmp_path / "out"), ModelSource(members=(make_member(str(tmp_path / "m.pt")),),
                  device="cpu"), MapOptions(outlines=False), progress=False)
    (w,) = [w for w in s["warnings"] if w.startswith("radiometry")]
    assert "B10 median" in w and "(tiles 200..320)" in w and "Level-1" in w and "data.normalization=tile_percentile" in w
    assert s["outlines"] is None and not os.path.exists(os.path.join(tmp_path, "out", scene.name, "outlines.gpkg"))
