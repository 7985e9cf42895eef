"""Does ``build --tune oof`` pick settings that hold up on an unseen region?

Tunes on the training region's out-of-fold predictions and scores on the unseen region,
against the untuned default bundle, in one run and with the same members:

    python benchmarks/tune_heldout.py --weights demo/weights --train demo/synth/train \
        --unseen demo/synth/unseen --out benchmarks/results/tune_heldout.json

A third bundle, the default plus ``--crf``, gives the CRF's gain and cost on the unseen
region whatever the tuner decided.

Both bundles are built by the CLI and evaluated by ``glacier-submit evaluate`` (the bundle
run as the platform runs it), so the numbers are the ones a user would see.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import write_result

BIN = os.path.dirname(sys.executable)


def _run(args):
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(args)}")
    return proc.stdout, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--train", required=True, help="training tiles (re-predicted to tune TTA)")
    ap.add_argument("--unseen", required=True)
    ap.add_argument("--out", default="benchmarks/results/tune_heldout.json")
    ap.add_argument("--default-args", default="--tta flips --postprocess light",
                    help="the untuned bundle's settings (the demo's hand-picked defaults)")
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--tuned-bundle", default=None, metavar="DIR",
                    help="a bundle already built with --tune oof from the same members (e.g. the demo's "
                         "submission folder): evaluated instead of tuning again")
    a = ap.parse_args()
    models = sorted(glob.glob(os.path.join(a.weights, "*.pt")))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"default": a.default_args.split(),
                    "default + CRF": a.default_args.split() + ["--crf"],
                    "tuned (--tune oof)": ["--tune", "oof", "--tune-data", a.train]
                    + (["--time-budget", str(a.time_budget)] if a.time_budget else [])}
        for name, extra in variants.items():
            b = os.path.join(tmp, name.split()[0])
            if name.startswith("tuned") and a.tuned_bundle:
                b, out, build_s = a.tuned_bundle, f"(built earlier: {a.tuned_bundle})", None
                with open(os.path.join(b, "manifest.json")) as fh:
                    names = sorted(m["name"] for m in json.load(fh)["members"])
                if not set(names) <= {os.path.basename(m)[:-3] for m in models}:
                    raise SystemExit(f"--tuned-bundle {b} holds members {names} that are not in {a.weights}")
            else:
                out, build_s = _run([os.path.join(BIN, "glacier-submit"), "build", "--models", *models, "--out", b,
                                     "--test-tiles", "9", *extra])
            rep = os.path.join(tmp, name.split()[0] + "_report")
            _run([os.path.join(BIN, "glacier-submit"), "evaluate", "--bundle", b, "--data", a.unseen, "--out", rep])
            with open(os.path.join(rep, "report.json")) as fh:
                r = json.load(fh)
            with open(os.path.join(b, "manifest.json")) as fh:
                man = json.load(fh)
            rows[name] = {"mcc": r["mcc"], "per_class": r["per_class"], "seconds_per_tile": r.get("seconds_per_tile"),
                          "build_seconds": None if build_s is None else round(build_s, 1), "tta": man["tta"], "scales": man["scales"],
                          "postprocess": man.get("postprocess_preset"), "bias": man["bias"], "crf": man.get("crf"),
                          "tuning": man.get("tuning"), "build_output": out[-4000:]}
    base = rows["default"]["mcc"]
    for v in rows.values():
        v["delta_mcc"] = v["mcc"] - base
    write_result(a.out, {"weights": a.weights, "unseen": a.unseen, "variants": rows,
                         "date": time.strftime("%Y-%m-%d")})
    print(f"{'variant':<22} {'MCC':>7} {'dMCC':>8} " + " ".join(f"{c['class']:>10}" for c in rows['default']['per_class']))
    for name, v in rows.items():
        print(f"{name:<22} {v['mcc']:7.4f} {v['delta_mcc']:+8.4f} "
              + " ".join(f"{c['mcc']:10.3f}" for c in v["per_class"]))


if __name__ == "__main__":
    main()
