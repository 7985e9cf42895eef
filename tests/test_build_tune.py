"""build --tune oof end to end: decisions from the members' OOF arrays, recorded in the
manifest with the tiles they saw, and the leakage guard on those tiles."""
import json
import os

import numpy as np
import pytest

from tests.conftest import make_member


@pytest.fixture(scope="module")
def oof_members(synth_data, tmp_path_factory):
    from training.data.competition import CompetitionDataset

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = sorted(ds.keys)
    folds = {f: keys[f::3] for f in range(3)}
    w = tmp_path_factory.mktemp("tune_weights")
    rng = np.random.default_rng(0)
    paths = []
    os.makedirs(w / "oof" / "labels", exist_ok=True)
    for f, val in folds.items():
        train = [k for k in keys if k not in val]
        for s in range(2):
            name = f"fold{f}_seed{s}"
            paths.append(make_member(str(w / f"{name}.pt"), seed=10 * f + s, fold=f, train_tiles=train,
                                     val_tiles=val, val_mcc=0.6 + 0.01 * s))
            os.makedirs(w / "oof" / name)
            for k in val:
                y = ds.label(k)
                logits = np.eye(4, dtype=np.float32)[y].transpose(2, 0, 1) * 1.2
                logits += rng.normal(0, 1.0, logits.shape).astype(np.float32)  # independent noise per seed
                p = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
                np.save(w / "oof" / name / f"{k}.npy", p.astype(np.float16))
                np.save(w / "oof" / "labels" / f"{k}.npy", y)
    return str(w), paths, keys


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


def test_tune_needs_oof(tiny_members, tmp_path):
    from glacier_submit.bundle import build

    with pytest.raises(ValueError, match="out-of-fold predictions"):
        build(tiny_members, str(tmp_path / "b"), tune="oof", check_size=(64, 64))
    assert not os.path.exists(tmp_path / "b" / "solution.py")
