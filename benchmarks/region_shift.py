"""Leave one region out: the quickstart recipe trained on every region but one, its bundle
(built by `glacier-submit build`, run by `glacier-submit evaluate` as the platform runs it)
scored on the held-out region, for every region, beside the per-pixel baseline trained on
the same tiles.

Per held-out region: in-region CV MCC (out-of-fold, folds grouped by region and scene
block), held-out MCC, the gap, per-class one-vs-rest MCC, each with a bootstrap interval
over tiles (90 %); then the mean over regions.

    python benchmarks/region_shift.py --work /tmp/loro --out benchmarks/results/region_shift.json
    python benchmarks/region_shift.py --work /tmp/loro --tiles 8 --size 256 --set train.epochs=4   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_result
from _region_tools import ROOT, bootstrap, cv_oof, pixel_baseline, pool, region_groups, run, table, tile_scores, tool

REGIONS = ("khumbu", "lahaul", "karakoram", "bhutan", "tienshan")


def held_out(work: str, region: str, regions, a) -> dict:
    """Train on the other regions, evaluate on ``region``; returns its rows."""
    d = os.path.join(work, region)
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "commands.log")
    synth = os.path.join(work, "synth")
    marker = json.load(open(os.path.join(synth, ".glacier-synth.json")))
    others = {r: os.path.join(synth, "regions", r) for r in regions if r != region}
    train = os.path.join(d, "train")
    owner = pool(others, train)
    groups = region_groups(owner, marker, a.block, os.path.join(d, "groups.json"))
    folds = os.path.join(d, "folds.json")
    run(tool("glacier-train") + ["folds", train, "--k", str(a.k), "--groups", groups, "--out", folds], log)
    weights = os.path.join(d, "weights")
    t0 = time.time()
    sets = [x for s in a.sets for x in ("--set", s)]
    run(tool("glacier-train") + ["cv", "--config", a.config, "--data", train, "--folds", folds, "--out", weights,
                                 "--no-progress", *sets], log)
    train_s = time.time() - t0
    bundle = os.path.join(d, "bundle")
    run(tool("glacier-submit") + ["build", "--models", os.path.join(weights, "*.pt"), "--out", bundle,
                                  "--check-data", others[next(iter(others))], *a.build], log)
    target = os.path.join(synth, "regions", region)
    report = os.path.join(d, "report")
    run(tool("glacier-submit") + ["evaluate", "--bundle", bundle, "--data", target, "--out", report], log)
    cnn_in, cnn_out = cv_oof(weights, train), tile_scores(os.path.join(report, "_masks"), target)
    base_out = pixel_baseline(train, target, seed=a.seed)
    r_in, r_out = bootstrap(list(cnn_in.values())), bootstrap(list(cnn_out.values()))
    return {"region": region, "train_regions": sorted(others), "train_tiles": len(owner), "train_seconds": round(train_s),
            "cnn_in_region_cv": table(cnn_in), "cnn_held_out": table(cnn_out),
            "cnn_gap": round(r_out[0] - r_in[0], 4), "baseline_held_out": table(base_out),
            "cnn_minus_baseline_held_out": round(r_out[0] - bootstrap(list(base_out.values()))[0], 4)}


def render(rows) -> str:
    head = (f"{'held-out region':<16} {'CNN in-region CV':>22} {'CNN held-out':>22} {'gap':>7} "
            f"{'baseline held-out':>22}")
    lines = [head, "-" * len(head)]
    fmt = lambda t: f"{t['mcc']:.3f} [{t['ci90'][0]:.3f}, {t['ci90'][1]:.3f}]"  # noqa: E731
    for r in rows:
        lines.append(f"{r['region']:<16} {fmt(r['cnn_in_region_cv']):>22} {fmt(r['cnn_held_out']):>22} "
                     f"{r['cnn_gap']:>+7.3f} {fmt(r['baseline_held_out']):>22}")
    mean = lambda key: float(np.mean([r[key]["mcc"] for r in rows]))  # noqa: E731
    lines.append(f"{'mean':<16} {mean('cnn_in_region_cv'):>22.3f} {mean('cnn_held_out'):>22.3f} "
                 f"{float(np.mean([r['cnn_gap'] for r in rows])):>+7.3f} {mean('baseline_held_out'):>22.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder (synthetic regions, weights, bundles, reports)")
    ap.add_argument("--regions", nargs="*", default=list(REGIONS))
    ap.add_argument("--held-out", nargs="*", default=None, help="only these held-out regions (default: every one)")
    ap.add_argument("--tiles", type=int, default=12, help="tiles per region")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--block", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config overrides for cv (repeatable)")
    ap.add_argument("--build", nargs="*", default=[], help="extra glacier-submit build flags")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    synth = os.path.join(a.work, "synth")
    if not os.path.exists(os.path.join(synth, ".glacier-synth.json")):
        run(tool("glacier-train") + ["synth", "--out", synth, "--tiles", str(a.tiles), "--size", str(a.size), str(a.size),
                                     "--seed", str(a.seed), *[x for r in a.regions for x in ("--regions", r)]])
    t0 = time.time()
    rows = []
    for region in a.held_out or a.regions:
        rows.append(held_out(a.work, region, a.regions, a))
        print(render(rows), flush=True)
    out = {"benchmark": "region_shift", "rows": rows, "config": a.config, "sets": a.sets, "build": a.build,
           "tiles_per_region": a.tiles, "size": a.size, "k": a.k, "seconds": round(time.time() - t0),
           "mean_in_region_cv": float(np.mean([r["cnn_in_region_cv"]["mcc"] for r in rows])),
           "mean_held_out": float(np.mean([r["cnn_held_out"]["mcc"] for r in rows])),
           "mean_gap": float(np.mean([r["cnn_gap"] for r in rows])),
           "mean_baseline_held_out": float(np.mean([r["baseline_held_out"]["mcc"] for r in rows])),
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M")}
    print(render(rows))
    write_result(a.out, out)


if __name__ == "__main__":
    main()
