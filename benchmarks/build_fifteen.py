"""A 15-member build under 300 MB: 3 seeds x 5 folds of the competition config's
U-Net/ResNet-34 (scse decoder) with random weights and made-up validation MCCs, built
with `glacier-submit build --models 'W/*.pt'` and default flags. Shows the member table
the build prints; no training (weights are random: the table, sizes and fold coverage
are the claim, not the MCCs).

    python benchmarks/build_fifteen.py --work /tmp/b15 --out benchmarks/results/build_fifteen.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch

from _common import write_result
from glacier_runtime.classes import class_map
from glacier_runtime.models import build_model
from training.engine.checkpoint import FORMAT, save_atomic

SPEC = {"arch": "Unet", "encoder": "resnet34", "in_channels": 5, "classes": 4,
        "decoder_channels": [256, 128, 64, 32, 16], "decoder_attention_type": "scse"}


def write_members(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for fold in range(5):
        for seed in range(3):
            path = os.path.join(folder, f"fold{fold}_seed{seed}.pt")
            if os.path.exists(path):
                continue
            torch.manual_seed(100 * seed + fold)
            save_atomic({"format": FORMAT, "kind": "member", "spec": SPEC, "state_dict": build_model(SPEC).state_dict(),
                         "sensor": "L8", "bands": ["B2", "B3", "B4", "B6", "B10"],
                         "stats": {"mean": [0.15] * 4 + [270.0], "std": [0.1] * 4 + [10.0],
                                   "lo": [0.0] * 4 + [200.0], "hi": [1.0] * 4 + [320.0]},
                         "class_map": class_map(False), "fold": fold, "seed": seed,
                         "train_tiles": [f"t{fold}"], "val_tiles": [f"v{fold}"], "history": [],
                         "val_mcc": round(0.86 - 0.012 * fold + 0.007 * ((seed * 7 + fold * 3) % 5), 4),
                         "config": {}, "code_version": "benchmark"}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/build_fifteen")
    ap.add_argument("--out", default="benchmarks/results/build_fifteen.json")
    args = ap.parse_args()
    weights = os.path.join(args.work, "weights")
    write_members(weights)
    bundle = os.path.join(args.work, "submission")
    exe = os.path.join(os.path.dirname(sys.executable), "glacier-submit")
    t0 = time.time()
    r = subprocess.run([exe, "build", "--models", os.path.join(weights, "*.pt"), "--out", bundle],
                       capture_output=True, text=True)
    print(r.stdout, r.stderr[-3000:])
    if r.returncode != 0:
        sys.exit(r.returncode)
    man = json.load(open(os.path.join(bundle, "manifest.json")))
    upload = sum(f["bytes"] for f in man["files"].values())
    write_result(args.out, {"benchmark": "build_fifteen", "members_in": len(man["selection"]["table"]),
                            "members_kept": len(man["members"]), "folds_missing": man["selection"]["folds_missing"],
                            "upload_mb": round(upload / 2**20, 1), "precision": man["runtime"]["precision"],
                            "build_seconds": round(time.time() - t0, 1), "printed": r.stdout,
                            "machine": man["timing"]["machine"], "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
