"""Inference on the GPU against the CPU runtime, same members, views and tile, one run.

5 ResNet-34 U-Nets (random weights: speed does not depend on them) x 8 D4 views on one
512x512 tile: the runtime's torch path on CUDA (fp16 autocast, 8 views per pass), ONNX
Runtime's CUDA provider when installed (onnxruntime-gpu), and the runtime's CPU default as
the baseline; medians of interleaved repetitions, ratios per repetition. Needs CUDA; run by
``scripts/gpu_check.sh``.

    python benchmarks/gpu_inference.py --out benchmarks/results/gpu_inference.json
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result

from glacier_runtime.backends import OnnxRunner, TorchRunner, onnxruntime_available
from glacier_runtime.models import build_model
from glacier_runtime.normalize import identity_stats
from glacier_runtime.predictor import Member, Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: no GPU visible to torch here")
    spec = {"arch": "Unet", "encoder": "resnet34", "in_channels": 5, "classes": 4,
            "decoder_channels": [256, 128, 64, 32, 16], "decoder_attention_type": "scse"}
    models = []
    for i in range(a.members):
        torch.manual_seed(i)
        models.append(build_model(spec))
    tile = np.random.default_rng(0).standard_normal((5, a.size, a.size)).astype(np.float32)

    def pred(make):
        return Predictor([Member(make(m), identity_stats(5)) for m in models], {"tta": "d4"})

    paths = {"runtime torch, CPU (baseline)": pred(lambda m: TorchRunner(copy.deepcopy(m), "cpu")),
             "runtime torch, CUDA fp16": pred(lambda m: TorchRunner(copy.deepcopy(m), "cuda"))}
    if onnxruntime_available():
        from glacier_submit.export import export_onnx

        paths["runtime onnxruntime, CUDA provider"] = pred(lambda m: OnnxRunner(export_onnx(m, 5), "cuda"))
    times = {k: [] for k in paths}
    for p in paths.values():
        p.predict_proba(tile[:, :64, :64])  # warm-up
    for _ in range(a.repeats):
        for name, p in paths.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            p.predict_proba(tile)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    base = times["runtime torch, CPU (baseline)"]
    rows = [{"path": k, "s_per_tile": float(np.median(v)), "speedup_vs_cpu": float(np.median(np.array(base) / np.array(v))),
             "device": str(paths[k].members[0].runner.device)} for k, v in times.items()]
    for r in rows:
        print(f"{r['path']:<40} {r['s_per_tile']:>8.3f} s/tile  {r['speedup_vs_cpu']:>6.1f}x  ({r['device']})")
    write_result(a.out, {"benchmark": "gpu_inference", "gpu": torch.cuda.get_device_name(0),
                         "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "members": a.members, "views": 8, "size": a.size, "rows": rows,
                         "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
