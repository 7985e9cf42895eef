"""glacier-train inspect: problems reported (unknown label values, non-TIFF files), exit code 1 on
errors."""
from click.testing import CliRunner

from training.cli import cli as main

from tests.helpers import make_tile


def test_inspect_reports_problems_and_fails_on_errors(tmp_path):
    make_tile(str(tmp_path), "00_00")
    make_tile(str(tmp_path), "00_01", label_values=(0, 85, 99))
    (tmp_path / "Band2" / "readme.md").write_text("x")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 1
    assert "99" in res.output and "non-TIFF" in res.output
