"""Data loading vs model step at the competition config (patch 256, batch 32, boundary maps,
full augmentation): patches/s of the loader for 0..N workers, and, in the same run, the
patch rate a training step consumes on this machine (CPU) and the rate two T4s consume
according to the seed guide (1024 patches per ~15 s epoch).

    python benchmarks/loader_throughput.py --data demo/synth/train --out benchmarks/results/loader_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result

from glacier_runtime.normalize import normalize
from training.data.augment import build_augment
from training.config import load_config
from training.data.competition import CompetitionDataset
from training.data.patches import PatchDataset
from training.losses import CombinedLoss
from training.models import create_model, model_spec
from training.data.sampling import PixelBalancedSampler
from training.stats import compute_stats

SEED_GUIDE_PATCHES_PER_S = 1024 / 15.0  # two T4s, competition config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="demo/synth/train")
    ap.add_argument("--config", default="configs/competition_finetune_t4x2.yaml")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_config(args.config)
    ds = CompetitionDataset(args.data)
    stats = compute_stats((ds.image(k) for k in ds.keys), cfg.data.bands)
    images = {k: normalize(ds.image(k), stats) for k in ds.keys}
    labels = {k: ds.label(k) for k in ds.keys}
    sampler = PixelBalancedSampler(labels, ds.class_names, cfg.sampler.targets, cfg.train.patch_size)
    bs = cfg.train.batch_size
    patches = sampler.sample(bs * args.batches, 0, 0)
    pds = PatchDataset(images, labels, patches, cfg.train.patch_size, 4, build_augment(cfg.augment), boundary=True)
    loader_rates = {}
    for w in [int(x) for x in args.workers.split(",")]:
        dl = DataLoader(pds, batch_size=bs, num_workers=w, persistent_workers=False)
        t = time.perf_counter()
        n = sum(x.shape[0] for x, _, _ in dl)
        loader_rates[w] = n / (time.perf_counter() - t)
        print(f"loader, {w} workers: {loader_rates[w]:7.1f} patches/s", flush=True)
    # model step on this machine (CPU, fp32) at the same batch
    torch.manual_seed(0)
    model = create_model(model_spec(cfg.model, 5, 4))
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = CombinedLoss(cfg.loss)
    x, y, d = next(iter(DataLoader(pds, batch_size=8)))
    steps = []
    for _ in range(3):
        t = time.perf_counter()
        loss = loss_fn(model(x), y, d)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t)
    cpu_rate = 8 / float(np.median(steps[1:]))
    print(f"model step (CPU, fp32, batch 8): {cpu_rate:7.1f} patches/s")
    best = max(loader_rates.values())
    out = {
        "benchmark": "loader_throughput", "config": args.config, "patch": cfg.train.patch_size, "batch": bs,
        "loader_patches_per_s": {str(k): round(v, 1) for k, v in loader_rates.items()},
        "cpu_step_patches_per_s": round(cpu_rate, 1),
        "t4x2_seed_guide_patches_per_s": round(SEED_GUIDE_PATCHES_PER_S, 1),
        "loader_over_t4x2_demand": round(best / SEED_GUIDE_PATCHES_PER_S, 2),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(out, indent=2))
    write_result(args.out, out)


if __name__ == "__main__":
    main()
