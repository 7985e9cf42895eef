"""int8 vs fp32 ONNX members on the unseen split, in one run: speed, pixel agreement, MCC.

The members are quantised with the build's own code (``glacier_submit/quantize.py``: QDQ,
int8 weights per channel, uint8 activations, calibrated on each member's own training tiles
of ``--data/train``), then both ensembles predict every tile of ``--data/unseen`` with the
same predictor settings. Timing rounds are interleaved (fp32, int8, fp32, int8, ...) and the
ratio is taken per round, so other jobs on a shared machine slow both alike; the process's CPU
seconds per tile are reported beside the wall seconds (CPU time barely depends on how many
other jobs share the cores; wall time does).

    glacier-train synth --out synth --tiles 16 --size 512 512 --unseen-tiles 6
    glacier-train cv --config configs/quickstart.yaml --data synth/train --folds folds.json --out weights ...
    python benchmarks/int8.py --models 'weights/fold*_seed*.pt' --data synth --out benchmarks/results/int8.json
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="member checkpoints (glob)")
    ap.add_argument("--data", required=True, help="folder with train/ (calibration) and unseen/ (evaluation)")
    ap.add_argument("--tta", default="none", help="TTA views for both ensembles (none | flips | d4)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds over the unseen tiles")
    ap.add_argument("--out", default="", help="JSON result path")
    args = ap.parse_args()

    import onnxruntime
    import torch
    from sklearn.metrics import matthews_corrcoef

    from glacier_submit.export import prepare_backend
    from glacier_submit.members import load_members, make_payload
    from glacier_submit.quantize import METHOD, quantize_entries
    from glacier_runtime.predictor import Predictor
    from glacier_runtime.settings import InferenceSettings
    from training.data.competition import CompetitionDataset
    from training.metrics import ConfusionAccumulator

    paths = sorted(glob.glob(args.models))
    entries = load_members(paths)
    t0 = time.perf_counter()
    backend, parity = prepare_backend(entries, "onnx")
    export_s = time.perf_counter() - t0
    fp32_entries = copy.deepcopy(entries)
    t0 = time.perf_counter()
    calib, _ = quantize_entries(entries, os.path.join(args.data, "train"))
    quant_s = time.perf_counter() - t0
    inference = InferenceSettings(tta=args.tta).to_dict()
    preds = {"fp32": Predictor.from_payload(make_payload(fp32_entries, inference), device="cpu", backend="onnx"),
             "int8": Predictor.from_payload(make_payload(entries, inference), device="cpu", backend="onnx")}
    size = {"fp32": sum(e["onnx"].numel() for e in fp32_entries), "int8": sum(e["onnx"].numel() for e in entries)}

    ds = CompetitionDataset(os.path.join(args.data, "unseen"))
    keys = list(ds.keys)
    images = {k: ds.image(k) for k in keys}
    labels = {k: ds.label(k) for k in keys}
    for p in preds.values():
        p.predict_ids(images[keys[0]][:, :64, :64])  # warm-up: sessions, thread pools

    rounds = []
    maps = {}
    for r in range(args.repeats):
        t = {}
        for name, p in preds.items():
            t0, c0 = time.perf_counter(), time.process_time()
            maps[name] = {k: p.predict_ids(images[k]) for k in keys}
            t[name] = (time.perf_counter() - t0) / len(keys)
            t[name + "_cpu"] = (time.process_time() - c0) / len(keys)
        t["ratio"] = t["fp32"] / t["int8"]
        t["ratio_cpu"] = t["fp32_cpu"] / t["int8_cpu"]
        rounds.append(t)
        print(f"round {r + 1}: fp32 {t['fp32']:.2f} s/tile ({t['fp32_cpu']:.2f} CPU s), int8 {t['int8']:.2f} s/tile "
              f"({t['int8_cpu']:.2f} CPU s), {t['ratio']:.2f}x wall, {t['ratio_cpu']:.2f}x CPU", flush=True)

    names = ["background", "glacier", "debris", "lake"][: preds["fp32"].n_classes]
    same = sum(int((maps["fp32"][k] == maps["int8"][k]).sum()) for k in keys)
    total = sum(maps["fp32"][k].size for k in keys)
    scores = {}
    for name in preds:
        acc = ConfusionAccumulator(len(names))
        for k in keys:
            acc.update(labels[k], maps[name][k])
        y = np.concatenate([labels[k].ravel() for k in keys])
        yhat = np.concatenate([maps[name][k].ravel() for k in keys])
        scores[name] = {"mcc": acc.mcc, "mcc_sklearn": float(matthews_corrcoef(y, yhat)),
                        "per_class": {c["class"]: c["mcc"] for c in acc.per_class(names)}}
    result = {
        "benchmark": "int8", "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "method": METHOD,
        "members": [e["name"] for e in entries], "tta": args.tta, "views_per_tile": preds["fp32"].n_forward_views,
        "unseen_tiles": len(keys), "tile_shape": list(images[keys[0]].shape),
        "calibration_tiles": calib, "export_s": export_s, "quantise_s": quant_s,
        "onnx_bytes": size, "fp32_onnx_parity": parity,
        "s_per_tile": {n: float(np.median([r[n] for r in rounds])) for n in preds},
        "cpu_s_per_tile": {n: float(np.median([r[n + "_cpu"] for r in rounds])) for n in preds},
        "ratio_per_round": [r["ratio"] for r in rounds],
        "ratio_median": float(np.median([r["ratio"] for r in rounds])),
        "ratio_cpu_per_round": [r["ratio_cpu"] for r in rounds],
        "ratio_cpu_median": float(np.median([r["ratio_cpu"] for r in rounds])),
        "pixel_agreement": same / total, "scores": scores,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg": list(os.getloadavg()),
    }
    print(json.dumps({k: result[k] for k in ("s_per_tile", "cpu_s_per_tile", "ratio_per_round", "ratio_median",
                                              "ratio_cpu_per_round", "ratio_cpu_median", "pixel_agreement",
                                              "scores", "onnx_bytes", "loadavg")}, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
