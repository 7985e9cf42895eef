"""Where the synthetic scenes' difficulty comes from: the per-pixel baseline's and the
quickstart CNN's MCC on the default training region with all effects on, and with each
physical effect off in turn (`glacier-train synth --without EFFECT`).

Both are scored out of fold on the same folds (grouped by the rebuilt mosaic); the CNN
trains ``--cnn-folds`` of them (all by default) with ``configs/quickstart.yaml``; intervals
are bootstrap intervals over tiles (90 %).

    python benchmarks/generator_ablation.py --work /tmp/ablation --out benchmarks/results/generator_ablation.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_result
from _region_tools import ROOT, bootstrap, cv_oof, run, tool

EFFECTS = ("inventory_labels", "label_resampling", "misregistration", "label_omission", "psf", "topo_shading",
           "cast_shadows", "clouds", "snow", "lake_variants", "weak_debris_thermal", "calibration")


def baseline_oof(data: str, folds_path: str, seed: int = 0, only=None) -> dict:
    """The per-pixel baseline out of fold: per fold trained on its training tiles (only the
    folds in ``only`` when given: the ones the CNN is scored on)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from training.data.competition import CompetitionDataset
    from training.folds import fold_split, load_folds
    from training.metrics import tile_confusions

    ds, folds = CompetitionDataset(data), load_folds(folds_path)
    out = {}
    for f in folds["folds"]:
        if only is not None and f["fold"] not in only:
            continue
        tr, va = fold_split(folds, f["fold"])
        X = np.concatenate([np.nan_to_num(ds.image(k).reshape(5, -1).T) for k in tr])
        y = np.concatenate([ds.label(k).reshape(-1) for k in tr])
        idx = np.random.default_rng(seed).choice(len(y), min(150_000, len(y)), replace=False)
        counts = np.bincount(y[idx], minlength=4)
        idx = idx[counts[y[idx]] > 1]  # a class seen once breaks the stratified early-stopping split
        clf = HistGradientBoostingClassifier(max_iter=150, random_state=seed).fit(X[idx], y[idx])
        for k in va:
            pred = clf.predict(np.nan_to_num(ds.image(k).reshape(5, -1).T)).reshape(ds.label(k).shape)
            out[k] = tile_confusions([pred], [ds.label(k)], 4)[0]
    return out


def one(work: str, without, a) -> dict:
    name = without or "all effects on"
    d = os.path.join(work, (without or "all_on"))
    log = os.path.join(d, "commands.log")
    if not os.path.exists(os.path.join(d, "synth", ".glacier-synth.json")):
        run(tool("glacier-train") + ["synth", "--out", os.path.join(d, "synth"), "--tiles", str(a.tiles), "--size",
                                     str(a.size), str(a.size), "--seed", str(a.seed)]
            + (["--without", without] if without else []))
    data = os.path.join(d, "synth", "train")
    folds = os.path.join(d, "folds.json")
    run(tool("glacier-train") + ["folds", data, "--k", str(a.k), "--out", folds], log)
    base = baseline_oof(data, folds, a.seed, only=a.cnn_folds or None)
    cmd = tool("glacier-train") + ["cv", "--config", a.config, "--data", data, "--folds", folds, "--out",
                                   os.path.join(d, "weights"), "--no-progress", *[x for s in a.sets for x in ("--set", s)]]
    for f in a.cnn_folds or []:
        cmd += ["--fold", str(f)]
    run(cmd, log)
    cnn = cv_oof(os.path.join(d, "weights"), data)
    base = {k: v for k, v in base.items() if k in cnn}  # the same tiles
    b, c = bootstrap(list(base.values())), bootstrap(list(cnn.values()))
    return {"effect_off": name, "tiles_scored": len(cnn), "baseline": [round(x, 4) for x in b],
            "cnn": [round(x, 4) for x in c], "cnn_minus_baseline": round(c[0] - b[0], 4)}


def render(rows) -> str:
    lines = [f"{'generator':<28} {'per-pixel baseline':>24} {'quickstart CNN':>24} {'CNN - baseline':>15}"]
    for r in rows:
        lines.append(f"{r['effect_off'] if r['effect_off'] == 'all effects on' else 'without ' + r['effect_off']:<28} "
                     f"{r['baseline'][0]:.3f} [{r['baseline'][1]:.3f}, {r['baseline'][2]:.3f}]   "
                     f"{r['cnn'][0]:.3f} [{r['cnn'][1]:.3f}, {r['cnn'][2]:.3f}] {r['cnn_minus_baseline']:>+15.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--effects", nargs="*", default=list(EFFECTS))
    ap.add_argument("--tiles", type=int, default=25)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--cnn-folds", type=int, nargs="*", default=None, help="train only these folds (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.time()
    rows = []
    for without in [None] + list(a.effects):
        rows.append(one(a.work, without, a))
        print(render(rows), flush=True)
    write_result(a.out, {"benchmark": "generator_ablation", "rows": rows, "tiles": a.tiles, "size": a.size, "k": a.k,
                         "cnn_folds": a.cnn_folds, "sets": a.sets, "seconds": round(time.time() - t0),
                         "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
