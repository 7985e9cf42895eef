"""Which post-processing rules help, measured on out-of-fold predictions (never on the
tiles a bundle is scored on): MCC of every preset and of each rule alone.

    python benchmarks/postprocess_oof.py --weights demo/weights --out benchmarks/results/postprocess_oof.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result
from glacier_submit.postprocessing import load_postprocess
from glacier_runtime import postprocess
from training.rundir import OOFMember, RunDir, read_oof
from training.metrics import ConfusionAccumulator


def score(ids, labels) -> float:
    acc = ConfusionAccumulator(4)
    for p, y in zip(ids, labels):
        acc.update(y, p)
    return acc.mcc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="demo/weights")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = RunDir(args.weights)
    names = run.oof_members()
    oof = read_oof([OOFMember.from_folder(run, n) for n in names])
    keys = oof.keys
    probs, labels = [oof.mean_probs(k) for k in keys], [oof.labels[k] for k in keys]
    if not probs:
        raise SystemExit(f"no out-of-fold predictions under {args.weights}/oof")
    raw = [p.argmax(0).astype(np.uint8) for p in probs]  # saved OOF already has masked -> background
    base = score(raw, labels)
    rows = [{"variant": "argmax, no post-processing", "mcc": base, "delta": 0.0}]
    seen = set()
    for preset in ("light", "competition"):
        rules = load_postprocess(preset)
        m = score([postprocess.apply(r, rules) for r in raw], labels)
        rows.append({"variant": f"preset {preset}", "mcc": m, "delta": m - base})
        for rule in rules:
            key = repr(sorted(rule.items()))
            if key in seen:
                continue
            seen.add(key)
            m = score([postprocess.apply(r, [rule]) for r in raw], labels)
            desc = ", ".join(f"{k}={v}" for k, v in rule.items() if k != "rule")
            rows.append({"variant": f"only {rule['rule']} ({desc})", "mcc": m, "delta": m - base})
    for r in rows:
        print(f"{r['variant']:<70} {r['mcc']:.4f} {r['delta']:+.4f}")
    write_result(args.out, {"benchmark": "postprocess_oof", "oof_tiles": len(keys), "members": names,
                            "rows": rows, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
