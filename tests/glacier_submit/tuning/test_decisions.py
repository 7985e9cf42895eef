"""--tune oof: decisions that follow the evidence (seed averaging, post-processing, TTA under a
time budget, the bias cross-fitted, the CRF step) and keep the simple setting without it."""
import numpy as np

from glacier_submit.tuning.decisions import render_decisions, tune
from training.rundir import OOFSet

from tests.helpers import probs_from_ids

K = 4
LIGHT = [{"rule": "min_area", "class": c, "min_area": 6} for c in (3, 2, 1)]


def _blocky_labels(rng, n=10, size=32):
    out = []
    for _ in range(n):
        lab = np.zeros((size, size), np.int64)
        for c in (1, 2, 3):
            y0, x0 = rng.integers(0, size - 10, 2)
            lab[y0:y0 + 10, x0:x0 + 10] = c
        out.append(lab)
    return out


def _oof(labels, probs_by_member, fold_of, members_of_fold):
    keys = [f"t{i}" for i in range(len(labels))]
    return OOFSet(keys=keys, labels=dict(zip(keys, labels)), fold_of=fold_of, probs=probs_by_member,
                  members_of_fold=members_of_fold)


def test_tune_adopts_seed_averaging_and_postprocessing_when_they_help():
    rng = np.random.default_rng(3)
    labels = _blocky_labels(rng)
    keys = [f"t{i}" for i in range(len(labels))]
    fold_of = {k: i % 5 for i, k in enumerate(keys)}
    probs, members = {}, {}
    for f in range(5):
        for s in range(2):
            name = f"fold{f}_seed{s}"
            members.setdefault(f, []).append(name)
            # independent heavy noise per seed: the mean of two seeds is clearly better
            probs[name] = {k: probs_from_ids(lab, sharp=1.2, rng=rng) for k, lab in zip(keys, labels) if fold_of[k] == f}
    oof = _oof(labels, probs, fold_of, members)
    res = tune(oof, K, presets={"none": [], "light": LIGHT}, n_boot=300)
    got = {d.setting: d for d in res.decisions}
    assert got["seeds per fold"].adopted and res.settings["members"]["0"] == ["fold0_seed0", "fold0_seed1"]
    assert got["postprocess"].adopted and res.settings["postprocess"] == "light"  # speckle on blocky labels
    assert "tta" in got and not got["tta"].adopted  # no tiles to re-predict: said so, not tuned
    assert "lower bound" in render_decisions(res)
    man = res.manifest()
    assert man["tiles"] == keys and man["settings"]["postprocess"] == "light"


def test_tune_keeps_simple_settings_without_evidence_and_respects_time_budget():
    rng = np.random.default_rng(4)
    labels = _blocky_labels(rng)
    keys = [f"t{i}" for i in range(len(labels))]
    fold_of = {k: i % 5 for i, k in enumerate(keys)}
    clean = {f"fold{f}_seed0": {k: probs_from_ids(lab) for k, lab in zip(keys, labels) if fold_of[k] == f}
             for f in range(5)}
    oof = _oof(labels, clean, fold_of, {f: [f"fold{f}_seed0"] for f in range(5)})
    calls = []

    def predict(ks, tta, scales, members):
        calls.append((tta, tuple(scales)))
        # d4 is better than none, flips is identical to none
        acc = 0.95 if tta == "d4" else 0.7
        r = np.random.default_rng(len(calls))
        return {k: probs_from_ids(np.where(r.random(oof.labels[k].shape) < acc, oof.labels[k],
                                             r.integers(0, K, oof.labels[k].shape))) for k in ks}

    cost = {"none": 1.0, "flips": 2.0, "d4": 8.0}
    res = tune(oof, K, predict=predict, cost=lambda s: cost[s["tta"]] * len(s["scales"]), time_budget=4.0,
               presets={"none": [], "light": LIGHT}, n_boot=300)
    got = {(d.setting, str(d.candidate)): d for d in res.decisions}
    assert ("d4", (1.0,)) not in calls           # over the budget: never predicted
    assert not got[("tta", "d4")].adopted and "budget" in got[("tta", "d4")].reason
    assert res.settings["tta"] == "none"          # flips: no gain, the simpler setting stays
    assert res.settings["scales"] == [1.0]        # 3 scales fit the budget (3 s) but bring no gain
    assert res.settings["bias"] is None


def test_bias_adopted_for_an_under_predicted_class_cross_fitted():
    rng = np.random.default_rng(5)
    labels = _blocky_labels(rng, n=15)
    keys = [f"t{i}" for i in range(len(labels))]
    fold_of = {k: i % 5 for i, k in enumerate(keys)}
    probs = {f"fold{f}_seed0": {k: probs_from_ids(lab, rng=rng, under=3) for k, lab in zip(keys, labels)
                                if fold_of[k] == f} for f in range(5)}
    oof = _oof(labels, probs, fold_of, {f: [f"fold{f}_seed0"] for f in range(5)})
    res = tune(oof, K, n_boot=300)
    d = [d for d in res.decisions if d.setting == "bias"][0]
    assert d.adopted and "cross-fitted" in d.reason
    assert res.settings["bias"][3] > 0 and res.settings["bias"][0] == 0


def _box_smooth(probs, r=2):
    """An independent refinement for the decision test: a box filter of the probabilities
    (scipy), which removes independent per-pixel noise on blocky labels."""
    from scipy.ndimage import uniform_filter

    return {k: uniform_filter(p, size=(1, 2 * r + 1, 2 * r + 1), mode="nearest") for k, p in probs.items()}


def test_crf_step_adopted_when_it_helps_and_refused_when_it_hurts_or_costs_too_much():
    rng = np.random.default_rng(6)
    labels = _blocky_labels(rng)
    keys = [f"t{i}" for i in range(len(labels))]
    fold_of = {k: i % 5 for i, k in enumerate(keys)}
    noisy = {f"fold{f}_seed0": {k: probs_from_ids(lab, sharp=1.2, rng=rng) for k, lab in zip(keys, labels)
                                if fold_of[k] == f} for f in range(5)}
    oof = _oof(labels, noisy, fold_of, {f: [f"fold{f}_seed0"] for f in range(5)})
    seen = []

    def helps(p):
        seen.append(sorted(p))
        return _box_smooth(p)

    res = tune(oof, K, refine=helps, n_boot=300)
    crf = [d for d in res.decisions if d.setting == "crf"][0]
    assert crf.adopted and crf.lo > 0 and res.settings["crf"] is True
    assert seen == [keys]  # judged on every OOF tile, once

    def hurts(p):  # scrambles the class channels: must not be adopted
        return {k: v[::-1].copy() for k, v in p.items()}

    res = tune(oof, K, refine=hurts, n_boot=300)
    assert not [d for d in res.decisions if d.setting == "crf"][0].adopted and res.settings["crf"] is False

    calls = []
    res = tune(oof, K, refine=lambda p: calls.append(1) or _box_smooth(p), n_boot=300, time_budget=1.0,
               cost=lambda s: 5.0 if s.get("crf") else 0.5)
    d = [d for d in res.decisions if d.setting == "crf"][0]
    assert not d.adopted and "budget" in d.reason and not calls  # never computed over the budget

    res = tune(oof, K, n_boot=300)  # no bands to refine with: said so
    d = [d for d in res.decisions if d.setting == "crf"][0]
    assert not d.adopted and "--tune-data" in d.reason
