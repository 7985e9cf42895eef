import json

from click.testing import CliRunner

from tests.conftest import make_tile
from glacier_cli.argv import expand_multi
from training.cli import MULTI_VALUE_OPTIONS, cli as main


def test_synth_inspect_folds(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["synth", "--out", str(tmp_path / "s"), "--tiles", "9", "--size", "48", "48", "--unseen-tiles", "2"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["inspect", str(tmp_path / "s" / "train"), "--json-out", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    assert "00_00" in res.output and "overall class share" in res.output
    assert json.load(open(tmp_path / "i.json"))["errors"] == []
    res = r.invoke(main, ["folds", str(tmp_path / "s" / "train"), "--k", "3", "--block", "1", "--out", str(tmp_path / "f.json")])
    assert res.exit_code == 0, res.output
    folds = json.load(open(tmp_path / "f.json"))
    assert folds["k"] == 3 and len(folds["folds"]) == 3


def test_inspect_reports_problems_and_fails_on_errors(tmp_path):
    make_tile(str(tmp_path), "00_00")
    make_tile(str(tmp_path), "00_01", label_values=(0, 85, 99))
    (tmp_path / "Band2" / "readme.md").write_text("x")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 1
    assert "99" in res.output and "non-TIFF" in res.output


def test_folds_bad_data_is_clean_error(tmp_path):
    res = CliRunner().invoke(main, ["folds", str(tmp_path)])
    assert res.exit_code != 0 and "Band1" in res.output and "Traceback" not in res.output


def test_seeds_space_separated():
    assert expand_multi(["cv", "--seeds", "0", "1", "2", "--out", "w"], MULTI_VALUE_OPTIONS) == \
        ["cv", "--seeds", "0", "--seeds", "1", "--seeds", "2", "--out", "w"]
    assert expand_multi(["--seeds", "3"], MULTI_VALUE_OPTIONS) == ["--seeds", "3"]


def test_models_unquoted_glob_expands():
    argv = ["build", "--models", "w/a.pt", "w/b.pt", "w/logs", "--out", "s"]
    assert expand_multi(argv, ("--models",)) == ["build", "--models", "w/a.pt", "--models", "w/b.pt", "--models", "w/logs", "--out", "s"]
