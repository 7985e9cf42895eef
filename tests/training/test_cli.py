"""glacier-train's commands: synth, inspect and folds in a row; bad data is a clean error."""
import json

from click.testing import CliRunner

from training.cli import cli as main


def test_synth_inspect_folds(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["synth", "--out", str(tmp_path / "s"), "--tiles", "9", "--size", "48", "48", "--unseen-tiles", "2"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["inspect", str(tmp_path / "s" / "train"), "--json-out", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    assert "img001" in res.output and "overall class share" in res.output
    assert json.load(open(tmp_path / "i.json"))["errors"] == []
    res = r.invoke(main, ["folds", str(tmp_path / "s" / "train"), "--k", "3", "--block", "1", "--out", str(tmp_path / "f.json")])
    assert res.exit_code == 0, res.output
    folds = json.load(open(tmp_path / "f.json"))
    assert folds["k"] == 3 and len(folds["folds"]) == 3
    assert "grouping: the mosaic rebuilt from edge continuity" in res.output  # Phase-2 names carry no position
    assert "no tile has a known neighbour" not in res.output  # 1x1 blocks were asked for


def test_folds_bad_data_is_clean_error(tmp_path):
    res = CliRunner().invoke(main, ["folds", str(tmp_path)])
    assert res.exit_code != 0 and "Band1" in res.output and "Traceback" not in res.output


def test_synth_offers_every_effect_and_region_of_the_generator():
    """The CLI keeps its own lists (no numpy/cv2 at import); they must follow the generator."""
    from training.cli import _EFFECTS, _REGION_NAMES
    from training.data.scenes.regions import REGIONS, Effects

    assert sorted(_EFFECTS) == sorted(Effects.names())
    assert sorted(_REGION_NAMES) == sorted(REGIONS)
