"""``glacier-train pretrain``: the same loop as CV, streamed over memory-mapped HKH patches."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

from training.data.hkh import HKHPatches, competition_to_hkh, find_patches


class HKHSource:
    """CompetitionDataset-like view of HKH patches for the training loop (lazy: never in memory)."""

    lazy = True
    class_names = ("background", "glacier", "debris", "lake")

    def __init__(self, patches: HKHPatches):
        self.patches = patches
        self.index = {p.key: i for i, p in enumerate(patches.patches)}

    @property
    def keys(self):
        return list(self.index)

    def image(self, key: str) -> np.ndarray:
        return self.patches.image(self.index[key])

    def label(self, key: str) -> np.ndarray:
        return self.patches.label(self.index[key])

    def shape(self, key: str):
        arr = np.load(self.patches.patches[self.index[key]].image, mmap_mode="r")
        return tuple(arr.shape[:2]) if self.patches.img_axis == 2 else tuple(arr.shape[1:])


def pretrain(config: str, data: str, out: str, seed: int = 0, val_patches: int = 64, device: str = "auto",
             overrides: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    from training.config import load_config
    from training.distributed import cleanup, init_distributed
    from training.loop import train_member

    cfg = load_config(config, overrides)
    if cfg.data.sensor.upper() not in ("L7",):
        raise ValueError(f"{config}: data.sensor must be L7 for HKH pre-training, got {cfg.data.sensor}")
    # the HKH bands must stand in for the competition bands role by role (raises otherwise)
    competition_to_hkh(hkh_bands=cfg.data.bands)
    if cfg.sampler.mode != "uniform":
        raise ValueError(f"{config}: HKH is streamed; set sampler.mode: uniform")
    found = find_patches(data)
    train = found.get("train") or found.get("all")
    val = (found.get("val") or [])[:val_patches]
    if not train:
        raise ValueError(f"{data}: no training patches (expected train/ or patches at the top level)")
    source = HKHSource(HKHPatches(train + val, cfg.data.bands))
    keys = list(source.index)
    train_keys, val_keys = keys[: len(train)], keys[len(train):]
    ctx = init_distributed(device)
    try:
        if ctx.is_main:  # temporary files a killed run left beside the output and in its work folder
            from glacier_runtime.atomic import remove_stale_temps

            remove_stale_temps(os.path.dirname(os.path.abspath(out)))
            remove_stale_temps(out + ".work")
        res = train_member(cfg, source, train_keys, val_keys, fold=-1, seed=seed, out_path=out,
                           work_dir=out + ".work", ctx=ctx, progress=progress, save_oof=False, kind="pretrain")
        return {**res, "val_patches": len(val_keys)} if ctx.is_main else {}
    finally:
        cleanup(ctx)
