"""Bundles: the files and manifest, solution.py under all three platform conventions in a fresh
interpreter with only the platform's packages importable (equal to in-process predict),
single-file and binary bundles, the CRF step, the bias fit, and --tune oof end to end."""
import json
import os
import zipfile

import numpy as np
import pytest

from glacier_runtime.entry import predict_folder
from glacier_runtime.predictor import Predictor, load_payload
from glacier_submit.bundle import build
from glacier_submit.sandbox import CONVENTIONS, run_bundle

from tests.helpers import make_member


def test_bundle_files_and_manifest(bundle):
    out, m = bundle
    assert sorted(os.listdir(out)) == ["manifest.json", "model.pth", "solution.py", "submission.zip"]
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert [x["fold"] for x in man["members"]] == [0, 1] and man["members"][0]["train_tiles"] == ["00_00"]
    assert man["tta"] == ["identity", "hflip", "vflip"] and man["scales"] == [1.0]
    assert man["class_map"]["values"] == [0, 85, 170, 255]
    assert man["runtime"]["backend"] == "torch" and man["files"]["model.pth"]["bytes"] > 0
    assert len(man["files"]["model.pth"]["sha256"]) == 64
    assert man["timing"]["tile_s"] > 0 and man["timing"]["estimated_total_s"] > 0
    assert len(man["postprocess"]) == 3 and man["bias"]["values"] == [0.0, 0.1, 0.2, 0.3]
    with zipfile.ZipFile(os.path.join(out, "submission.zip")) as z:
        assert sorted(z.namelist()) == ["model.pth", "solution.py"]


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_conventions_match_in_process_predict(bundle, messy_test_data, convention, tmp_path):
    out, _ = bundle
    res = run_bundle(out, messy_test_data, convention, str(tmp_path / "masks"), timeout=300)
    assert res.ok, res.tail()
    # every tile is returned, the corrupt and band-missing ones as background
    assert sorted(res.masks) == ["001", "002", "003", "004", "005", "006", "007", "008"]
    pred = Predictor.from_payload(load_payload(os.path.join(out, "model.pth")), device="cpu")
    ref = predict_folder(pred, messy_test_data, str(tmp_path / "ref"), progress=False)
    for tid, mask in res.masks.items():
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 85, 170, 255}
        assert np.array_equal(mask, ref[tid]), tid
    assert res.masks["004"].shape == (37, 41) and res.masks["005"].shape == (32, 40)
    assert not res.masks["007"].any() and not res.masks["008"].any()
    if convention != "import-call":
        written = sorted(os.listdir(tmp_path / "masks"))
        assert written == [f"img00{i}.tif" for i in range(1, 9)]
    assert "img007" in res.stderr  # the bad tile gets a log line


def test_model_found_beside_solution_from_other_cwd(bundle, messy_test_data, tmp_path, monkeypatch):
    import subprocess
    import sys

    out, _ = bundle
    code = ("import importlib.util,sys; s=importlib.util.spec_from_file_location('solution', sys.argv[1]);"
            "m=importlib.util.module_from_spec(s); s.loader.exec_module(m);"
            "r=m.maskgeration(sys.argv[2]); print(len(r))")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(out, "solution.py"), messy_test_data],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("8")


def test_single_file_bundle(tiny_members, messy_test_data, tmp_path):
    out = str(tmp_path / "single")
    build(tiny_members, out, single_file=True)
    assert not os.path.exists(os.path.join(out, "model.pth"))
    res = run_bundle(out, messy_test_data, "imagepath", str(tmp_path / "m"), timeout=300)
    assert res.ok, res.tail()
    assert len(res.masks) == 8


def test_binary_members_write_binary_masks(tmp_path, messy_test_data):
    w = make_member(str(tmp_path / "bin.pt"), classes=2)
    out = str(tmp_path / "b")
    m = build([w], out)
    assert m["class_map"]["values"] == [0, 255]
    res = run_bundle(out, messy_test_data, "import-call", timeout=300)
    assert res.ok, res.tail()
    assert all(set(np.unique(v)) <= {0, 255} for v in res.masks.values())


def test_crf_bundle_runs_on_the_platform_and_matches_in_process(tiny_members, messy_test_data, tmp_path):
    """build --crf: the CRF ships inside solution.py (runtime sources) and the sandboxed run
    equals the in-process predictor with the same settings; the step changes some pixels."""
    out = str(tmp_path / "crf")
    m = build(tiny_members, out, crf=True, bias="none", check_size=(64, 64))
    assert m["crf"]["iterations"] == 5 and m["crf"]["window"] == 5  # the parameters, written out
    res = run_bundle(out, messy_test_data, "imagepath", str(tmp_path / "masks"), timeout=300)
    assert res.ok, res.tail()
    payload = load_payload(os.path.join(out, "model.pth"))
    ref = predict_folder(Predictor.from_payload(payload, device="cpu"), messy_test_data, str(tmp_path / "ref"),
                         progress=False)
    plain = predict_folder(Predictor.from_payload(payload, device="cpu", overrides={"crf": None}), messy_test_data,
                           str(tmp_path / "plain"), progress=False)
    for tid, mask in res.masks.items():
        assert np.array_equal(mask, ref[tid]), tid
    assert any(not np.array_equal(ref[t], plain[t]) for t in ref)


def test_bias_auto_is_not_fitted_under_crf(tmp_path):
    """The saved OOF probabilities are the CRF's input; the runtime adds the bias to its
    output. --bias auto fits (and records) a bias without --crf, and leaves it at 0 with a
    note under --crf, on the same members and OOF files."""
    wdir = tmp_path / "w"
    (wdir / "oof" / "labels").mkdir(parents=True)
    models = []
    rng = np.random.default_rng(0)
    for i in range(2):  # each member's OOF tiles are its validation tiles, as `cv` writes them
        name = f"fold{i}_seed0"
        models.append(make_member(str(wdir / f"{name}.pt"), seed=i, fold=i, train_tiles=[f"0{i}_00"],
                                  val_tiles=[f"t{i}0", f"t{i}1"]))
        (wdir / "oof" / name).mkdir()
        for t in range(2):
            lab = rng.choice(4, (40, 40), p=[0.8, 0.15, 0.04, 0.01])
            p = np.full((4, 40, 40), 0.05, np.float32)
            p[0] += 0.5
            for c in (1, 2, 3):  # under-predicts the rare classes: auto fits a positive bias
                p[c][lab == c] += 0.42
            np.save(wdir / "oof" / name / f"t{i}{t}.npy", p / p.sum(0))
            np.save(wdir / "oof" / "labels" / f"t{i}{t}.npy", lab)
    plain = build(models, str(tmp_path / "plain"), check_size=(64, 64))
    assert plain["bias"]["mode"].startswith("tuned on OOF") and any(b != 0 for b in plain["bias"]["values"])
    crf = build(models, str(tmp_path / "crf"), crf=True, check_size=(64, 64))
    assert "values" not in crf["bias"] and "not fitted under --crf" in crf["bias"]["mode"]
    assert any("--bias auto left the bias at 0" in n for n in crf["notes"])
    assert "bias" not in crf.get("tuned_on_tiles", {})
    given = build(models, str(tmp_path / "given"), crf=True, bias=[0.0, 0.1, 0.0, 0.2], check_size=(64, 64))
    assert given["bias"]["values"] == [0.0, 0.1, 0.0, 0.2]


def test_build_tune_oof_records_decisions_and_tiles(oof_members, synth_data, tmp_path):
    from glacier_submit.bundle import build
    from glacier_submit.manifest import render_manifest

    wdir, paths, keys = oof_members
    lines = []
    m = build(paths, str(tmp_path / "b"), tune="oof", tune_data=os.path.join(synth_data, "train"),
              check_size=(64, 64), echo=lines.append)
    tu = m["tuning"]
    assert sorted(tu["tiles"]) == keys
    settings = {d["setting"] for d in tu["decisions"]}
    assert {"seeds per fold", "tta", "crf", "bias", "postprocess"} <= settings
    crf = [d for d in tu["decisions"] if d["setting"] == "crf"][0]
    assert (m["crf"] is not None) == crf["adopted"] and crf["cost_s"] is not None  # cost measured, then judged
    seeds = [d for d in tu["decisions"] if d["setting"] == "seeds per fold"][0]
    # averaging two seeds with independent noise is clearly better on OOF: all six members kept
    assert seeds["adopted"] and seeds["lo"] > 0 and len(m["members"]) == 6
    # random-weight members gain nothing from TTA: the simple setting stays
    assert m["tta"] == ["identity"] and m["scales"] == [1.0]
    assert sorted(m["tuned_on_tiles"]["tuning"]) == keys
    assert "--tune oof" in render_manifest(m) and any("re-predicted" in line for line in lines)
    man = json.load(open(tmp_path / "b" / "manifest.json"))
    assert man["tuning"]["decisions"] == tu["decisions"]
    # these members record no fold grouping: the tuner says its evidence cannot see a regional shift
    assert tu["shift"].startswith("WARNING: the members' folds were not grouped") and "not recorded" in tu["shift"]
    assert "cannot see a regional shift" in render_manifest(m) and any("cannot see a regional" in x for x in lines)


def test_adapt_bn_bundle_adapts_on_the_platforms_tiles_and_matches_in_process(messy_test_data, tmp_path):
    """build --adapt bn with a per-tile-normalised member: the sandboxed solution.py re-estimates
    batch norm on the tiles it is given (masks equal the in-process adapted predictor, and differ
    from the unadapted one); the manifest and the time estimate say so; ONNX is refused."""
    w = make_member(str(tmp_path / "m.pt"), normalization="tile_percentile")
    out = str(tmp_path / "adapt")
    m = build([w], out, adapt="bn", bias="none", check_size=(64, 64))
    assert m["adapt"] == "bn" and any("--adapt bn" in n and "time estimate" in n for n in m["notes"])
    res = run_bundle(out, messy_test_data, "imagepath", str(tmp_path / "masks"), timeout=300)
    assert res.ok, res.tail()
    assert "batch-norm statistics of 1 of 1 member(s) re-estimated" in res.stderr
    payload = load_payload(os.path.join(out, "model.pth"))
    assert payload["inference"]["adapt"] == "bn" and payload["members"][0]["stats"]["mode"] == "tile_percentile"
    ref = predict_folder(Predictor.from_payload(payload, device="cpu"), messy_test_data, None, progress=False)
    plain = predict_folder(Predictor.from_payload(payload, device="cpu", overrides={"adapt": None}), messy_test_data,
                           None, progress=False)
    for tid, mask in res.masks.items():
        assert np.array_equal(mask, ref[tid]), tid
    assert any(not np.array_equal(ref[t], plain[t]) for t in ref)
    for bad in ({"backend": "onnx"}, {"allow_int8": True, "time_budget": 1.0, "calib_data": messy_test_data}):
        with pytest.raises(ValueError, match="--adapt bn re-estimates batch norm"):
            build([w], str(tmp_path / "onnx"), adapt="bn", **bad)
