"""Inference speed on one 512x512 tile: 5 members x ResNet-34 Unet x 8 D4 views.

Compares, in one process and one run, the naive loop a user writes (each member, each
view, batch 1, fp32, default memory format) with the runtime's CPU paths, and reports
achieved GFLOP/s as a share of a measured single-convolution peak.

    python benchmarks/inference_speed.py --out benchmarks/results/inference_speed.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result  # noqa: E402

from glacier_runtime.backends import OnnxRunner, TorchRunner, onnxruntime_available  # noqa: E402
from glacier_runtime.models import build_model  # noqa: E402
from glacier_runtime.normalize import identity_stats  # noqa: E402
from glacier_runtime.predictor import Member, Predictor  # noqa: E402
from glacier_runtime.tta import resolve_views  # noqa: E402


def conv_flops(model: torch.nn.Module, shape) -> float:
    total = [0.0]

    def hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        total[0] += 2.0 * m.in_channels // m.groups * m.out_channels * k * out.shape[-1] * out.shape[-2] * out.shape[0]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hs:
        h.remove()
    return total[0]


def conv_peak(repeats: int = 5) -> float:
    """GFLOP/s of one large 3x3 convolution (channels_last, fp32): the machine's practical peak."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 128, 128).contiguous(memory_format=torch.channels_last)
    flops = 2.0 * 256 * 256 * 9 * 128 * 128
    with torch.no_grad():
        conv(x)
        best = min(_time(lambda: conv(x)) for _ in range(repeats))
    return flops / best / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_members(n: int, encoder: str):
    models = []
    for i in range(n):
        torch.manual_seed(i)
        m = build_model({"arch": "Unet", "encoder": encoder, "in_channels": 5, "classes": 4}).eval()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 1.5)
        models.append(m)
    return models


def naive(models, tile: np.ndarray) -> np.ndarray:
    """What a notebook does: every member, every view, batch 1, fp32, NCHW, logits -> softmax."""
    x = torch.from_numpy(tile)[None]
    views = resolve_views("d4")
    acc = torch.zeros(4, *tile.shape[1:])
    with torch.no_grad():
        for m in models:
            for v in views:
                acc += torch.softmax(v.inverse(m(v.forward(x))), 1)[0]
    return (acc / (len(models) * len(views))).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per path (median reported)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tile = np.random.default_rng(0).normal(size=(5, args.size, args.size)).astype(np.float32)
    models = make_members(args.members, args.encoder)
    flops_view = conv_flops(models[0], (1, 5, args.size, args.size))
    flops_tile = flops_view * 8 * args.members
    peak = conv_peak()
    results = {}

    def record(name, fn, ref=None):
        fn()  # warm-up
        ts = [_time(fn) for _ in range(args.repeats)]
        s = float(np.median(ts))
        results[name] = {"seconds": round(s, 3), "gflops": round(flops_tile / s / 1e9, 1),
                         "share_of_peak": round(flops_tile / s / 1e9 / peak, 3)}
        print(f"{name:<44} {s:7.2f} s/tile  {flops_tile / s / 1e9:6.1f} GFLOP/s", flush=True)

    ref = naive(models, tile)
    record("naive loop (batch 1, fp32, NCHW)", lambda: naive(models, tile))

    def runtime(batch, backend):
        members = []
        for m in models:
            if backend == "torch":
                runner = TorchRunner(copy.deepcopy(m), "cpu")
            else:
                from glacier_submit.export import export_onnx

                runner = OnnxRunner(export_onnx(m, 5), "cpu")
            members.append(Member(runner, identity_stats(5)))
        return Predictor(members, {"tta": "d4", "max_batch": batch})

    agreement = {}
    for batch in (1, 2, 8):
        p = runtime(batch, "torch")
        record(f"runtime torch (BN folded, channels_last, batch {batch})", lambda: p.predict_proba(tile))
        agreement[f"torch_b{batch}"] = float(np.abs(p.predict_proba(tile) - ref).max())
    if onnxruntime_available():
        for batch in (1, 8):
            p = runtime(batch, "onnx")
            record(f"runtime onnxruntime (batch {batch})", lambda: p.predict_proba(tile))
            agreement[f"onnx_b{batch}"] = float(np.abs(p.predict_proba(tile) - ref).max())
    base = results["naive loop (batch 1, fp32, NCHW)"]["seconds"]
    for r in results.values():
        r["speedup_vs_naive"] = round(base / r["seconds"], 2)
    out = {
        "benchmark": "inference_speed", "members": args.members, "encoder": args.encoder, "tile": args.size,
        "views": 8, "gflop_per_view": round(flops_view / 1e9, 1), "tflop_per_tile": round(flops_tile / 1e12, 2),
        "conv_peak_gflops": round(peak, 1), "results": results, "max_abs_prob_diff_vs_naive": agreement,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=2))
    write_result(args.out, out)


if __name__ == "__main__":
    main()
