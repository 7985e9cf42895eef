"""The benchmark scripts still run against today's code (they import internals, which drift):
each is run as a user runs it, at a toy size, and its result file is checked."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _run(args, tmp_path):
    out = str(tmp_path / "result.json")
    proc = subprocess.run([sys.executable, *args, "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as fh:
        return json.load(fh)


def test_postprocess_speed_script(tmp_path):
    # --compare-with the runtime's own file: a second implementation timed and checked equal
    r = _run(["benchmarks/postprocess_speed.py", "--sizes", "24", "--repeats", "1", "--cap", "2",
              "--compare-with", "glacier_runtime/postprocess.py"], tmp_path)
    rows = r["rows"]
    assert {(x["mask"], x["preset"]) for x in rows} == {(m, p) for m in ("worst-case random", "realistic prediction")
                                                         for p in ("light", "competition")}
    assert all(x["other_equal"] is True for x in rows)
    assert all(x["equal"] in (True, None) for x in rows) and any(x["equal"] is True for x in rows)


@pytest.mark.slow
def test_inference_command_benchmark(tmp_path):
    r = _run(["benchmarks/inference_speed.py", "--command-only", "--command-members", "1", "--size", "64",
              "--repeats", "1"], tmp_path)
    c = r["command"]
    assert c["members"] == 1 and len(c["command_per_tile_s"]) == 1 and c["ratio_median"] > 0


def test_mosaic_grouping_script(tmp_path):
    r = _run(["benchmarks/mosaic_grouping.py", "--regions", "khumbu", "--seeds", "0", "--rows", "2", "--cols", "2",
              "--size", "96"], tmp_path)
    (row,) = r["rows"]
    assert row["region"] == "khumbu" and row["true_pairs"] == 4  # a 2x2 mosaic has 4 edges
    assert 0 <= row["correct"] <= row["found_pairs"] and 0.0 <= row["recall"] <= 1.0


@pytest.mark.slow
def test_generator_ablation_script(tmp_path):
    r = _run(["benchmarks/generator_ablation.py", "--work", str(tmp_path / "w"), "--effects", "clouds", "--tiles", "9",
              "--size", "96", "--k", "2", "--cnn-folds", "0", "--set", "train.epochs=1", "--set", "train.patch_size=64",
              "--set", "train.patches_per_epoch=8"], tmp_path)
    assert [x["effect_off"] for x in r["rows"]] == ["all effects on", "clouds"]
    assert all(x["tiles_scored"] > 0 and len(x["cnn"]) == 3 and len(x["baseline"]) == 3 for x in r["rows"])


@pytest.mark.slow
def test_region_shift_script(tmp_path):
    r = _run(["benchmarks/region_shift.py", "--work", str(tmp_path / "w"), "--regions", "khumbu", "lahaul",
              "--held-out", "khumbu", "--tiles", "4", "--size", "64", "--k", "2", "--block", "1", "--set", "train.epochs=1",
              "--set", "train.patch_size=64", "--set", "train.patches_per_epoch=8"], tmp_path)
    (row,) = r["rows"]
    assert row["region"] == "khumbu" and row["train_regions"] == ["lahaul"]
    assert set(row["cnn_held_out"]["per_class"]) == {"background", "glacier", "debris", "lake"}


@pytest.mark.slow
def test_region_shift_options_script(tmp_path):
    """--options: each option beside the recipe on the same held-out tiles, a build-only option
    reusing the recipe's weights, gains with intervals, the ensemble against single members."""
    r = _run(["benchmarks/region_shift.py", "--work", str(tmp_path / "w"), "--regions", "khumbu", "lahaul",
              "--held-out", "khumbu", "--tiles", "4", "--size", "64", "--k", "2", "--block", "1", "--set", "train.epochs=1",
              "--set", "train.patch_size=64", "--set", "train.patches_per_epoch=8",
              "--options", "adapt_bn", "lovasz_tversky"], tmp_path)
    (row,) = r["rows"]
    assert list(row["options"]) == ["recipe", "adapt_bn", "lovasz_tversky"]
    assert row["options"]["recipe"]["gain"][0] == 0.0 and row["held_out_tiles"] == 4
    assert row["options"]["adapt_bn"]["train_seconds"] < row["options"]["recipe"]["train_seconds"]  # reused weights
    lo, hi = r["summary"]["lovasz_tversky"]["ci90"]
    assert lo <= r["summary"]["lovasz_tversky"]["mean_gain"] <= hi
    vals = [m["mcc"] for m in row["single_members"]]
    assert len(vals) == 2 and abs(row["single_mean"] - sum(vals) / 2) < 1e-4


@pytest.mark.slow
def test_map_scenes_script(tmp_path):
    r = _run(["benchmarks/map_scenes.py", "--sizes", "256", "512", "--scenes", "2", "--scene-size", "256",
              "--block", "256"], tmp_path)
    assert [m["size"] for m in r["memory"]] == [256, 512] and all(m["peak_mb"] >= m["loaded_mb"] for m in r["memory"])
    assert set(r["throughput"]) >= {"in_process", "dask_1", "dask_2"}
    assert r["throughput"]["in_process"]["speed_vs_in_process"] == 1.0


def test_outline_simplify_benchmark(tmp_path):
    r = _run(["benchmarks/outline_simplify.py", "--size", "120", "--sigmas", "3", "--tolerances", "30"], tmp_path)
    row = r["rows"][0]
    assert row["bodies"] > 5 and row["coverage"]["overlap_m2"] == 0 and row["douglas_peucker"]["overlap_m2"] > 0
