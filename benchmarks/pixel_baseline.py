"""Per-pixel baseline on the synthetic benchmark: a gradient-boosted classifier on the 5
band values of each pixel (no spatial context), trained on the train split and scored
with the competition MCC on the unseen split. A CNN must beat this clearly; if a per-pixel
rule reaches the CNN's score, the generator is too easy.

    python benchmarks/pixel_baseline.py --data demo/synth --out benchmarks/results/pixel_baseline.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result

from training.data.competition import CompetitionDataset
from training.metrics import ConfusionAccumulator


def features(img: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(img.reshape(img.shape[0], -1).T, nan=0.0)
    return x.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="demo/synth", help="folder holding train/ and unseen/ from glacier-train synth")
    ap.add_argument("--samples", type=int, default=300_000, help="training pixels sampled (class-stratified)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", default=None, help="folds.json: also report the per-fold validation MCC (same folds as CV)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    from sklearn.ensemble import HistGradientBoostingClassifier

    train = CompetitionDataset(os.path.join(args.data, "train"))
    unseen = CompetitionDataset(os.path.join(args.data, "unseen"))
    rng = np.random.default_rng(args.seed)
    X = np.concatenate([features(train.image(k)) for k in train.keys])
    y = np.concatenate([train.label(k).reshape(-1) for k in train.keys])
    idx = rng.choice(len(y), min(args.samples, len(y)), replace=False)
    t0 = time.time()
    clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, random_state=args.seed)
    clf.fit(X[idx], y[idx])
    fit_s = time.time() - t0
    results = {}
    for name, ds in (("train", train), ("unseen", unseen)):
        acc = ConfusionAccumulator(4)
        for k in ds.keys:
            pred = clf.predict(features(ds.image(k))).reshape(ds.label(k).shape)
            acc.update(ds.label(k), pred)
        results[name] = {"mcc": acc.mcc, "per_class": acc.per_class(train.class_names)}
    out = {
        "benchmark": "pixel_baseline",
        "model": "HistGradientBoostingClassifier(max_iter=300) on 5 band values per pixel",
        "train_tiles": len(train), "unseen_tiles": len(unseen), "fit_seconds": round(fit_s, 1),
        "mcc_train": round(results["train"]["mcc"], 4), "mcc_unseen": round(results["unseen"]["mcc"], 4),
        "per_class_unseen": results["unseen"]["per_class"],
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.folds:
        from training.folds import fold_split, load_folds

        folds = load_folds(args.folds)
        per_fold = []
        for f in folds["folds"]:
            tr, va = fold_split(folds, f["fold"])
            Xf = np.concatenate([features(train.image(k)) for k in tr])
            yf = np.concatenate([train.label(k).reshape(-1) for k in tr])
            sel = rng.choice(len(yf), min(args.samples, len(yf)), replace=False)
            m = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, random_state=args.seed).fit(Xf[sel], yf[sel])
            acc = ConfusionAccumulator(4)
            for k in va:
                acc.update(train.label(k), m.predict(features(train.image(k))).reshape(train.label(k).shape))
            per_fold.append(round(acc.mcc, 4))
        out["fold_mcc"] = per_fold
        out["mean_fold_mcc"] = round(float(np.mean(per_fold)), 4)
    print(json.dumps({k: v for k, v in out.items() if k != "per_class_unseen"}, indent=2))
    for row in out["per_class_unseen"]:
        print(f"  {row['class']:<11} mcc {row['mcc']:.3f}  iou {row['iou']:.3f}  f1 {row['f1']:.3f}")
    write_result(args.out, out)


if __name__ == "__main__":
    main()
