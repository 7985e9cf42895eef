"""glacier-submit evaluate: the MCC of exactly the masks this run wrote (missing tiles scored as
background), leaky evaluations refused or stamped (trained, tuned or folds.json tiles),
crashes and timeouts reported, tile-id collisions, ablations rescored independently."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from glacier_runtime.predictor import Predictor, load_payload
from glacier_submit.bundle import build
from glacier_submit.cli import cli
from glacier_submit.evaluate import EvaluateError, LeakError, evaluate
from training.data.competition import CompetitionDataset
from training.metrics import ConfusionAccumulator

from tests.helpers import ROOT, copy_tiles_as, fake_bundle, fingerprints, make_member


@pytest.fixture(scope="module")
def eval_setup(synth_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")
    train = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = train.keys
    w = make_member(str(d / "fold0_seed0.pt"), train_tiles=keys[:6], val_tiles=keys[6:],
                    tile_sha256=fingerprints(os.path.join(synth_data, "train")))
    bundle = str(d / "bundle")
    build([w], bundle, tta="flips", postprocess="light")
    return bundle, synth_data, keys


def test_clean_evaluation_mcc_equals_direct(eval_setup, tmp_path):
    bundle, data, _ = eval_setup
    r = evaluate(bundle, os.path.join(data, "unseen"), str(tmp_path / "rep"), convention="import-call")
    assert not r["leaky"] and r["mask_count"] == 4
    ds = CompetitionDataset(os.path.join(data, "unseen"))

    acc = ConfusionAccumulator(4)
    with np.load(os.path.join(tmp_path, "rep", "_masks", "returned.npz")) as z:
        for key in ds.keys:
            m = z[key.replace("img", "")]
            acc.update(ds.label(key), np.searchsorted([0, 85, 170, 255], m))
    assert abs(acc.mcc - r["mcc"]) < 1e-12
    for f in ("report.md", "report.html", "report.json", "figures/tiles.png", "figures/confusion.png"):
        assert os.path.exists(tmp_path / "rep" / f), f
    assert r["seconds_per_tile"] > 0 and r["peak_rss_mb"] > 0


@pytest.mark.slow
def test_leaky_evaluation_refused_then_stamped(eval_setup, tmp_path):
    bundle, data, keys = eval_setup
    with pytest.raises(LeakError) as exc:
        evaluate(bundle, os.path.join(data, "train"), str(tmp_path / "a"), tiles=keys[:2])
    assert keys[0] in str(exc.value) and "fold0_seed0" in str(exc.value) and "--allow-leak" in str(exc.value)
    r = evaluate(bundle, os.path.join(data, "train"), str(tmp_path / "b"), tiles=keys[:2], allow_leak=True, figures=True)
    assert r["leaky"] and "LEAKY" in open(tmp_path / "b" / "report.md").read()
    r = evaluate(bundle, os.path.join(data, "train"), str(tmp_path / "c"), tiles=keys[6:], figures=False)
    assert not r["leaky"] and "mcc" in r


def test_crashing_bundle_reported_not_traceback(eval_setup, tmp_path):
    bundle, data, _ = eval_setup
    broken = str(tmp_path / "broken")
    shutil.copytree(bundle, broken)
    with open(os.path.join(broken, "model.pth"), "wb") as fh:
        fh.write(b"garbage")
    res = CliRunner().invoke(cli, ["evaluate", "--bundle", broken, "--data", os.path.join(data, "unseen"),
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "exited with code 1" in res.output and "Last output" in res.output
    assert json.load(open(tmp_path / "r" / "report.json"))["returncode"] == 1


def test_timeout_reported(eval_setup, tmp_path):
    bundle, data, _ = eval_setup
    with pytest.raises(EvaluateError, match="timed out"):
        evaluate(bundle, os.path.join(data, "unseen"), str(tmp_path / "t"), timeout=0.5)


@pytest.mark.slow
def test_compare_ablations(eval_setup, tmp_path):
    """Each ablation row's MCC is rescored independently (the runtime's masks, sklearn's
    MCC over all pixels) and its delta equals the difference of those scores."""
    from sklearn.metrics import matthews_corrcoef

    from glacier_runtime.predictor import Predictor, load_payload

    bundle, data, _ = eval_setup
    r = evaluate(bundle, os.path.join(data, "unseen"), str(tmp_path / "cmp"), compare=True, figures=False)
    rows = {v["variant"]: v for v in r["ablations"]}
    assert r["ablations"][0]["variant"] == "bundle as built" and "no TTA" in rows and "D4" in rows
    assert any("without min_area" in n for n in rows) and "bundle as built - no post-processing" in rows
    assert abs(r["ablations"][0]["mcc"] - r["mcc"]) < 1e-12  # in-process == sandboxed bundle

    ds = CompetitionDataset(os.path.join(data, "unseen"))
    payload = load_payload(os.path.join(bundle, "model.pth"))
    y = np.concatenate([ds.label(k).ravel() for k in ds.keys])

    def score(overrides):
        pred = Predictor.from_payload(payload, device="cpu", overrides=overrides)
        return matthews_corrcoef(y, np.concatenate([pred.predict_ids(ds.image(k)).ravel() for k in ds.keys]))

    base = score({})
    for name, overrides in (("no TTA", {"tta": "none"}), ("D4", {"tta": "d4"}),
                            ("bundle as built - no post-processing", {"postprocess": []})):
        want = score(overrides)
        assert abs(rows[name]["mcc"] - want) < 1e-9, name
        assert abs(rows[name]["delta_mcc"] - (want - base)) < 1e-9, name
    assert len({round(v["mcc"], 9) for v in r["ablations"]}) > 1  # the variants really differ
    adapted = Predictor.from_payload(payload, device="cpu", overrides={"adapt": "bn"})
    adapted.adapt_bn([ds.image(k) for k in ds.keys])  # on the evaluated tiles, as the bundle would
    want = matthews_corrcoef(y, np.concatenate([adapted.predict_ids(ds.image(k)).ravel() for k in ds.keys]))
    assert abs(rows["with batch-norm adaptation (--adapt bn)"]["mcc"] - want) < 1e-9


@pytest.mark.slow
def test_predict_only_without_labels(eval_setup, tmp_path):
    bundle, data, _ = eval_setup
    nolab = tmp_path / "nolab"
    shutil.copytree(os.path.join(data, "unseen"), nolab)
    shutil.rmtree(nolab / "labels")
    r = evaluate(bundle, str(nolab), str(tmp_path / "p"), figures=False)
    assert "mcc" not in r and r["mask_count"] == 4 and r["note"].startswith("no labels")


def test_fold_needs_folds_file(eval_setup, tmp_path):
    bundle, data, _ = eval_setup
    with pytest.raises(EvaluateError, match="--folds"):
        evaluate(bundle, os.path.join(data, "train"), str(tmp_path / "x"), fold=0)


def test_kfold_ensemble_has_no_clean_fold(eval_setup, tmp_path):
    from training.folds import save_folds

    bundle, data, keys = eval_setup
    folds = {"k": 2, "folds": [{"fold": 0, "val": keys[:2], "train": keys[2:]},
                               {"fold": 1, "val": keys[2:], "train": keys[:2]}]}
    path = str(tmp_path / "folds.json")
    save_folds(folds, path)
    with pytest.raises(LeakError, match="no clean fold"):
        evaluate(bundle, os.path.join(data, "train"), str(tmp_path / "k"), fold=0, folds=path)


def test_prefilled_masks_with_labels_and_empty_solution_do_not_score(setup, tmp_path):
    from sklearn.metrics import matthews_corrcoef

    bundle, data, _, _ = setup
    unseen = os.path.join(data, "unseen")
    out = tmp_path / "rep"
    (out / "_masks").mkdir(parents=True)
    for name in os.listdir(os.path.join(unseen, "labels")):  # the labels themselves, as "earlier" masks
        shutil.copy(os.path.join(unseen, "labels", name), out / "_masks" / name)
    empty = fake_bundle(tmp_path, bundle, "")
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
    lab = os.path.join({unseen!r}, "labels")
    for n in sorted(os.listdir(lab)):
        if not n.startswith({skip!r}):
            shutil.copy(os.path.join(lab, n), os.path.join(args["--output"], n))
    '''
    r = evaluate(fake_bundle(tmp_path, bundle, src), unseen, str(tmp_path / "r"), figures=False)
    assert r["missing"] == [skip]
    truth = np.concatenate([ds.label(k).ravel() for k in ds.keys])
    pred = np.concatenate([(np.zeros_like if k == skip else np.asarray)(ds.label(k)).ravel() for k in ds.keys])
    assert abs(r["mcc"] - matthews_corrcoef(truth, pred)) < 1e-12 and r["mcc"] < 1.0


def test_tile_id_collision_is_an_error_naming_both_files(setup, tmp_path):
    from glacier_runtime.entry import predict_folder
    from glacier_runtime.predictor import Predictor, load_payload
    from glacier_runtime.tiles import TileIdCollision

    bundle, data, _, _ = setup
    d = str(tmp_path / "coll")
    copy_tiles_as(os.path.join(data, "unseen"), d, [("img001.tif", "a001.tif"), ("img002.tif", "b001.tif")])
    with pytest.raises(EvaluateError) as exc:
        evaluate(bundle, d, str(tmp_path / "r"), figures=False)
    assert "a001.tif" in str(exc.value) and "b001.tif" in str(exc.value) and "'001'" in str(exc.value)
    pred = Predictor.from_payload(load_payload(os.path.join(bundle, "model.pth")), device="cpu")
    with pytest.raises(TileIdCollision, match="b001.tif"):
        predict_folder(pred, d, str(tmp_path / "o"), progress=False)


def test_leakage_is_known_by_content_not_by_name(setup, tmp_path):
    """Phase-2 train and test tiles share names: a training tile under a new name is still a leak,
    an unseen tile that shares a training tile's name is not; a member without fingerprints
    (older checkpoints) falls back to names."""
    import dataclasses

    from glacier_submit.evaluate import leakage
    from glacier_submit.manifest import Manifest

    bundle, data, keys, _ = setup
    manifest = Manifest.load(bundle)
    train_sha = fingerprints(os.path.join(data, "train"))
    unseen_sha = fingerprints(os.path.join(data, "unseen"))
    assert set(unseen_sha) & set(keys[:6]), "the fixture must reuse names across splits"
    assert leakage(manifest, sorted(unseen_sha), unseen_sha) == {}
    renamed = {"img900": train_sha[keys[1]], "img901": unseen_sha["img001"]}
    assert leakage(manifest, sorted(renamed), renamed) == {"fold0_seed0": ["img900"]}
    old = dataclasses.replace(manifest, members=[dataclasses.replace(m, train_sha256=[]) for m in manifest.members])
    assert leakage(old, sorted(unseen_sha), unseen_sha) == {"fold0_seed0": sorted(set(unseen_sha) & set(keys[:6]))}

    d = str(tmp_path / "renamed")
    copy_tiles_as(os.path.join(data, "train"), d, [(f"{keys[1]}.tif", "img900.tif")])
    with pytest.raises(LeakError, match="img900"):
        evaluate(bundle, d, str(tmp_path / "rep"))


def test_bias_tuned_on_evaluated_tiles_is_leaky(synth_data, tmp_path):
    keys = CompetitionDataset(os.path.join(synth_data, "train")).keys
    wdir = tmp_path / "w"
    wdir.mkdir()
    w = make_member(str(wdir / "fold0_seed0.pt"), train_tiles=keys[:6], val_tiles=keys[6:],
                    tile_sha256=fingerprints(os.path.join(synth_data, "train")))
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
    for band in ("Band1", "Band2", "Band3", "Band4", "Band5", "labels"):
        folder = os.path.join(train, band)
        os.unlink(os.path.join(folder, sorted(os.listdir(folder))[-1]))
    with pytest.raises(EvaluateError, match="other data"):
        evaluate(bundle, train, str(tmp_path / "bad2"), fold=0, folds=folds, allow_leak=True, figures=False)


def test_tuned_bundle_refuses_leaky_evaluation(oof_members, synth_data, tmp_path):
    from glacier_submit.bundle import build
    from glacier_submit.evaluate import leakage
    from glacier_submit.manifest import Manifest

    _, paths, keys = oof_members
    m = build(paths, str(tmp_path / "b"), tune="oof", check_size=(64, 64))
    assert "tuned tuning" in leakage(Manifest.from_dict(m), keys[:1])
    assert leakage(Manifest.from_dict(m), ["99_99"]) == {}
    # the evaluation report repeats each decision (value kept, gain, interval, why)
    from glacier_submit.report import render_report

    text = render_report({"tuning_decisions": m["tuning"]["decisions"], "seconds": 1.0, "seconds_per_tile": 0.5,
                          "peak_rss_mb": 10.0})
    assert "--tune oof" in text
    for d in m["tuning"]["decisions"]:
        assert any(line.startswith(d["setting"]) and d["reason"] in line for line in text.splitlines()), d


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


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_evaluate_hides_the_gpus_from_the_bundle_by_default(tiny_members, synth_data, tmp_path, monkeypatch):
    import glacier_submit.evaluate as ev
    from glacier_submit.bundle import build

    build(tiny_members, str(tmp_path / "b"), bias="none", check_size=(64, 64))
    seen = []

    def fake_run_bundle(bundle, data, convention, out_dir, timeout, python, env=None):
        seen.append(env)
        raise SystemExit("stop here")

    monkeypatch.setattr(ev, "run_bundle", fake_run_bundle)
    for device, want in (("cpu", {"CUDA_VISIBLE_DEVICES": "", "GLACIER_DEVICE": "cpu"}), ("cuda", {})):
        with pytest.raises(SystemExit):
            ev.evaluate(str(tmp_path / "b"), os.path.join(synth_data, "unseen"), str(tmp_path / f"r{device}"),
                        device=device)
        assert seen[-1] == want


def test_held_out_bundle_with_a_fitted_bias_is_refused_and_the_fix_named(tmp_path, synth_data):
    """Members whose OOF predictions make --bias auto fit a non-zero bias: the default build's
    bundle is refused on the held-out fold and the message names --bias none; the notebook's
    flags give a bundle that evaluates."""
    from glacier_submit.bundle import build
    from glacier_submit.evaluate import LeakError, evaluate
    from tests.helpers import make_member
    from training.data.competition import CompetitionDataset
    from training.folds import data_provenance, dataset_files, save_folds

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = sorted(ds.keys)
    val, train = keys[:2], keys[2:]
    folds = {"folds": [{"fold": 0, "val": val, "train": train, "val_class_pixels": []}],
             "provenance": data_provenance(dataset_files(ds))}
    folds_file = str(tmp_path / "folds.json")
    save_folds(folds, folds_file)
    w = tmp_path / "weights"
    member = make_member(str(w / "fold0_seed0.pt"), train_tiles=train, val_tiles=val,
                         tile_sha256=fingerprints(os.path.join(synth_data, "train")))
    rng = np.random.default_rng(0)
    for key in val:  # OOF that under-predicts the rare classes: --bias auto moves them
        lab = ds.label(key)
        p = np.full((4,) + lab.shape, 0.05, np.float32)
        p[0] += 0.5
        for c in (1, 2, 3):
            p[c][lab == c] += 0.42
        p += 0.01 * rng.random(p.shape).astype(np.float32)
        os.makedirs(w / "oof" / "fold0_seed0", exist_ok=True)
        os.makedirs(w / "oof" / "labels", exist_ok=True)
        np.save(w / "oof" / "fold0_seed0" / f"{key}.npy", (p / p.sum(0)).astype(np.float16))
        np.save(w / "oof" / "labels" / f"{key}.npy", lab)
    m = build([member], str(tmp_path / "auto"), check_size=(64, 64))
    assert any(v != 0 for v in m["bias"]["values"])
    with pytest.raises(LeakError, match="--bias none"):
        evaluate(str(tmp_path / "auto"), os.path.join(synth_data, "train"), str(tmp_path / "r1"), fold=0,
                 folds=folds_file, figures=False)
    nb = json.load(open(os.path.join(ROOT, "notebooks", "kaggle_dual_t4.ipynb")))
    code = "\n".join("".join(c["source"]) for c in nb["cells"])
    flags = code.split('HELDOUT_BUILD_FLAGS = "')[1].split('"')[0].split()
    kw = {"tta": flags[flags.index("--tta") + 1], "postprocess": flags[flags.index("--postprocess") + 1],
          "bias": flags[flags.index("--bias") + 1]}
    build([member], str(tmp_path / "honest"), check_size=(64, 64), **kw)
    r = evaluate(str(tmp_path / "honest"), os.path.join(synth_data, "train"), str(tmp_path / "r2"), fold=0,
                 folds=folds_file, figures=False)
    assert not r["leaky"] and "mcc" in r
