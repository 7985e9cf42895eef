"""``glacier-train pretrain``: the same loop as CV, streamed over memory-mapped HKH patches."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from training.data.hkh import HKHPatches, HKHSource, competition_to_hkh, find_patches


def pretrain(config: str, data: str, out: str, seed: int = 0, val_patches: int = 64, device: str = "auto",
             overrides: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    from training.config import load_config
    from training.engine.distributed import cleanup, init_distributed
    from training.engine.trainer import train_member

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
        if not ctx.is_main:
            return {}
        res = {**res, "val_patches": len(val_keys)}
        res.update(write_pretrain_log(out, res))
        return res
    finally:
        cleanup(ctx)


def write_pretrain_log(out: str, res: Dict[str, Any], targets: Optional[str] = None) -> Dict[str, Any]:
    """Grade a finished pre-training run against ``targets.yaml`` (``pretrain``) and write
    the plain-text log ``<out>.log.txt``; returns ``{"grade": ..., "log_path": ...}``."""
    from glacier_runtime.atomic import atomic_write_text
    from training.engine.checkpoint import load_checkpoint
    from training.reporting.grading import class_facts, grade, load_targets, render_grade, smooth_convergence

    ck = load_checkpoint(out)
    history = ck.get("history") or []
    per_class = res.get("per_class") or ck.get("per_class") or []
    facts: Dict[str, Any] = {"val_mcc": res.get("val_mcc"), "checkpoint_mb": os.path.getsize(out) / 2 ** 20}
    facts.update(class_facts(per_class))
    counted = [h["nonfinite_steps"] for h in history if "nonfinite_steps" in h]
    facts["nonfinite_steps"] = float(sum(counted)) if counted else None  # n/a where not counted
    smooth = smooth_convergence([h["loss_total"] for h in history if "loss_total" in h])
    facts["smooth_convergence"] = None if smooth is None else float(smooth)
    g = grade("pretrain", facts, load_targets(targets) if targets else None)
    lines = [f"glacier-train pretrain -> {out}", f"val MCC {res.get('val_mcc', float('nan')):.4f} on "
             f"{res.get('val_patches')} patches, best epoch {res.get('best_epoch')}, {res.get('seconds', 0):.0f} s, "
             f"{facts['checkpoint_mb']:.1f} MB", "", f"{'class':<12} {'IoU':>7} {'recall':>7} {'precision':>9}"]
    for c in per_class:
        lines.append(f"{c['class']:<12} {c.get('iou', float('nan')):>7.3f} {c.get('recall', float('nan')):>7.3f} "
                     f"{c.get('precision', float('nan')):>9.3f}")
    lines += ["", "smooth convergence: every epoch's loss finite and no rise above 10 % of the first epoch's loss",
              "", render_grade(g)]
    path = out + ".log.txt"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return {"grade": g, "log_path": path}
