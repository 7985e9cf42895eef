"""Finding a scene's bands: Landsat Collection 2 names and band files named by role, each
member band matched by name or by role (an L8 B6 is SWIR-1, never thermal)."""
import os

import pytest

from glacier_submit.mapping.scene import SceneError, find_scene

from tests.helpers import write_band_tif as _tif

L8 = "LC08_L1TP_140041_20211015_20211016_02_T1"
L7 = "LE07_L1TP_140041_20020101_20200916_02_T1"
COMPETITION = ["B2", "B3", "B4", "B6", "B10"]


def _landsat(folder, pid, bands, extra=()):
    os.makedirs(folder, exist_ok=True)
    for i, b in enumerate(bands):
        _tif(os.path.join(folder, f"{pid}_{b}.TIF"), value=100 + i)
    for name in extra:
        open(os.path.join(folder, f"{pid}_{name}"), "w").write("x")
    return folder


def test_l8_bands_by_name(tmp_path):
    folder = _landsat(str(tmp_path / "s"), L8, [f"B{i}" for i in range(1, 12)] + ["QA_PIXEL"], ["MTL.txt"])
    scene = find_scene(folder)
    assert (scene.name, scene.sensor, scene.product) == (L8, "L8", "L1TP") and "Level-1" in scene.level
    chosen = scene.paths_for("L8", COMPETITION)
    assert [k for k, _ in chosen] == COMPETITION
    assert scene.roles["B6"] == "swir1" and scene.roles["B10"] == "tir"
    assert scene.qa_pixel.endswith("_QA_PIXEL.TIF") and scene.mtl.endswith("_MTL.txt")


def test_l7_member_on_l8_scene_matches_roles_never_b6_to_thermal(tmp_path):
    """An HKH (Landsat 7) member's thermal B6_low is the L8 scene's B10, and its SWIR-1 B5 the L8 B6."""
    folder = _landsat(str(tmp_path / "s"), L8, [f"B{i}" for i in range(1, 12)])
    chosen = dict(find_scene(folder).paths_for("L7", ["B1", "B2", "B3", "B5", "B6_low"]))
    assert list(chosen) == ["B2", "B3", "B4", "B6", "B10"]  # blue green red swir1 tir (B10 before B11)


def test_l8_member_on_l7_scene_takes_the_thermal_of_etm(tmp_path):
    folder = _landsat(str(tmp_path / "s"), L7, ["B1", "B2", "B3", "B4", "B5", "B6_VCID_1", "B6_VCID_2", "B7"])
    scene = find_scene(folder)
    assert scene.sensor == "L7" and scene.roles["B6_low"] == "tir" and scene.roles["B5"] == "swir1"
    assert [k for k, _ in scene.paths_for("L8", COMPETITION)] == ["B1", "B2", "B3", "B5", "B6_low"]


def test_level2_names(tmp_path):
    folder = _landsat(str(tmp_path / "s"), L8.replace("L1TP", "L2SP"),
                      ["SR_B2", "SR_B3", "SR_B4", "SR_B6", "ST_B10", "QA_PIXEL"])
    scene = find_scene(folder)
    assert scene.product == "L2SP" and "reflectance" in scene.level
    assert [k for k, _ in scene.paths_for("L8", COMPETITION)] == COMPETITION


def test_missing_role_names_what_the_scene_has(tmp_path):
    folder = _landsat(str(tmp_path / "s"), L8, ["B2", "B3", "B4", "B6"])
    with pytest.raises(SceneError, match=r"L8:B10 \(tir\).*it has B2 \(blue\), B3 \(green\), B4 \(red\), B6 \(swir1\)"):
        find_scene(folder).paths_for("L8", COMPETITION)


def test_two_scenes_in_one_folder_are_refused(tmp_path):
    folder = _landsat(str(tmp_path / "s"), L8, ["B2"])
    _landsat(folder, L8.replace("20211015", "20211031"), ["B2"])
    with pytest.raises(SceneError, match="files of 2 Landsat scenes"):
        find_scene(folder)


def test_role_named_files(tmp_path):
    folder = tmp_path / "valley"
    folder.mkdir()
    for role in ("blue", "green", "red", "swir1", "tir", "cloud"):
        _tif(str(folder / f"{role}.tif"))
    scene = find_scene(str(folder))
    assert scene.name == "valley" and scene.sensor is None and scene.cloud.endswith("cloud.tif")
    assert [k for k, _ in scene.paths_for("L8", COMPETITION)] == ["blue", "green", "red", "swir1", "tir"]


def test_empty_folder_says_what_it_expects(tmp_path):
    with pytest.raises(SceneError, match="no band files found.*blue.tif"):
        find_scene(str(tmp_path))


def test_dot_names_the_folder_it_is(tmp_path, monkeypatch):
    """`map .` inside a role-named folder: the scene is named after the folder, never '.',
    whose output folder would be OUT itself."""
    folder = tmp_path / "valley"
    folder.mkdir()
    for role in ("blue", "green", "red", "swir1", "tir"):
        _tif(str(folder / f"{role}.tif"))
    monkeypatch.chdir(folder)
    assert find_scene(".").name == "valley"
    hidden = tmp_path / ".hidden"
    hidden.mkdir()
    _tif(str(hidden / "blue.tif"))
    with pytest.raises(SceneError, match="does not start with '.'"):
        find_scene(str(hidden))
