"""The mapped synthetic scene shared by the mapping tests: a 1536 x 2048 Landsat 8 L1 scene
(EPSG:32645, tilted footprint with fill, QA_PIXEL clouds) mapped once with `glacier-submit map`
by a random member whose statistics are the scene's own DNs (so its classes vary)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from training.data.landsat import write_landsat_scene

from tests.helpers import make_member, read_landsat_bands, repo_env

#: the mapped scene's size (tests read it from the summary)
SIZE = (1536, 2048)


@pytest.fixture(scope="session")
def mapped(tmp_path_factory):
    root = tmp_path_factory.mktemp("map")
    scene = write_landsat_scene(str(root / "scenes"), *SIZE, seed=3)
    # statistics of the scene's own DNs, so the random member's classes vary with the pixels
    img = read_landsat_bands(scene)[:, scene.valid]
    lo, hi = np.percentile(img, 1, axis=1), np.percentile(img, 99, axis=1)
    member = make_member(str(root / "fold0_seed0.pt"), stats={
        "mean": img.mean(1).tolist(), "std": (img.std(1) / 4).tolist(), "lo": lo.tolist(), "hi": hi.tolist()})
    out = str(root / "maps")
    r = subprocess.run([sys.executable, "-m", "glacier_submit.cli", "map", scene.folder, "--models", member,
                        "--out", out, "--simplify", "45", "--device", "cpu"],
                       env=repo_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return scene, member, out, os.path.join(out, scene.name), r
