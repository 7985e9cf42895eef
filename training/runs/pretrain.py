"""``glacier-train pretrain``: the same loop as CV, streamed over memory-mapped HKH patches."""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional

from training.data.hkh import HKHPatches, HKHSource, competition_to_hkh, find_patches


class PretrainDone(Exception):
    """``--out`` already holds a finished pre-training of this config and data."""


def data_fingerprint(patches) -> Dict[str, Any]:
    """What a finished pre-training was made from: the patch files by name and size."""
    h = hashlib.sha256()
    for p in patches:
        for path in (p.image, p.mask):
            h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\n".encode())
    return {"patches": len(patches), "sha256": h.hexdigest()}


def finished(out: str, cfg, seed: int, fingerprint: Dict[str, Any]) -> Optional[str]:
    """Why ``out`` is a finished run of this config, data and seed (None: it is not, or absent)."""
    from training.engine.checkpoint import CheckpointError, load_checkpoint

    if not os.path.exists(out):
        return None
    try:
        ck = load_checkpoint(out)
    except CheckpointError as exc:
        raise ValueError(f"{out} exists but is not a readable checkpoint ({exc}); move it away or pass --force") from None
    from training.config import config_differences

    same_config = not config_differences(ck.get("config") or {}, cfg.model_dump())
    if same_config and ck.get("data") == fingerprint and ck.get("seed") == seed:
        return f"val MCC {ck.get('val_mcc', float('nan')):.4f}, best epoch {ck.get('best_epoch')}"
    raise ValueError(f"{out} holds a pre-training of another config, data or seed; pass --force to replace it "
                     "(or choose another --out)")


def _prepare(config: str, data: str, overrides: Optional[Dict[str, Any]], val_patches: int):
    from training.config import load_config

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
    return cfg, train, val


def check_finished(config: str, data: str, out: str, seed: int = 0, val_patches: int = 64,
                   overrides: Optional[Dict[str, Any]] = None, force: bool = False) -> Optional[str]:
    """Before any process starts: a note when ``out`` is finished (skip), None to train."""
    cfg, train, val = _prepare(config, data, overrides, val_patches)
    return None if force else finished(out, cfg, seed, data_fingerprint(train + val))


def pretrain(config: str, data: str, out: str, seed: int = 0, val_patches: int = 64, device: str = "auto",
             overrides: Optional[Dict[str, Any]] = None, progress: bool = True, force: bool = False,
             parent_lock: bool = False) -> Dict[str, Any]:
    """Pre-train and write ``out``; a finished ``out`` of the same config, data and seed is
    kept (``PretrainDone``) unless ``force``. One run per ``out`` (a lock on its work folder)."""
    from training.engine.distributed import init_distributed, ranks_end_together
    from training.engine.runlock import LockedError, RunLock
    from training.engine.trainer import Trainer

    cfg, train, val = _prepare(config, data, overrides, val_patches)
    fingerprint = data_fingerprint(train + val)
    done = None if force else finished(out, cfg, seed, fingerprint)
    if done:
        raise PretrainDone(f"{out} is a finished pre-training of this config and data ({done}): kept. "
                           "Pass --force to train it again.")
    source = HKHSource(HKHPatches(train + val, cfg.data.bands))
    keys = list(source.index)
    ctx = init_distributed(device)
    lock = None
    if ctx.is_main and not parent_lock:
        try:
            lock = RunLock(out + ".work").acquire()
        except LockedError as exc:
            raise ValueError(str(exc)) from None
    try:
        with ranks_end_together(ctx):
            if ctx.is_main:  # temporary files a killed run left beside the output and in its work folder
                from glacier_runtime.atomic import remove_stale_temps

                remove_stale_temps(os.path.dirname(os.path.abspath(out)))
                remove_stale_temps(out + ".work")
            res = Trainer(cfg, source, keys[: len(train)], keys[len(train):], fold=-1, seed=seed, out_path=out,
                          work_dir=out + ".work", ctx=ctx, progress=progress, save_oof=False, kind="pretrain",
                          extra_meta={"data": fingerprint}).fit()
        if not ctx.is_main:
            return {}
        res = {**res, "val_patches": len(keys) - len(train)}
        res.update(write_pretrain_log(out, res))
        return res
    finally:
        if lock is not None:
            lock.release()


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
