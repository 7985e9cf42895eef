"""glacier-submit evaluate: clean, leaky (refused / stamped), crashes and timeouts, MCC."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from glacier_submit.bundle import build
from glacier_submit.cli import cli
from glacier_submit.evaluate import EvaluateError, LeakError, evaluate
from training.data.competition import CompetitionDataset
from training.metrics import ConfusionAccumulator
from tests.conftest import make_member


@pytest.fixture(scope="module")
def eval_setup(synth_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")
    train = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = train.keys
    w = make_member(str(d / "fold0_seed0.pt"), train_tiles=keys[:6], val_tiles=keys[6:])
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


@pytest.mark.slow
def test_predict_only_without_labels(eval_setup, tmp_path):
    bundle, data, _ = eval_setup
    nolab = tmp_path / "nolab"
    shutil.copytree(os.path.join(data, "unseen"), nolab)
    shutil.rmtree(nolab / "label")
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
