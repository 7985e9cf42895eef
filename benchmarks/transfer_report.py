"""Transfer report: CV from scratch vs CV after pre-training on fake HKH, same budget.

Steps (each skipped if its output exists, so the script resumes):
  1. fake HKH patches (the synthetic terrain in HKH's 15 channels, another region)
  2. glacier-train pretrain --config configs/hkh_pretrain_quick.yaml
  3. glacier-train cv from scratch (configs/quickstart.yaml)   [or --scratch DIR to reuse]
  4. glacier-train cv --init-from hkh.pt (same config, folds, seed)

    python benchmarks/transfer_report.py --data demo/synth/train --folds demo/folds.json \
        --scratch demo/weights --work demo/transfer --out benchmarks/results/transfer.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_result

BIN = os.path.dirname(sys.executable)


def run(cmd):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="demo/synth/train")
    ap.add_argument("--folds", default="demo/folds.json")
    ap.add_argument("--scratch", default=None, help="existing from-scratch CV folder (same config) to reuse")
    ap.add_argument("--work", default="demo/transfer")
    ap.add_argument("--hkh-train", type=int, default=96)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    hkh = os.path.join(args.work, "hkh")
    if not os.path.isdir(hkh):
        run([os.path.join(BIN, "glacier-train"), "synth-hkh", "--out", hkh, "--train", str(args.hkh_train),
             "--val", "16", "--size", "128", "--seed", "5"])
    ckpt = os.path.join(args.work, "hkh.pt")
    if not os.path.exists(ckpt):
        run([os.path.join(BIN, "glacier-train"), "pretrain", "--config", "configs/hkh_pretrain_quick.yaml",
             "--data", hkh, "--out", ckpt, "--no-progress"])
    scratch = args.scratch or os.path.join(args.work, "scratch")
    common = ["--config", "configs/quickstart.yaml", "--data", args.data, "--folds", args.folds, "--seeds", "0",
              "--no-progress"]
    run([os.path.join(BIN, "glacier-train"), "cv", *common, "--out", scratch])
    pre = os.path.join(args.work, "pretrained")
    run([os.path.join(BIN, "glacier-train"), "cv", *common, "--out", pre, "--init-from", ckpt])
    a = json.load(open(os.path.join(scratch, "cv_summary.json")))
    b = json.load(open(os.path.join(pre, "cv_summary.json")))
    rows = []
    for ra, rb in zip(sorted(a["members"], key=lambda r: r["fold"]), sorted(b["members"], key=lambda r: r["fold"])):
        rows.append({"fold": ra["fold"], "scratch": ra["val_mcc"], "pretrained": rb["val_mcc"],
                     "delta": rb["val_mcc"] - ra["val_mcc"]})
    out = {"benchmark": "transfer", "folds": rows, "mean_scratch": a["mean_val_mcc"], "mean_pretrained": b["mean_val_mcc"],
           "delta_mean": b["mean_val_mcc"] - a["mean_val_mcc"], "oof_scratch": a["oof_mcc"], "oof_pretrained": b["oof_mcc"],
           "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d")}
    for r in rows:
        print(f"fold {r['fold']}: scratch {r['scratch']:.4f}  pretrained {r['pretrained']:.4f}  delta {r['delta']:+.4f}")
    print(f"mean: scratch {out['mean_scratch']:.4f}  pretrained {out['mean_pretrained']:.4f}  delta {out['delta_mean']:+.4f}")
    write_result(args.out, out)


if __name__ == "__main__":
    main()
