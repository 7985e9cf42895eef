"""Bundles: rendered solution.py under all three platform conventions, in a fresh
interpreter with only the platform's packages importable, against in-process predict."""
import ast
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from glacier_submit.bundle import BudgetError, build
from glacier_submit.timing import candidate_settings
from glacier_submit.members import load_members
from glacier_submit.sandbox import CONVENTIONS, run_bundle
from glacier_runtime.entry import predict_folder
from glacier_runtime.predictor import Predictor, load_payload
from tests.conftest import make_member

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bundle(tiny_members, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bundle"))
    m = build(tiny_members, out, tta="flips", scales=[1.0], postprocess="light", bias=[0.0, 0.1, 0.2, 0.3])
    return out, m


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


def _embedded_sources(src: str) -> dict:
    """The runtime modules inside solution.py's ``_SOURCES`` string literals."""
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["_SOURCES"]:
            return ast.literal_eval(node.value)
    raise AssertionError("solution.py has no _SOURCES table")


def test_solution_py_is_py39_and_platform_only(bundle, tmp_path):
    """The template and the runtime embedded in its string literals: Python 3.9 (vermin)
    and only the platform's packages (the runtime's import allow-list)."""
    pytest.importorskip("vermin")
    from glacier_submit.render import runtime_sources
    from tests.test_runtime_purity import forbidden_imports, vermin_violations

    out, _ = bundle
    src = open(os.path.join(out, "solution.py")).read()
    tree = ast.parse(src, feature_version=(3, 9))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names <= {"importlib", "os", "sys", "base64"}
    assert "def maskgeration(imagepath, out_dir=None)" in src and "def main()" in src
    assert all("pip install" not in line for line in src.splitlines()[:15])
    embedded = _embedded_sources(src)
    assert embedded == runtime_sources() and "entry" in embedded and "predictor" in embedded
    pkg = tmp_path / "_glacier_runtime"
    for rel, text in embedded.items():
        path = pkg.joinpath(*rel.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        assert not forbidden_imports(text, rel), rel
        assert "training" not in {m.split(".")[0] for m in forbidden_imports(text, rel)}
    (tmp_path / "solution.py").write_text(src)
    assert not vermin_violations(str(tmp_path))


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


def test_sandbox_blocks_repo_and_training_packages(bundle, messy_test_data, tmp_path):
    out, _ = bundle
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "solution.py").write_text("import scipy\n")
    (evil / "model.pth").write_bytes(b"")
    res = run_bundle(str(evil), messy_test_data, "imagepath", timeout=120)
    assert not res.ok and "blocked in the platform sandbox: scipy" in res.stderr
    (evil / "solution.py").write_text("import training\n")
    assert "blocked" in run_bundle(str(evil), messy_test_data, "imagepath", timeout=120).stderr


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


def test_size_budget_fp16_then_refusal(tiny_members, tmp_path):
    size32 = os.path.getsize(tiny_members[0]) * 2 / 2**20
    m = build(tiny_members, str(tmp_path / "b16"), max_mb=size32 * 0.8)
    assert m["runtime"]["precision"] == "fp16" and any("fp16" in n for n in m["notes"])
    assert m["runtime"]["fp16_agreement"] > 0.99
    p = load_payload(str(tmp_path / "b16" / "model.pth"))
    assert p["members"][0]["state_dict"]["encoder.conv1.weight"].dtype == torch.float16
    m = build(tiny_members, str(tmp_path / "b1"), max_mb=size32 * 0.3)  # room for one member: the strongest
    assert [e["name"] for e in m["members"]] == ["fold1_seed0"]
    with pytest.raises(BudgetError) as exc:
        build(tiny_members, str(tmp_path / "bx"), max_mb=size32 * 0.2)
    msg = str(exc.value)
    assert "no member fits" in msg and "fold0_seed0" in msg and "--max-mb" in msg


def _views_timer(per_view_s, tried):
    """A stand-in for timing.time_predictor: ``per_view_s`` per forward view, counted by the
    real Predictor for the settings asked (no tile is run)."""
    def timer(payload, tile, device="cpu", overrides=None, repeats=1):
        views = Predictor.from_payload(payload, overrides=overrides).n_forward_views
        tried.append((overrides["tta"], list(overrides["scales"]), views))
        return {"load_s": 0.0, "tile_s": per_view_s * views, "views": views}
    return timer


def test_time_budget_drops_tta_in_order(tiny_members, tmp_path, monkeypatch):
    """No setting fits: every cheaper setting is tried in the documented order, the cheapest kept,
    then the weakest member goes (one forward view left) and the note says even that is too slow."""
    import glacier_submit.timing as timing_mod

    assert [c[0] for c in candidate_settings("d4", [0.75, 1.0])] == ["d4", "d4", "flips", "none"]
    tried = []
    monkeypatch.setattr(timing_mod, "time_predictor", _views_timer(1.0, tried))
    m = build(tiny_members, str(tmp_path / "tb"), tta="d4", scales=[0.75, 1.0], time_budget=0.5, bias="none")
    assert [t[:2] for t in tried] == [("d4", [0.75, 1.0]), ("d4", [1.0]), ("flips", [1.0]), ("none", [1.0]),
                                      ("none", [1.0])]
    assert [t[2] for t in tried] == [32, 16, 6, 2, 1]
    assert m["tta"] == ["identity"] and m["scales"] == [1.0]
    assert sum(r["kept"] for r in m["selection"]["table"]) == 1
    assert any("reduced" in n for n in m["notes"]) and any("cheapest" in n for n in m["notes"])


def test_time_budget_stops_at_the_first_setting_that_fits(tiny_members, tmp_path, monkeypatch):
    """A patched timer (0.1 s per forward view) and a 1 s budget: d4 x 2 scales (32 views)
    and d4 (16) are too slow, flips (6 views for 2 members) fits, so 'none' is never tried."""
    import glacier_submit.timing as timing_mod

    tried = []
    monkeypatch.setattr(timing_mod, "time_predictor", _views_timer(0.1, tried))
    m = build(tiny_members, str(tmp_path / "tb"), tta="d4", scales=[0.75, 1.0], time_budget=1.0, bias="none")
    assert tried == [("d4", [0.75, 1.0], 32), ("d4", [1.0], 16), ("flips", [1.0], 6)]
    assert m["tta"] == ["identity", "hflip", "vflip"] and m["scales"] == [1.0]
    assert any("reduced to 'flips'" in n for n in m["notes"]) and not any("cheapest" in n for n in m["notes"])
    assert load_payload(str(tmp_path / "tb" / "model.pth"))["inference"]["tta"] == "flips"


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


def test_members_with_different_bands_refused(tmp_path, tiny_members):
    bad = make_member(str(tmp_path / "x.pt"))
    ck = torch.load(bad, weights_only=False)
    ck["bands"] = ["B2", "B3", "B4", "B5", "B10"]
    torch.save(ck, bad)
    with pytest.raises(ValueError, match="disagree on bands"):
        load_members([tiny_members[0], bad])


def test_bias_tuned_from_oof(tmp_path):
    from glacier_submit.tuning.bias import tune_bias

    rng = np.random.default_rng(0)
    labels = [rng.choice(4, (40, 40), p=[0.8, 0.15, 0.04, 0.01]) for _ in range(4)]
    probs = []
    for lab in labels:  # a model that under-predicts the rare classes
        p = np.full((4, 40, 40), 0.05, np.float32)
        p[0] += 0.5
        for c in (1, 2, 3):
            p[c][lab == c] += 0.42
        probs.append(p / p.sum(0))
    bias, before, after = tune_bias(probs, labels)
    assert after > before + 0.1 and bias[0] == 0 and bias[3] > 0


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


def test_ablations_score_the_crf_bundle_as_built(tiny_members, synth_data, tmp_path):
    """evaluate --compare's 'bundle as built' row applies the CRF like the platform run does
    (rescored here with sklearn from predict_ids), and a 'without CRF' row says what it buys."""
    from sklearn.metrics import matthews_corrcoef

    from glacier_submit.evaluate import ablations
    from training.data.competition import CompetitionDataset

    out = str(tmp_path / "crf")
    m = build(tiny_members, out, crf=True, bias="none", check_size=(64, 64))
    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = ds.keys[:2]
    rows = {r["variant"]: r for r in ablations(out, ds, keys, m)}
    pred = Predictor.from_payload(load_payload(os.path.join(out, "model.pth")), device="cpu")
    y = np.concatenate([ds.label(k).ravel() for k in keys])
    p = np.concatenate([pred.predict_ids(ds.image(k)).ravel() for k in keys])
    assert rows["bundle as built"]["mcc"] == pytest.approx(matthews_corrcoef(y, p), abs=1e-9)
    plain = Predictor.from_payload(load_payload(os.path.join(out, "model.pth")), device="cpu", overrides={"crf": None})
    q = np.concatenate([plain.predict_ids(ds.image(k)).ravel() for k in keys])
    assert rows["without CRF"]["mcc"] == pytest.approx(matthews_corrcoef(y, q), abs=1e-9)


def test_default_bias_auto_is_the_regularised_fit():
    """`build --bias auto` tunes with the same regularised rule as --tune oof: never beyond
    [-1, 2] (the old search went to its grid's edge, -2, on over-predicted classes), and the
    value closest to zero that keeps most of the gain."""
    from glacier_submit.tuning.bias import tune_bias

    rng = np.random.default_rng(3)
    labels = [rng.choice(4, (60, 60), p=[0.7, 0.2, 0.08, 0.02]) for _ in range(4)]
    probs = []
    for lab in labels:  # a model that calls lake everywhere: the best bias for it is very negative
        p = np.full((4, 60, 60), 0.1, np.float32)
        for c in range(3):
            p[c][lab == c] += 0.5
        p[3] += 0.55
        probs.append(p / p.sum(0))
    bias, before, after = tune_bias(probs, labels)
    assert all(-1.0 <= b <= 2.0 for b in bias), bias
    assert bias[3] < 0 and after > before + 0.1


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
