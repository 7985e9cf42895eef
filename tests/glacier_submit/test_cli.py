"""glacier-submit's commands: predict exits non-zero naming the tiles that failed; predict and
evaluate remove the temporary files a killed writer left."""
import os
import shutil

from click.testing import CliRunner

from glacier_submit.evaluate import evaluate

from tests.helpers import write_test_folder


def test_predict_cli_exits_nonzero_when_a_tile_failed(tiny_members, tmp_path):
    from glacier_submit.cli import cli

    root = write_test_folder(str(tmp_path / "d"))
    out = tmp_path / "o"
    (out / "img003.tif").mkdir(parents=True)
    res = CliRunner().invoke(cli, ["predict", "--models", tiny_members[0], "--input", root, "--output", str(out),
                                   "--device", "cpu"])
    assert res.exit_code == 1 and "1 tiles failed: img003" in res.output, res.output
    assert "3 tiles: 2 ok, 0 fell back, 1 failed" in res.output
    shutil.rmtree(out / "img003.tif")
    res = CliRunner().invoke(cli, ["predict", "--models", tiny_members[0], "--input", root, "--output", str(out),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_stale_temporaries_removed_at_start(setup, tmp_path):
    from glacier_runtime.atomic import TEMP_PREFIX
    from glacier_submit.cli import cli

    bundle, data, _, _ = setup
    rep, out = tmp_path / "rep", tmp_path / "pred"
    for d in (rep, out):
        d.mkdir()
        (d / (TEMP_PREFIX + "abc-report.json")).write_bytes(b"x" * 1000)
    evaluate(bundle, os.path.join(data, "unseen"), str(rep), figures=False)
    res = CliRunner().invoke(cli, ["predict", "--bundle", bundle, "--input", os.path.join(data, "unseen"),
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert not [f for d in (rep, out) for f in os.listdir(d) if f.startswith(TEMP_PREFIX)]


def test_map_usage_errors(tiny_members, tmp_path):
    """map: exactly one of --bundle/--models, at least one scene; a folder that is no scene
    is a one-line error naming it and what is expected."""
    from glacier_submit.cli import cli

    run = CliRunner().invoke
    res = run(cli, ["map", str(tmp_path), "--models", tiny_members[0], "--bundle", str(tmp_path)])
    assert res.exit_code == 2 and "either --bundle or --models" in res.output
    res = run(cli, ["map", "--models", tiny_members[0]])
    assert res.exit_code == 2 and "give scene folders, or --scenes LIST" in res.output
    res = run(cli, ["map", str(tmp_path), "--models", tiny_members[0], "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and f"{tmp_path}: no band files found" in res.output and "blue.tif" in res.output
    empty = tmp_path / "list.txt"
    empty.write_text("# nothing\n")
    res = run(cli, ["map", "--scenes", str(empty), "--models", tiny_members[0]])
    assert res.exit_code == 2 and "lists no scenes" in res.output
