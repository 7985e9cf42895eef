"""Evaluation scores only what this run produced; the sandbox is the platform's
(issue 13, items 1-4, 11 (stale temporaries), 14, and issue 12's import circle)."""
import ast
import json
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from glacier_submit.bundle import build
from glacier_submit.evaluate import EvaluateError, LeakError, evaluate
from glacier_submit import sandbox
from glacier_submit.sandbox import run_bundle
from training.data.competition import CompetitionDataset
from tests.conftest import make_member

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(synth_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("trust_ev")
    keys = CompetitionDataset(os.path.join(synth_data, "train")).keys
    w = make_member(str(d / "fold0_seed0.pt"), train_tiles=keys[:6], val_tiles=keys[6:])
    bundle = str(d / "bundle")
    build([w], bundle)
    return bundle, synth_data, keys, str(d)


def _fake_bundle(tmp_path, real_bundle: str, source: str) -> str:
    """A bundle folder whose solution.py is ``source`` (manifest kept for the class map)."""
    b = tmp_path / "fake"
    b.mkdir()
    shutil.copy(os.path.join(real_bundle, "manifest.json"), b / "manifest.json")
    (b / "solution.py").write_text(textwrap.dedent(source))
    return str(b)


# ---- item 1: a fresh, empty mask folder; missing tiles scored as the platform would ------------------------------

def test_prefilled_masks_with_labels_and_empty_solution_do_not_score(setup, tmp_path):
    from sklearn.metrics import matthews_corrcoef

    bundle, data, _, _ = setup
    unseen = os.path.join(data, "unseen")
    out = tmp_path / "rep"
    (out / "_masks").mkdir(parents=True)
    for name in os.listdir(os.path.join(unseen, "label")):  # the labels themselves, as "earlier" masks
        shutil.copy(os.path.join(unseen, "label", name), out / "_masks" / name)
    empty = _fake_bundle(tmp_path, bundle, "")
    r = evaluate(empty, unseen, str(out), figures=False)
    ds = CompetitionDataset(unseen)
    truth = np.concatenate([ds.label(k).ravel() for k in ds.keys])
    assert r["returncode"] == 0 and r["mask_count"] == 0
    assert sorted(r["missing"]) == sorted(ds.keys)
    assert abs(r["mcc"] - matthews_corrcoef(truth, np.zeros_like(truth))) < 1e-12  # all background: 0, never 1.0
    assert r["mcc"] < 0.5 and "MISSING" in open(out / "report.md").read()


def test_one_missing_tile_scored_as_background(setup, tmp_path):
    """A bundle that skips one tile: that tile counts as all background in the overall MCC."""
    from sklearn.metrics import matthews_corrcoef

    bundle, data, _, _ = setup
    unseen = os.path.join(data, "unseen")
    ds = CompetitionDataset(unseen)
    skip = ds.keys[0]
    src = f'''
    import os, shutil, sys
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    lab = os.path.join({unseen!r}, "label")
    for n in sorted(os.listdir(lab)):
        if not n.startswith({skip!r}):
            shutil.copy(os.path.join(lab, n), os.path.join(args["--output"], n))
    '''
    r = evaluate(_fake_bundle(tmp_path, bundle, src), unseen, str(tmp_path / "r"), figures=False)
    assert r["missing"] == [skip]
    truth = np.concatenate([ds.label(k).ravel() for k in ds.keys])
    pred = np.concatenate([(np.zeros_like if k == skip else np.asarray)(ds.label(k)).ravel() for k in ds.keys])
    assert abs(r["mcc"] - matthews_corrcoef(truth, pred)) < 1e-12 and r["mcc"] < 1.0


def test_run_bundle_refuses_a_non_empty_output_folder(setup, tmp_path):
    bundle, data, _, _ = setup
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "img001.tif").write_bytes(b"old")
    with pytest.raises(ValueError, match="not empty"):
        run_bundle(bundle, os.path.join(data, "unseen"), "imagepath", str(tmp_path / "o"))


# ---- item 2: tile-id collisions and names without digits ---------------------------------------------------------

def _copy_as(src_root: str, dst_root: str, renames):
    for band in ("Band1", "Band2", "Band3", "Band4", "Band5", "label"):
        os.makedirs(os.path.join(dst_root, band), exist_ok=True)
        for old, new in renames:
            shutil.copy(os.path.join(src_root, band, old), os.path.join(dst_root, band, new))


def test_tile_id_collision_is_an_error_naming_both_files(setup, tmp_path):
    from glacier_runtime.entry import predict_folder
    from glacier_runtime.predictor import Predictor, load_payload
    from glacier_runtime.tiles import TileIdCollision

    bundle, data, _, _ = setup
    d = str(tmp_path / "coll")
    _copy_as(os.path.join(data, "unseen"), d, [("img001.tif", "a001.tif"), ("img002.tif", "b001.tif")])
    with pytest.raises(EvaluateError) as exc:
        evaluate(bundle, d, str(tmp_path / "r"), figures=False)
    assert "a001.tif" in str(exc.value) and "b001.tif" in str(exc.value) and "'001'" in str(exc.value)
    pred = Predictor.from_payload(load_payload(os.path.join(bundle, "model.pth")), device="cpu")
    with pytest.raises(TileIdCollision, match="b001.tif"):
        predict_folder(pred, d, str(tmp_path / "o"), progress=False)


def test_name_without_digits_works_on_the_import_call_path(setup, tmp_path):
    bundle, data, _, _ = setup
    d = str(tmp_path / "nodigits")
    _copy_as(os.path.join(data, "unseen"), d, [("img001.tif", "file.tif"), ("img002.tif", "allow_pickle.tif")])
    res = run_bundle(bundle, d, "import-call", timeout=300)
    assert res.ok, res.tail()
    assert sorted(res.masks) == ["allow_pickle", "file"]  # the id of a name without digits is its stem
    r = evaluate(bundle, d, str(tmp_path / "r"), convention="import-call", figures=False)
    assert r["missing"] == [] and r["mask_count"] == 2


# ---- item 3: tuned settings and folds.json provenance ----------------------------------------------------------

def test_bias_tuned_on_evaluated_tiles_is_leaky(synth_data, tmp_path):
    keys = CompetitionDataset(os.path.join(synth_data, "train")).keys
    wdir = tmp_path / "w"
    wdir.mkdir()
    w = make_member(str(wdir / "fold0_seed0.pt"), train_tiles=keys[:6], val_tiles=keys[6:])
    rng = np.random.default_rng(0)
    oof = list(keys[6:8])  # the OOF tiles: the member never trained on them, but the bias was tuned on them
    (wdir / "oof" / "fold0_seed0").mkdir(parents=True)
    (wdir / "oof" / "labels").mkdir()
    for k in oof:
        lab = rng.integers(0, 4, (64, 64)).astype(np.uint8)
        p = rng.random((4, 64, 64)).astype(np.float32)
        np.save(wdir / "oof" / "fold0_seed0" / f"{k}.npy", p / p.sum(0))
        np.save(wdir / "oof" / "labels" / f"{k}.npy", lab)
    bundle = str(tmp_path / "b")
    m = build([w], bundle, bias="auto")
    assert m["bias"]["mode"].startswith("tuned on OOF") and m["tuned_on_tiles"] == {"bias": sorted(oof)}
    with pytest.raises(LeakError) as exc:
        evaluate(bundle, os.path.join(synth_data, "train"), str(tmp_path / "r"), tiles=oof, figures=False)
    assert "tuned bias" in str(exc.value) and oof[0] in str(exc.value)
    r = evaluate(bundle, os.path.join(synth_data, "train"), str(tmp_path / "r2"), tiles=keys[8:], figures=False)
    assert not r["leaky"]
    r = evaluate(bundle, os.path.join(synth_data, "train"), str(tmp_path / "r3"), tiles=oof, allow_leak=True,
                 figures=False)
    assert r["leaky"] and "tuned bias" in r["leaks"]


def test_folds_json_records_provenance_and_evaluate_checks_it(setup, tmp_path):
    import hashlib

    from training.cli import cli as train_cli

    bundle, data, keys, _ = setup
    train = str(tmp_path / "train")
    shutil.copytree(os.path.join(data, "train"), train)
    folds = str(tmp_path / "folds.json")
    res = CliRunner().invoke(train_cli, ["folds", train, "--k", "3", "--block", "1", "--out", folds])
    assert res.exit_code == 0, res.output
    prov = json.load(open(folds))["provenance"]
    assert prov["tiles"] == sorted(keys) and prov["files"] == 6 * len(keys)
    # an independent hash of the same files agrees
    h = hashlib.sha256()
    ds = CompetitionDataset(train)
    for k in sorted(ds.keys):
        parts = {**ds.tiles[k].bands, "label": ds.tiles[k].label}
        for part in sorted(parts):
            digest = hashlib.sha256(open(parts[part], "rb").read()).hexdigest()
            h.update(f"{k}\0{part}\0{os.path.basename(parts[part])}\0{digest}\n".encode())
    assert prov["content_sha256"] == h.hexdigest()
    fold_val = json.load(open(folds))["folds"][0]["val"]
    # same data: accepted (the member trained on some of these tiles: --allow-leak, checked after provenance)
    r = evaluate(bundle, train, str(tmp_path / "ok"), fold=0, folds=folds, allow_leak=True, figures=False)
    assert "mcc" in r and r["tiles"] == fold_val
    # one band file changed after the folds were made
    p = ds.tiles[fold_val[0]].bands["Band3"]
    raw = bytearray(open(p, "rb").read())
    raw[-1] ^= 0xFF
    open(p, "wb").write(bytes(raw))
    with pytest.raises(EvaluateError, match="different file contents"):
        evaluate(bundle, train, str(tmp_path / "bad"), fold=0, folds=folds, allow_leak=True, figures=False)
    # other data (a tile removed)
    for band in ("Band1", "Band2", "Band3", "Band4", "Band5", "label"):
        folder = os.path.join(train, band)
        os.unlink(os.path.join(folder, sorted(os.listdir(folder))[-1]))
    with pytest.raises(EvaluateError, match="other data"):
        evaluate(bundle, train, str(tmp_path / "bad2"), fold=0, folds=folds, allow_leak=True, figures=False)


# ---- item 4: the sandbox --------------------------------------------------------------------------------------

_SPY = '''
import json, os, sys
out = sys.argv[sys.argv.index("--output") + 1]
try:
    import imagecodecs
    ic = "imported"
except ImportError as exc:
    ic = str(exc)
json.dump({"env": dict(os.environ), "imagecodecs": ic, "cwd": os.getcwd()}, open(os.path.join(out, "spy.json"), "w"))
'''


def test_sandbox_environment_is_minimal(setup, tmp_path, monkeypatch):
    bundle, data, _, _ = setup
    monkeypatch.setenv("GITHUB_TOKEN", "secret-token-value")
    monkeypatch.setenv("LD_PRELOAD", "libdoesnotexist.so")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spy = _fake_bundle(tmp_path, bundle, _SPY)
    res = run_bundle(spy, os.path.join(data, "unseen"), "imagepath", str(tmp_path / "o"), timeout=120)
    assert res.ok, res.tail()
    seen = json.load(open(tmp_path / "o" / "spy.json"))
    env = seen["env"]
    for gone in ("GITHUB_TOKEN", "LD_PRELOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "PYTHONPATH"):
        assert gone not in env, gone
    assert "secret-token-value" not in json.dumps(env)
    assert env["OMP_NUM_THREADS"] == "1" and "PATH" in env
    assert env["HOME"] != os.environ.get("HOME") and env["TMPDIR"].startswith(os.path.dirname(env["HOME"]))
    assert "blocked in the platform sandbox: imagecodecs" in seen["imagecodecs"]


def test_sandbox_default_timeout_and_cleanup(setup, tmp_path, monkeypatch):
    import tempfile

    bundle, data, _, _ = setup
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(sandbox, "DEFAULT_TIMEOUT_S", 3.0)
    hang = _fake_bundle(tmp_path, bundle, "import time\ntime.sleep(120)\n")
    res = run_bundle(hang, os.path.join(data, "unseen"), "imagepath")  # no timeout given: the default applies
    assert res.timed_out and not res.ok and "3 s timeout" in res.stderr
    assert os.listdir(scratch) == []  # cwd, HOME, TMPDIR and output of the run are gone
    res = run_bundle(bundle, os.path.join(data, "unseen"), "import-call", timeout=300)
    assert res.ok and len(res.masks) == 4 and os.listdir(scratch) == []
    assert sandbox.DEFAULT_TIMEOUT_S == 3.0 and "DEFAULT_TIMEOUT_S = 600.0" in open(sandbox.__file__).read()


def test_lzw_tile_read_through_opencv_fallback_in_sandbox(setup, messy_test_data, tmp_path):
    from glacier_runtime.entry import predict_folder
    from glacier_runtime.predictor import Predictor, load_payload

    bundle, _, _, _ = setup
    res = run_bundle(bundle, messy_test_data, "imagepath", str(tmp_path / "m"), timeout=300)
    assert res.ok, res.tail()
    assert "img005.tif: decoded with OpenCV" in res.stderr  # the LZW tile: tifffile failed, cv2 read it
    ref = predict_folder(Predictor.from_payload(load_payload(os.path.join(bundle, "model.pth")), device="cpu"),
                         messy_test_data, None, progress=False)
    assert np.array_equal(res.masks["005"], ref["005"])


# ---- item 14: no matplotlib --------------------------------------------------------------------------------------

def test_report_without_matplotlib(setup, tmp_path, monkeypatch):
    bundle, data, _, _ = setup
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = evaluate(bundle, os.path.join(data, "unseen"), str(tmp_path / "r"))
    assert "mcc" in r and r["figures"] == []
    md = open(tmp_path / "r" / "report.md").read()
    assert "figures skipped: matplotlib is not installed" in md
    assert os.path.exists(tmp_path / "r" / "report.html") and os.path.exists(tmp_path / "r" / "report.json")
    assert not os.path.exists(tmp_path / "r" / "figures")


# ---- item 11 (start-up clean-up) and the import circle ------------------------------------------------------------

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


def test_evaluate_and_report_do_not_import_each_other():
    def imports(mod):
        tree = ast.parse(open(os.path.join(ROOT, "glacier_submit", mod + ".py")).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert "glacier_submit.evaluate" not in imports("report")
    assert "glacier_submit.report" in imports("evaluate")
