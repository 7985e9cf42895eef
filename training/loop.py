"""Training of one member (fold x seed): AdamW, warm-up + cosine or plateau schedules,
gradient accumulation, AMP on CUDA, clipping, EMA, early stopping on validation MCC,
atomic `last`/`best` checkpoints and exact resume.

Determinism: every random choice of an epoch is seeded from (seed, epoch), so a run
killed at any point and restarted with the same command ends where an uninterrupted run
ends (on the CPU, bit for bit).
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from glacier_runtime.atomic import atomic_write_with
from glacier_runtime.backends import TorchRunner
from glacier_runtime.classes import class_map
from glacier_runtime.normalize import normalize
from glacier_runtime.predictor import Member, Predictor
from training.augment import build_augment
from training.checkpoint import FORMAT, code_version, load_state, save_atomic
from training.config import Config
from training.dataset import PatchDataset
from training.distributed import DistContext
from training.losses import CombinedLoss, class_weights_from_shares
from training.metrics import ConfusionAccumulator
from training.models import create_model, model_spec
from training.sampling import PixelBalancedSampler, UniformPatchSampler, achieved_rates
from training.stats import compute_stats

log = logging.getLogger("glacier.train")


class LazyMap:
    """A read-only mapping that computes values on access (streamed, memory-mapped data)."""

    def __init__(self, keys, fn):
        self._keys, self._fn = list(keys), fn

    def __getitem__(self, key):
        return self._fn(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _seed_all(*parts: int) -> None:
    s = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s % (2**32))


def lr_factor(cfg, epoch: int) -> float:
    t = cfg.train
    if t.scheduler == "none":
        return 1.0
    if epoch < t.warmup_epochs:
        return (epoch + 1) / (t.warmup_epochs + 1)
    if t.scheduler == "cosine":
        span = max(1, t.epochs - t.warmup_epochs)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (epoch - t.warmup_epochs) / span))
    return 1.0


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)


def _grad_scaler(enabled: bool):
    try:
        return torch.amp.GradScaler("cuda", enabled=enabled)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler(enabled=enabled)


def validate(model: torch.nn.Module, images: Dict[str, np.ndarray], labels: Dict[str, np.ndarray],
             stats, device: torch.device, cfg: Config, n_classes: int, keep_probs: bool = False):
    """Competition MCC on whole validation tiles with the bundle's own predictor."""
    was_training = model.training
    member = Member(TorchRunner(model, str(device), fold_bn=False, channels_last=False,
                                fp16=cfg.train.amp and device.type == "cuda"), stats, n_classes=n_classes)
    pred = Predictor([member], {"tta": cfg.validation.tta, "window": cfg.validation.window})
    acc = ConfusionAccumulator(n_classes)
    probs_out = {}
    per_tile = {}
    for key, img in images.items():
        probs = pred.predict_proba(img)
        masked = pred.masked(img)
        ids = pred.decide(probs, masked)
        per_tile[key] = acc.update(labels[key], ids)
        if keep_probs:
            if masked is not None:  # saved as the runtime decides them: masked -> background
                probs[:, masked] = 0.0
                probs[0, masked] = 1.0
            probs_out[key] = probs.astype(np.float16)
    model.train(was_training)
    return acc, per_tile, probs_out


def _write_csv(path: str, history: List[Dict[str, Any]]) -> None:
    from glacier_runtime.atomic import atomic_write_bytes

    if not history:
        return
    cols = list(dict.fromkeys(k for h in history for k, v in h.items() if not isinstance(v, (list, dict))))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow(h)
    atomic_write_bytes(path, buf.getvalue().encode())


def train_member(cfg: Config, dataset, train_keys: List[str], val_keys: List[str], fold: int, seed: int,
                 out_path: str, work_dir: str, ctx: Optional[DistContext] = None,
                 progress: bool = True, init_state: Optional[Dict[str, torch.Tensor]] = None,
                 stop_after_epoch: Optional[int] = None, save_oof: bool = True) -> Dict[str, Any]:
    """Train one member and write ``out_path``; resumes from ``work_dir`` if a run was cut."""
    ctx = ctx or DistContext()
    device = ctx.device
    n_classes = len(dataset.class_names)
    os.makedirs(work_dir, exist_ok=True)
    last_path = os.path.join(work_dir, "last.pt")
    best_path = os.path.join(work_dir, "best.pt")
    t0 = time.time()

    # data: statistics from this fold's training tiles only (a seeded sample of them for
    # streamed sources such as HKH, which never sit in memory)
    lazy = bool(getattr(dataset, "lazy", False))
    stats_keys = list(train_keys)
    if lazy and len(stats_keys) > cfg.stats_sample:
        pick = np.random.default_rng(seed).choice(len(stats_keys), cfg.stats_sample, replace=False)
        stats_keys = [stats_keys[i] for i in sorted(pick)]
    stats = compute_stats((dataset.image(k) for k in stats_keys), cfg.data.bands,
                          *cfg.data.stats_percentiles, seed=0)
    if lazy:
        images = LazyMap(train_keys, lambda k: normalize(dataset.image(k), stats))
        labels = LazyMap(train_keys, dataset.label)
    else:
        images = {k: normalize(dataset.image(k), stats) for k in train_keys}
        labels = {k: dataset.label(k) for k in train_keys}
    val_raw = {k: dataset.image(k) for k in val_keys}
    val_labels = {k: dataset.label(k) for k in val_keys}
    counts = sum(np.bincount(dataset.label(k).ravel(), minlength=n_classes)[:n_classes] for k in stats_keys)
    shares = counts / max(counts.sum(), 1)
    cw = cfg.loss.class_weights
    class_weight = (class_weights_from_shares(shares) if cw == "auto" else
                    None if cw == "none" else torch.tensor(cw, dtype=torch.float32))
    if class_weight is not None and class_weight.numel() != n_classes:
        raise ValueError(f"loss.class_weights has {class_weight.numel()} values for {n_classes} classes")
    if cfg.sampler.mode == "uniform":
        sampler = UniformPatchSampler({k: dataset.shape(k) for k in train_keys}, cfg.train.patch_size)
    elif lazy:
        raise ValueError("balanced sampling indexes every label in memory; streamed data (HKH) needs "
                         "sampler.mode: uniform")
    else:
        sampler = PixelBalancedSampler(labels, dataset.class_names, cfg.sampler.targets, cfg.train.patch_size,
                                       cfg.sampler.jitter, seed=seed)
    if sampler.absent:
        log.warning("fold %d: classes %s absent from the training tiles; sampler targets renormalised",
                    fold, sampler.absent)
    augment = build_augment(cfg.augment)

    # model and optimisation
    _seed_all(seed, 0xC0FFEE)
    spec = model_spec(cfg.model, len(cfg.data.bands), n_classes)
    model = create_model(spec, cfg.model.encoder_weights)
    if init_state is not None:
        model.load_state_dict(init_state, strict=False)
    model.to(device)
    amp = bool(cfg.train.amp and device.type == "cuda")
    net = model
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5,
                                                          patience=cfg.train.plateau_patience)
               if cfg.train.scheduler == "plateau" else None)
    scaler = _grad_scaler(amp)
    ema = EMA(model, cfg.train.ema) if cfg.train.ema else None
    loss_fn = CombinedLoss(cfg.loss, class_weight).to(device)
    history: List[Dict[str, Any]] = []
    start_epoch, best_mcc, bad_epochs = 0, -1.0, 0

    if os.path.exists(last_path):
        ck = load_state(last_path, "resume state", "delete it to start this member afresh")
        if ck.get("fold") == fold and ck.get("seed") == seed and ck.get("config") == cfg.model_dump():
            model.load_state_dict(ck["state_dict"])
            opt.load_state_dict(ck["optimizer"])
            if plateau is not None and ck.get("plateau"):
                plateau.load_state_dict(ck["plateau"])
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            if ema is not None and ck.get("ema"):
                ema.state = ck["ema"]
            history, best_mcc, bad_epochs = ck["history"], ck["best_mcc"], ck["bad_epochs"]
            start_epoch = ck["epoch"] + 1
            if ctx.is_main:
                log.warning("fold %d seed %d: resuming after epoch %d (best val MCC %.4f)",
                            fold, seed, ck["epoch"], best_mcc)
        elif ctx.is_main:
            log.warning("%s belongs to another run (fold/seed/config differ); starting fresh", last_path)

    meta = {
        "format": FORMAT, "spec": spec, "sensor": cfg.data.sensor, "bands": list(cfg.data.bands),
        "folders": ["Band1", "Band2", "Band3", "Band4", "Band5"][: len(cfg.data.bands)],
        "stats": stats, "class_map": class_map(cfg.data.label_mode == "binary"), "fold": fold, "seed": seed,
        "train_tiles": list(train_keys), "val_tiles": list(val_keys), "config": cfg.model_dump(),
        "code_version": code_version(), "class_shares_train": shares.tolist(),
    }

    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.epochs, initial=start_epoch, desc=f"fold {fold} seed {seed}", unit="ep",
                   leave=False, dynamic_ncols=True, disable=None)  # None: off when not a terminal
    stopped_early = False
    for epoch in range(start_epoch, cfg.train.epochs):
        te = time.time()
        _seed_all(seed, epoch)
        for g in opt.param_groups:
            if plateau is None:
                g["lr"] = cfg.train.lr * lr_factor(cfg, epoch)
        patches = sampler.sample(cfg.train.patches_per_epoch, seed, epoch)
        rates = achieved_rates([p[3] for p in patches], n_classes)
        mine = patches[ctx.rank::ctx.world]
        ds = PatchDataset(images, labels, mine, cfg.train.patch_size, n_classes, augment,
                          boundary=cfg.loss.boundary > 0, seed=seed, epoch=epoch)
        g = torch.Generator()
        g.manual_seed(seed * 1009 + epoch)
        loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, generator=g,
                            num_workers=cfg.train.num_workers, drop_last=len(ds) > cfg.train.batch_size,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        net.train()
        sums: Dict[str, float] = {}
        nb = 0
        opt.zero_grad(set_to_none=True)
        pixel_counts = np.zeros(n_classes)
        for step, (x, y, d) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            pixel_counts += np.bincount(y.reshape(-1).cpu().numpy(), minlength=n_classes)[:n_classes]
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = net(x)
            parts = loss_fn(logits.float(), y, d if d.numel() else None, epoch)
            scaler.scale(parts["total"] / cfg.train.accumulate).backward()
            if (step + 1) % cfg.train.accumulate == 0 or step + 1 == len(loader):
                if cfg.train.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            nb += 1
        row: Dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
                               **{f"loss_{k}": v / max(nb, 1) for k, v in sums.items()}}
        for c, name in enumerate(dataset.class_names):
            row[f"centre_{name}"] = round(float(rates[c]), 4)
            row[f"pixels_{name}"] = round(float(pixel_counts[c] / max(pixel_counts.sum(), 1)), 4)
        improved = False
        if ctx.is_main and val_keys and ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs):
            eval_model = model
            if ema is not None:
                eval_model = copy.deepcopy(model)
                eval_model.load_state_dict(ema.state)
            acc, _, _ = validate(eval_model, val_raw, val_labels, stats, device, cfg, n_classes)
            row["val_mcc"] = acc.mcc
            for r in acc.per_class(dataset.class_names):
                row[f"val_mcc_{r['class']}"] = r["mcc"]
            improved = acc.mcc > best_mcc
            if plateau is not None:
                plateau.step(acc.mcc)
        elif ctx.is_main and not val_keys:
            improved = True  # no validation tiles: the last epoch is the best
        row["seconds"] = round(time.time() - te, 2)
        history.append(row)
        if ctx.is_main:
            state = ema.state if ema is not None else model.state_dict()
            if improved:
                best_mcc = row.get("val_mcc", best_mcc)
                bad_epochs = 0
                save_atomic({**meta, "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
                             "epoch": epoch, "best_mcc": best_mcc}, best_path)
            else:
                bad_epochs += 1
            save_atomic({"fold": fold, "seed": seed, "config": cfg.model_dump(), "epoch": epoch,
                         "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                         "plateau": plateau.state_dict() if plateau is not None else None,
                         "scaler": scaler.state_dict(), "ema": ema.state if ema is not None else None,
                         "history": history, "best_mcc": best_mcc, "bad_epochs": bad_epochs}, last_path)
            _write_csv(os.path.join(os.path.dirname(os.path.abspath(out_path)), "logs", f"fold{fold}_seed{seed}.csv"), history)
        if bar is not None:
            bar.set_postfix(loss=f"{row.get('loss_total', 0):.3f}", val=f"{row.get('val_mcc', float('nan')):.3f}",
                            best=f"{best_mcc:.3f}")
            bar.update(1)
        stop = cfg.train.early_stopping and bad_epochs >= cfg.train.early_stopping
        if ctx.broadcast_flag(bool(stop)):
            stopped_early = True
            break
        ctx.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            raise KeyboardInterrupt(f"stopped after epoch {epoch} (test hook)")
    if bar is not None:
        bar.close()

    result: Dict[str, Any] = {"fold": fold, "seed": seed, "best_mcc": best_mcc}
    if ctx.is_main:
        best = load_state(best_path, "best-epoch checkpoint", "delete it and re-run")
        model.load_state_dict(best["state_dict"])
        oof_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "oof", f"fold{fold}_seed{seed}")
        per_class: List[Dict[str, Any]] = []
        per_tile: Dict[str, float] = {}
        if val_keys:
            acc, per_tile, probs = validate(model, val_raw, val_labels, stats, device, cfg, n_classes,
                                            keep_probs=save_oof)
            per_class = acc.per_class(dataset.class_names)
        if val_keys and save_oof:
            os.makedirs(oof_dir, exist_ok=True)
            lab_dir = os.path.join(os.path.dirname(oof_dir), "labels")
            os.makedirs(lab_dir, exist_ok=True)
            for key, p in probs.items():
                for folder, arr in ((oof_dir, p), (lab_dir, val_labels[key])):
                    atomic_write_with(os.path.join(folder, f"{key}.npy"), lambda tmp, a=arr: np.save(tmp, a))
        final = {**best, "history": history, "per_class": per_class, "per_tile_mcc": per_tile,
                 "val_mcc": best.get("best_mcc"), "best_epoch": best.get("epoch"),
                 "epochs_run": len(history), "stopped_early": stopped_early,
                 "train_seconds": round(time.time() - t0, 1)}
        save_atomic(final, out_path)
        for p in (last_path, best_path):
            if os.path.exists(p):
                os.unlink(p)
        result.update(val_mcc=final["val_mcc"], best_epoch=final["best_epoch"], epochs_run=len(history),
                      per_class=per_class, seconds=final["train_seconds"], path=out_path)
    ctx.barrier()
    return result
