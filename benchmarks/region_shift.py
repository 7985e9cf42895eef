"""Leave one region out: the quickstart recipe trained on every region but one, its bundle
(built by `glacier-submit build`, run by `glacier-submit evaluate` as the platform runs it)
scored on the held-out region, for every region, beside the per-pixel baseline trained on
the same tiles.

Per held-out region: in-region CV MCC (out-of-fold, folds grouped by region and scene
block), held-out MCC, the gap, per-class one-vs-rest MCC, each with a bootstrap interval
over tiles (90 %); then the mean over regions.

    python benchmarks/region_shift.py --work /tmp/loro --out benchmarks/results/region_shift.json
    python benchmarks/region_shift.py --work /tmp/loro --tiles 8 --size 256 --set train.epochs=4   # a quick look

With ``--options``, each option of the robust recipe (``OPTIONS``: normalisation, shift
augmentation, lake copy-paste, losses, test-time adaptation, the tuner, the best-placed teams'
recipe) is trained, built and evaluated on every held-out region beside today's recipe, in one
run: per region the gain on the same held-out tiles with a paired bootstrap interval, the mean
gain over regions with its interval (tiles resampled within each region), seconds per tile, and
the ensemble against the mean and the median of its single members.

    python benchmarks/region_shift.py --work /tmp/opts --options all --held-out bhutan karakoram \
        --tiles 12 --train-tiles 6 --size 256 --k 2 --set train.epochs=8 --out benchmarks/results/region_options.json
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
from _region_tools import (ROOT, bootstrap, bootstrap_gain, cv_oof, pixel_baseline, pool, region_groups, run, table,
                           tile_scores, tool)

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
    owner = pool(others, train, a.train_tiles)
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


# ---- the robust recipe's options, judged on held-out regions ------------------------------------------
#: name -> what it changes against today's recipe: cv --set overrides, build flags, the weights it
#: reuses (a build-only option), the folds it trains (None = all)
OPTIONS = {
    "recipe": {},
    "tune_oof": {"reuse": "recipe", "build": ["--tune", "oof", "--tune-data", "{train}"]},
    "adapt_bn": {"reuse": "recipe", "build": ["--adapt", "bn"]},
    "tile_percentile": {"sets": ["data.normalization=tile_percentile"]},
    "tile_standard": {"sets": ["data.normalization=tile_standard"]},
    "shift_aug": {"sets": ["augment.shift_p=0.5"]},
    "lake_paste": {"sets": ["augment.lake_paste_p=0.5"]},
    "lovasz_tversky": {"sets": ["loss.lovasz=0.3", "loss.tversky=0.3"]},
    # the best-placed teams: one model on one split, per-tile 2-98 % percentiles, Lovasz + Tversky,
    # no TTA, plain argmax
    # HKH pre-training (a fake HKH set from the generator: `glacier-train synth-hkh`), then cv --init-from
    "hkh": {"init": "hkh"},
    "teams": {"sets": ["data.normalization=tile_percentile", "loss.focal=0", "loss.dice=0", "loss.mcc=0",
                       "loss.boundary=0", "loss.lovasz=0.5", "loss.tversky=0.5"], "folds": [0],
              "build": ["--bias", "none", "--tta", "none", "--postprocess", "none"]},
}


def option_bundle(work: str, region: str, name: str, a, ctx: dict) -> dict:
    """Train (unless the option reuses weights), build and evaluate one option on ``region``;
    returns its per-tile confusions and seconds per tile."""
    opt = OPTIONS[name]
    d = os.path.join(work, region, name)
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "commands.log")
    weights = os.path.join(work, region, opt.get("reuse", name), "weights")
    t0 = time.time()
    if "reuse" not in opt:
        sets = [x for s in a.sets + opt.get("sets", []) for x in ("--set", s)]
        folds = [x for f in (opt.get("folds") or []) for x in ("--fold", str(f))]
        init = ["--init-from", hkh_start(work, a)] if opt.get("init") == "hkh" else []
        run(tool("glacier-train") + ["cv", "--config", a.config, "--data", ctx["train"], "--folds", ctx["folds"],
                                     "--out", weights, "--no-progress", *folds, *init, *sets], log)
    train_s = time.time() - t0
    bundle = os.path.join(d, "bundle")
    flags = [f.format(train=ctx["train"]) for f in a.build + opt.get("build", [])]
    run(tool("glacier-submit") + ["build", "--models", os.path.join(weights, "*.pt"), "--out", bundle,
                                  "--check-data", ctx["check"], *flags], log)
    report = os.path.join(d, "report")
    run(tool("glacier-submit") + ["evaluate", "--bundle", bundle, "--data", ctx["target"], "--out", report], log)
    man = json.load(open(os.path.join(bundle, "manifest.json")))
    return {"cms": tile_scores(os.path.join(report, "_masks"), ctx["target"]), "train_seconds": round(train_s),
            "seconds_per_tile": man["timing"]["tile_s"], "members": len(man["members"]), "bundle": bundle}


def hkh_start(work: str, a) -> str:
    """One HKH pre-training for every region: a fake HKH set (`glacier-train synth-hkh`), then
    `glacier-train pretrain` with the HKH config shrunk to the recipe's model and budget (the
    same encoder and decoder, so cv --init-from loads it). Skipped when already written."""
    d = os.path.join(work, "hkh")
    out = os.path.join(d, "hkh.pt")
    if os.path.exists(out):
        return out
    log = os.path.join(d, "commands.log")
    os.makedirs(d, exist_ok=True)
    run(tool("glacier-train") + ["synth-hkh", "--out", os.path.join(d, "data"), "--train", str(a.hkh_patches),
                                 "--val", "16", "--size", "128", "--seed", str(a.seed)], log)
    shrink = ["model.encoder=resnet18", "model.decoder_channels=[64,32,24,16,16]", "model.decoder_attention_type=null",
              "train.batch_size=8", "train.patch_size=128", "train.patches_per_epoch=128", "train.num_workers=0",
              "train.ema=0.9", "train.warmup_epochs=1", "train.early_stopping=0", "stats_sample=64",
              *[s for s in a.sets if s.startswith("train.epochs")]]
    run(tool("glacier-train") + ["pretrain", "--config", os.path.join(ROOT, "configs", "hkh_pretrain_t4x2.yaml"),
                                 "--data", os.path.join(d, "data"), "--out", out, "--device", "cpu", "--no-progress",
                                 *[x for s in shrink for x in ("--set", s)]], log)
    return out


def single_members(bundle: str, target: str) -> list:
    """Held-out MCC of each member of ``bundle`` alone (the runtime in process, as evaluate's
    ablations run it)."""
    from glacier_runtime.predictor import Predictor, load_payload
    from training.data.competition import CompetitionDataset
    from training.metrics import tile_confusions

    payload = load_payload(os.path.join(bundle, "model.pth"))
    ds = CompetitionDataset(target)
    out = []
    for i, e in enumerate(payload["members"]):
        pred = Predictor.from_payload(payload, device="cpu", members=[i])
        cms = [tile_confusions([pred.predict_ids(ds.image(k))], [ds.label(k)], 4)[0] for k in ds.keys]
        out.append({"member": e["name"], "mcc": round(bootstrap(cms)[0], 4)})
    return out


def mean_gain(pairs, n: int = 2000, seed: int = 0, level: float = 0.9):
    """Mean over regions of the pooled-MCC gain, and its interval: tiles resampled within each
    region (one draw for all regions at once), the per-region gains averaged per draw."""
    from training.metrics import mcc_batch

    rng = np.random.default_rng(seed)
    draws, point = np.zeros(n), []
    for a_cms, b_cms in pairs:
        a, b = np.asarray(a_cms, np.float64), np.asarray(b_cms, np.float64)
        counts = rng.multinomial(len(a), np.full(len(a), 1.0 / len(a)), size=n).astype(np.float64)
        ga = mcc_batch((counts @ a.reshape(len(a), -1)).reshape(n, *a.shape[1:]))
        gb = mcc_batch((counts @ b.reshape(len(b), -1)).reshape(n, *b.shape[1:]))
        draws += (gb - ga) / len(pairs)
        point.append(float(mcc_batch(b.sum(0)) - mcc_batch(a.sum(0))))
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(np.mean(point)), float(lo), float(hi)


def region_options(work: str, region: str, regions, names, a) -> dict:
    """Every option on one held-out region: its MCC and gain over the recipe (paired, same tiles)."""
    d = os.path.join(work, region)
    os.makedirs(d, exist_ok=True)
    synth = os.path.join(work, "synth")
    marker = json.load(open(os.path.join(synth, ".glacier-synth.json")))
    others = {r: os.path.join(synth, "regions", r) for r in regions if r != region}
    train = os.path.join(d, "train")
    owner = pool(others, train, a.train_tiles)
    groups = region_groups(owner, marker, a.block, os.path.join(d, "groups.json"))
    folds = os.path.join(d, "folds.json")
    run(tool("glacier-train") + ["folds", train, "--k", str(a.k), "--groups", groups, "--out", folds],
        os.path.join(d, "commands.log"))
    ctx = {"train": train, "folds": folds, "check": others[next(iter(others))],
           "target": os.path.join(synth, "regions", region)}
    res = {n: option_bundle(work, region, n, a, ctx) for n in ["recipe"] + [n for n in names if n != "recipe"]}
    base = list(res["recipe"]["cms"].values())
    rows = {}
    for n, r in res.items():
        cms = [r["cms"][k] for k in res["recipe"]["cms"]]
        g = bootstrap_gain(base, cms)
        rows[n] = {"held_out": table(r["cms"]), "gain": [round(x, 4) for x in g], "seconds_per_tile": r["seconds_per_tile"],
                   "train_seconds": r["train_seconds"], "members": r["members"]}
    singles = single_members(res["recipe"]["bundle"], ctx["target"])
    vals = [s["mcc"] for s in singles]
    return {"region": region, "train_regions": sorted(others), "train_tiles": len(owner),
            "held_out_tiles": len(base), "options": rows, "single_members": singles,
            "single_mean": round(float(np.mean(vals)), 4), "single_median": round(float(np.median(vals)), 4),
            "_cms": {n: [r["cms"][k] for k in res["recipe"]["cms"]] for n, r in res.items()}}


def render_options(rows) -> str:
    names = list(rows[0]["options"])
    head = f"{'option':<16}" + "".join(f"{r['region']:>24}" for r in rows) + f"{'mean gain [90 %]':>28}{'s/tile':>8}"
    lines = [head, "-" * len(head)]
    for n in names:
        cells = []
        for r in rows:
            o = r["options"][n]
            cells.append(f"{o['held_out']['mcc']:.3f} ({o['gain'][0]:+.3f} [{o['gain'][1]:+.3f},{o['gain'][2]:+.3f}])"
                         if n != "recipe" else f"{o['held_out']['mcc']:.3f}")
        m = mean_gain([(r["_cms"]["recipe"], r["_cms"][n]) for r in rows])
        sec = np.mean([r["options"][n]["seconds_per_tile"] for r in rows])
        lines.append(f"{n:<16}" + "".join(f"{c:>24}" for c in cells)
                     + (f"{m[0]:>+10.3f} [{m[1]:+.3f}, {m[2]:+.3f}]" if n != "recipe" else f"{'':>28}") + f"{sec:>8.2f}")
    lines.append(f"{'single (mean)':<16}" + "".join(f"{r['single_mean']:>24.3f}" for r in rows))
    lines.append(f"{'single (median)':<16}" + "".join(f"{r['single_median']:>24.3f}" for r in rows))
    return "\n".join(lines)


def run_options(a) -> None:
    names = list(OPTIONS) if a.options == ["all"] else a.options
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown options {unknown}; known: {', '.join(OPTIONS)}")
    t0 = time.time()
    rows = []
    for region in a.held_out or a.regions:
        rows.append(region_options(a.work, region, a.regions, names, a))
        print(render_options(rows), flush=True)
    summary = {}
    for n in rows[0]["options"]:
        if n == "recipe":
            continue
        m = mean_gain([(r["_cms"]["recipe"], r["_cms"][n]) for r in rows])
        summary[n] = {"mean_gain": round(m[0], 4), "ci90": [round(m[1], 4), round(m[2], 4)],
                      "adopt": m[1] > 0, "seconds_per_tile": round(float(np.mean(
                          [r["options"][n]["seconds_per_tile"] for r in rows])), 3)}
    text = render_options(rows)
    for r in rows:
        r.pop("_cms")
    out = {"benchmark": "region_shift --options", "rows": rows, "summary": summary, "options": {n: OPTIONS[n] for n in names},
           "config": a.config, "sets": a.sets, "build": a.build, "tiles_per_region": a.tiles, "train_tiles": a.train_tiles,
           "size": a.size, "k": a.k, "seconds": round(time.time() - t0), "table": text,
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M")}
    print(text)
    write_result(a.out, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder (synthetic regions, weights, bundles, reports)")
    ap.add_argument("--regions", nargs="*", default=list(REGIONS))
    ap.add_argument("--held-out", nargs="*", default=None, help="only these held-out regions (default: every one)")
    ap.add_argument("--tiles", type=int, default=12, help="tiles per region")
    ap.add_argument("--train-tiles", type=int, default=None, help="use only the first N tiles of each training region")
    ap.add_argument("--hkh-patches", type=int, default=256, help="fake HKH patches for the hkh option's pre-training")
    ap.add_argument("--options", nargs="*", default=None,
                    help=f"judge these options of the robust recipe (or 'all': {', '.join(OPTIONS)}) against the recipe")
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
    if a.options:
        run_options(a)
        return
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
