"""Inference speed on one 512x512 tile: 5 members x ResNet-34 Unet x 8 D4 views.

Compares, in one process and one run, the naive loop a user writes (each member, each
view, batch 1, fp32, default memory format) with the runtime's CPU paths, and reports
achieved GFLOP/s as a share of a measured single-convolution peak. Repetitions are
interleaved (naive, path A, path B, ..., naive, path A, ...) and the ratio is taken per
repetition, so that other jobs on a shared machine slow every path alike; medians reported.

``--command`` also times the COMMAND a user runs, ``glacier-submit predict --tta d4`` on
quickstart-shaped members (ResNet-18, slim decoder, random weights: speed does not depend
on them): a 2-tile run minus a 1-tile run (start-up excluded) against the naive loop over
the same members, views and tile, interleaved in the same run.

    python benchmarks/inference_speed.py --out benchmarks/results/inference_speed.json
    python benchmarks/inference_speed.py --members 1 --command --command-members 2 --repeats 2
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
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
from glacier_runtime.tta import resolve_views


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


def _ort_runner(model, **opts):
    """An OnnxRunner whose session gets extra SessionOptions (the options under test)."""
    import onnxruntime as ort

    from glacier_submit.export import export_onnx

    runner = OnnxRunner(export_onnx(model, 5), "cpu")
    if opts:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for k, v in opts.items():
            if k == "spin":
                so.add_session_config_entry("session.intra_op.allow_spinning", v)
            else:
                setattr(so, k, v)
        runner.session = runner._sessions[0] = ort.InferenceSession(runner._blob, sess_options=so,
                                                                    providers=["CPUExecutionProvider"])
    return runner


def make_paths(models, onnx: bool):
    """name -> Predictor, for every path measured (the runtime's default is marked)."""
    def pred(runner_fn, **cfg):
        members = [Member(runner_fn(m), identity_stats(5)) for m in models]
        return Predictor(members, {"tta": "d4", **cfg})

    torch_r = lambda m: TorchRunner(copy.deepcopy(m), "cpu")  # noqa: E731
    paths = {
        "runtime torch, 1 work item at a time, 2 views/pass (before)": pred(torch_r, workers=1, max_batch=2),
        "runtime torch, 2 work items at once x 1 thread (default)": pred(torch_r, workers=2),
    }
    if onnx and onnxruntime_available():
        paths["runtime onnxruntime, 1 item at a time, 1 view/pass (before)"] = pred(_ort_runner, workers=1, max_batch=1)
        paths["runtime onnxruntime, 2 items at once x 1 thread, no spinning"] = pred(_ort_runner, workers=2)
        paths["runtime onnxruntime, 1 item, mem pattern + arena off"] = pred(
            lambda m: _ort_runner(m, enable_mem_pattern=False, enable_cpu_mem_arena=False), workers=1, max_batch=1)
        paths["runtime onnxruntime, 1 item, spinning off"] = pred(lambda m: _ort_runner(m, spin="0"), workers=1, max_batch=1)
    return paths


def interleaved(fns, repeats: int):
    """Time every fn once per round (fixed order), ``repeats`` rounds; returns name -> times."""
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            times[k].append(_time(fn))
        print(f"round {r}: " + ", ".join(f"{k[:30]} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    return times


def _write_tiles(root: str, n: int, size: int) -> None:
    import tifffile

    rng = np.random.default_rng(1)
    for b in range(1, 6):
        os.makedirs(os.path.join(root, f"Band{b}"), exist_ok=True)
        for i in range(n):
            tifffile.imwrite(os.path.join(root, f"Band{b}", f"img{i + 1:03d}.tif"),
                             rng.normal(0.2, 0.1, (size, size)).astype(np.float32))


def command_ratio(n_members: int, size: int, repeats: int) -> dict:
    """`glacier-submit predict --tta d4` (2 tiles minus 1 tile) vs the naive loop, interleaved."""
    from tests.helpers import make_member

    from glacier_runtime.normalize import normalize
    from training.engine.checkpoint import load_checkpoint, save_atomic

    work = tempfile.mkdtemp(prefix="cmdbench-")
    paths = [make_member(os.path.join(work, f"fold{i}_seed0.pt"), seed=i, fold=i) for i in range(n_members)]
    for p in paths:  # quickstart's decoder (make_member writes a tinier one)
        ck = load_checkpoint(p)
        spec = dict(ck["spec"], decoder_channels=[64, 32, 24, 16, 16])
        torch.manual_seed(0)
        ck["spec"], ck["state_dict"] = spec, build_model(spec).state_dict()
        save_atomic(ck, p)
    one, two = os.path.join(work, "one"), os.path.join(work, "two")
    _write_tiles(one, 1, size)
    _write_tiles(two, 2, size)
    cks = [load_checkpoint(p) for p in paths]
    models = []
    for ck in cks:
        m = build_model(ck["spec"]).eval()
        m.load_state_dict(ck["state_dict"])
        models.append(m)
    import tifffile

    tile = np.stack([tifffile.imread(sorted(glob.glob(os.path.join(one, f"Band{b}", "*.tif")))[0]) for b in range(1, 6)])

    def naive_members():
        views = resolve_views("d4")
        acc = torch.zeros(4, size, size)
        with torch.no_grad():
            for m, ck in zip(models, cks):
                x = torch.from_numpy(normalize(tile, ck["stats"]))[None]
                for v in views:
                    acc += torch.softmax(v.inverse(m(v.forward(x))), 1)[0]
        return acc.argmax(0)

    exe = os.path.join(os.path.dirname(sys.executable), "glacier-submit")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "glacier_submit.cli"]

    def run(folder):
        out = tempfile.mkdtemp(dir=work)
        subprocess.run(cmd + ["predict", "--models", *paths, "--tta", "d4", "--input", folder, "--output", out],
                       check=True, capture_output=True)

    times = interleaved({"naive": naive_members, "cmd1": lambda: run(one), "cmd2": lambda: run(two)}, repeats)
    per_tile = [b - a for a, b in zip(times["cmd1"], times["cmd2"])]
    ratios = [n / t for n, t in zip(times["naive"], per_tile)]
    return {"members": n_members, "encoder": "resnet18 (quickstart decoder)", "tile": size, "views": 8,
            "naive_s": [round(t, 2) for t in times["naive"]], "command_1_tile_s": [round(t, 2) for t in times["cmd1"]],
            "command_2_tiles_s": [round(t, 2) for t in times["cmd2"]], "command_per_tile_s": [round(t, 2) for t in per_tile],
            "ratio_per_round": [round(r, 2) for r in ratios], "ratio_median": round(float(np.median(ratios)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (medians reported)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime paths")
    ap.add_argument("--command", action="store_true", help="also time `glacier-submit predict` against the naive loop")
    ap.add_argument("--command-members", type=int, default=5)
    ap.add_argument("--command-only", action="store_true", help="only the command measurement")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.command_only:
        out = {"benchmark": "inference_speed (command)", "command": command_ratio(args.command_members, args.size, args.repeats),
               "machine": f"{platform.machine()} {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print("command:", json.dumps(out["command"]), flush=True)
        write_result(args.out, out)
        return
    tile = np.random.default_rng(0).normal(size=(5, args.size, args.size)).astype(np.float32)
    models = make_members(args.members, args.encoder)
    flops_view = conv_flops(models[0], (1, 5, args.size, args.size))
    flops_tile = flops_view * 8 * args.members
    peak = conv_peak()
    ref = naive(models, tile)
    paths = make_paths(models, not args.no_onnx)
    agreement = {}
    for name, p in paths.items():
        agreement[name] = float(np.abs(p.predict_proba(tile) - ref).max())  # also the warm-up
    fns = {"naive loop (batch 1, fp32, NCHW)": lambda: naive(models, tile)}
    fns.update({name: (lambda p=p: p.predict_proba(tile)) for name, p in paths.items()})
    times = interleaved(fns, args.repeats)
    base = times["naive loop (batch 1, fp32, NCHW)"]
    results = {}
    for name, ts in times.items():
        s = float(np.median(ts))
        ratios = [b / t for b, t in zip(base, ts)]
        results[name] = {"seconds": round(s, 2), "seconds_per_round": [round(t, 2) for t in ts],
                         "speedup_vs_naive": round(float(np.median(ratios)), 2),
                         "speedup_per_round": [round(r, 2) for r in ratios],
                         "share_of_peak": round(flops_tile / s / 1e9 / peak, 3)}
        print(f"{name:<66} {s:7.2f} s/tile  x{results[name]['speedup_vs_naive']:.2f}  "
              f"(rounds {results[name]['speedup_per_round']})  max|dp| {agreement.get(name, 0):.1e}", flush=True)
    out = {
        "benchmark": "inference_speed", "members": args.members, "encoder": args.encoder, "tile": args.size,
        "views": 8, "gflop_per_view": round(flops_view / 1e9, 1), "tflop_per_tile": round(flops_tile / 1e12, 3),
        "conv_peak_gflops": round(peak, 1), "results": results, "max_abs_prob_diff_vs_naive": agreement,
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.command:
        out["command"] = command_ratio(args.command_members, args.size, args.repeats)
        print("command:", json.dumps(out["command"]), flush=True)
    write_result(args.out, out)


if __name__ == "__main__":
    main()
