"""One member's training as named steps: set up data, set up the model, restore, train
one epoch (one optimisation step at a time), validate, checkpoint, finalise.

:class:`Trainer` is the one training loop of the product (CV members and HKH
pre-training). Each step is a method, so a reader can follow a run top to bottom in
:meth:`Trainer.fit`, and checks (non-finite losses, memory, ...) can hook into
:meth:`Trainer.train_step` or :meth:`Trainer.train_one_epoch` without touching the rest.

Determinism: every random choice of an epoch is seeded from ``(seed, epoch)``, so a run
killed at any point and restarted with the same command ends where an uninterrupted run
ends (on the CPU, bit for bit). Under DDP every rank gets the same number of patches
(the shard is padded), so every rank runs the same number of steps and no rank can wait
forever in an all-reduce; gradients are only synchronised on the step that updates.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from glacier_runtime.classes import class_map
from glacier_runtime.normalize import normalize, tile_stats
from glacier_runtime.tiles import BAND_FOLDERS
from training.data.augment import build_augment
from training.data.shift import LakeBank, RadiometricShift
from training.engine.checkpoint import FORMAT, code_version, load_state, save_atomic
from training.config import Config
from training.rundir import RunDir, member_name
from training.data.patches import LazyMap, PatchDataset
from training.engine.distributed import DistContext, freeze, unused_parameters
from training.engine.callbacks import Callback
from training.engine.ema import EMA
from training.engine.guards import (SKIPPED, BatchGuard, ClassLearningMonitor, MemberDiverged, MemberOutOfMemory,
                                    NonFiniteMonitor, assert_finite_state, free_memory, grad_norm, is_oom,
                                    nonfinite_parts, nonfinite_tensors, oom_message, smaller_batch, smaller_window,
                                    window_batches)
from training.engine.history import write_csv
from training.engine.schedule import forget_unscale, grad_scaler, lr_factor, seed_all
from training.engine.validation import validate
from training.losses import CombinedLoss, class_weights_from_shares
from training.engine.progress import EpochReporter
from training.data.sampling import PixelBalancedSampler, UniformPatchSampler, achieved_rates
from training.engine.state import cpu_state, restore_state
from training.stats import compute_stats

log = logging.getLogger("glacier.train")

KINDS = ("member", "pretrain")


def shard(items: Sequence, rank: int, world: int) -> List:
    """This rank's share of ``items``: ``items[rank::world]``, padded by wrapping round
    so that every rank gets exactly ``ceil(len / world)`` items (as torch's
    ``DistributedSampler`` does). Equal shards mean equal batch counts on every rank."""
    items = list(items)
    if world <= 1 or not items:
        return items
    per = -(-len(items) // world)
    padded = items + [items[i % len(items)] for i in range(per * world - len(items))]
    return padded[rank::world]


class Trainer:
    """Trains one member (fold x seed) or a pre-training run and writes ``out_path``.

    ``kind`` is recorded in every checkpoint written: ``"member"`` (an ensemble member,
    and its ``last.pt``/``best.pt``) or ``"pretrain"`` (HKH pre-training output, which the
    build never takes as a member). ``loader_workers`` overrides ``train.num_workers``
    (fold-parallel workers split the CPU cores) without changing the recorded config.
    """

    def __init__(self, cfg: Config, dataset, train_keys: Sequence[str], val_keys: Sequence[str], fold: int,
                 seed: int, out_path: str, work_dir: str, ctx: Optional[DistContext] = None,
                 init_state: Optional[Dict[str, torch.Tensor]] = None, save_oof: bool = True,
                 kind: str = "member", reporter: Optional[EpochReporter] = None, progress: bool = True,
                 members_after: int = 0, worker: Optional[int] = None, loader_workers: Optional[int] = None,
                 callbacks: Sequence[Callback] = (), extra_meta: Optional[Dict[str, Any]] = None):
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
        self.cfg, self.dataset = cfg, dataset
        self.train_keys, self.val_keys = list(train_keys), list(val_keys)
        self.fold, self.seed, self.kind = fold, seed, kind
        self.out_path, self.work_dir = out_path, work_dir
        self.ctx = ctx or DistContext()
        self.device = self.ctx.device
        self.init_state, self.save_oof = init_state, save_oof
        self.n_classes = len(dataset.class_names)
        self.class_names = list(dataset.class_names)
        self.last_path = os.path.join(work_dir, "last.pt")
        self.best_path = os.path.join(work_dir, "best.pt")
        self.out_dir = os.path.dirname(os.path.abspath(out_path))
        self.progress, self.members_after, self.worker = progress, members_after, worker
        self.reporter = reporter
        self.callbacks = list(callbacks)
        self.extra_meta = dict(extra_meta or {})
        self.num_workers = cfg.train.num_workers if loader_workers is None else int(loader_workers)
        if loader_workers is None and self.ctx.enabled:  # the ranks share the machine's cores
            from training.engine.launch import split_cpus

            self.num_workers = split_cpus(self.ctx.world, cfg.train.num_workers)["loader_workers"]
        self.class_weight: Optional[torch.Tensor] = None
        self.history: List[Dict[str, Any]] = []
        self.start_epoch, self.best_mcc, self.bad_epochs = 0, -1.0, 0
        self.stopped_early = False
        self._last_written: Optional[float] = None
        self.t0 = time.time()
        # guards (training/engine/guards.py), each owning the state a resume carries over:
        # auto_batch may shrink the micro-batch (the effective batch stays) and the validation window
        t = cfg.train
        self.batch = BatchGuard(t.batch_size, t.accumulate, cfg.validation.window)
        self.nonfinite = NonFiniteMonitor(limit=t.nonfinite_limit, fold=fold, seed=seed, lr=t.lr,
                                          boundary=cfg.loss.boundary, ramp=cfg.loss.boundary_ramp_epochs,
                                          where=work_dir)
        self.class_monitor: Optional[ClassLearningMonitor] = None
        self._window_bad: List[str] = []

    # ---- set-up -----------------------------------------------------------------------------
    def setup_data(self) -> None:
        """Statistics from this fold's training tiles only (a seeded sample for streamed
        sources such as HKH), normalised training tiles, raw validation tiles, class
        weights, the patch sampler, the augmentation and the class guard."""
        cfg, ds = self.cfg, self.dataset
        lazy = bool(getattr(ds, "lazy", False))
        stats_keys = list(self.train_keys)
        if lazy and len(stats_keys) > cfg.stats_sample:
            pick = np.random.default_rng(self.seed).choice(len(stats_keys), cfg.stats_sample, replace=False)
            stats_keys = [stats_keys[i] for i in sorted(pick)]
        self.stats = compute_stats((ds.image(k) for k in stats_keys), cfg.data.bands,
                                   *cfg.data.stats_percentiles, seed=0)
        if cfg.data.normalization != "fold":  # the fold's numbers stay: fallback and the build's check tile
            self.stats.update(mode=cfg.data.normalization, tile_percentiles=list(cfg.data.tile_percentiles))
        stats = self.stats
        aug = cfg.augment
        self.shift, self.norms, self.lakes = None, None, None
        if lazy:
            if aug.shift_p or aug.lake_paste_p:
                raise ValueError("augment.shift_p and augment.lake_paste_p need the tiles in memory; streamed data "
                                 "(HKH) trains without them: set them to 0")
            self.images = LazyMap(self.train_keys, lambda k: normalize(ds.image(k), stats))
            self.labels = LazyMap(self.train_keys, ds.label)
        elif aug.shift_p:  # raw tiles, normalised patch by patch after the shift
            self.images = {k: ds.image(k) for k in self.train_keys}
            self.norms = {k: tile_stats(v, stats) for k, v in self.images.items()}
            self.shift = RadiometricShift.from_config(aug, stats, cfg.data.sensor, cfg.data.bands)
            self.labels = {k: ds.label(k) for k in self.train_keys}
        else:
            self.images = {k: normalize(ds.image(k), stats) for k in self.train_keys}
            self.labels = {k: ds.label(k) for k in self.train_keys}
        if aug.lake_paste_p:
            self.setup_lakes()
        self.val_raw = {k: ds.image(k) for k in self.val_keys}
        self.val_labels = {k: ds.label(k) for k in self.val_keys}
        self.setup_class_weights(stats_keys)
        self.setup_sampler(lazy)
        self.augment = build_augment(cfg.augment)
        t = cfg.train
        self.class_monitor = ClassLearningMonitor(
            self.class_names, warmup=max(t.warmup_epochs + 1, round(0.25 * t.epochs)), patience=3, fold=self.fold,
            seed=self.seed, targets=dict(cfg.sampler.targets) if cfg.sampler.mode == "balanced" else {},
            absent=list(self.sampler.absent))

    def setup_lakes(self) -> None:
        """The lake bank for copy-paste, from this fold's training tiles, in their units here
        (raw under the radiometric shift, which then shifts a pasted lake with its patch)."""
        names = list(self.class_names)
        if "lake" not in names:
            log.warning("augment.lake_paste_p: no lake class in %s; lake copy-paste is off", names)
            return
        ice = [names.index(c) for c in ("glacier", "debris") if c in names]
        self.lakes = LakeBank.from_tiles(self.images, self.labels, names.index("lake"), ice, self.cfg.augment.lake_margin)
        log.info("fold %d: %d lakes in the copy-paste bank", self.fold, len(self.lakes))

    def setup_class_weights(self, keys: Sequence[str]) -> None:
        """Class shares of the statistics tiles and the loss's class weights from them."""
        n = self.n_classes
        counts = sum(np.bincount(self.dataset.label(k).ravel(), minlength=n)[:n] for k in keys)
        self.shares = counts / max(counts.sum(), 1)
        cw = self.cfg.loss.class_weights
        self.class_weight = (class_weights_from_shares(self.shares) if cw == "auto" else
                             None if cw == "none" else torch.tensor(cw, dtype=torch.float32))
        if self.class_weight is not None and self.class_weight.numel() != n:
            raise ValueError(f"loss.class_weights has {self.class_weight.numel()} values for {n} classes")

    def setup_sampler(self, lazy: bool) -> None:
        cfg, ds = self.cfg, self.dataset
        if cfg.sampler.mode == "uniform":
            self.sampler = UniformPatchSampler({k: ds.shape(k) for k in self.train_keys}, cfg.train.patch_size)
        elif lazy:
            raise ValueError("balanced sampling indexes every label in memory; streamed data (HKH) needs "
                             "sampler.mode: uniform")
        else:
            self.sampler = PixelBalancedSampler(self.labels, ds.class_names, cfg.sampler.targets,
                                                cfg.train.patch_size, cfg.sampler.jitter, seed=self.seed)
        if self.sampler.absent:
            log.warning("fold %d: classes %s absent from the training tiles; sampler targets renormalised",
                        self.fold, self.sampler.absent)

    def setup_model(self, model: Optional[torch.nn.Module] = None) -> None:
        """The network (``model`` replaces the configured one, for tests), DDP wrapper
        (SyncBatchNorm with ``train.sync_bn``), AdamW, schedulers, gradient scaler, EMA
        and the loss, all on the run's device."""
        from training.models import create_model, model_spec

        cfg, ctx, device = self.cfg, self.ctx, self.device
        seed_all(self.seed, 0xC0FFEE)
        self.spec = model_spec(cfg.model, len(cfg.data.bands), self.n_classes)
        if model is None:
            model = create_model(self.spec, cfg.model.encoder_weights, cfg.model.encoder_first_conv)
        if self.init_state is not None:
            model.load_state_dict(self.init_state, strict=False)
        model = model.to(device)
        self.unused = unused_parameters(model, len(cfg.data.bands))
        if self.unused:
            freeze(model, self.unused)
            if ctx.is_main:
                log.info("%d parameters get no gradient in this architecture (%s%s): frozen, so DDP does not wait "
                         "for them", len(self.unused), ", ".join(self.unused[:3]), " ..." if len(self.unused) > 3 else "")
        if ctx.enabled and cfg.train.sync_bn:
            if device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif ctx.is_main:
                log.warning("train.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                            "ignored for this CPU run")
        self.model = model.to(device)
        self.amp = bool(cfg.train.amp and device.type == "cuda")
        self.net = self.model
        if ctx.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="max", factor=0.5,
                                                                   patience=cfg.train.plateau_patience)
                        if cfg.train.scheduler == "plateau" else None)
        self.scaler = grad_scaler(self.amp)
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema else None
        self.loss_fn = CombinedLoss(cfg.loss, self.class_weight).to(device)

    # ---- restore ----------------------------------------------------------------------------
    def restore(self) -> int:
        """Continue a cut run from ``last.pt`` if it belongs to this run (same fold, seed
        and config); every restored tensor lands on the run's device. Returns the first
        epoch to train."""
        if not os.path.exists(self.last_path):
            return self.start_epoch
        ck = load_state(self.last_path, "resume state", "delete it to start this member afresh")
        from training.config import config_differences

        if not (ck.get("fold") == self.fold and ck.get("seed") == self.seed
                and not config_differences(ck.get("config") or {}, self.cfg.model_dump())):
            if self.ctx.is_main:
                log.warning("%s belongs to another run (fold/seed/config differ); starting fresh", self.last_path)
            return self.start_epoch
        restore_state(ck, self.device, self.model, self.opt, self.scaler, self.ema, self.plateau)
        self.restore_guards(ck.get("guards") or {})
        self.history, self.best_mcc, self.bad_epochs = ck["history"], ck["best_mcc"], ck["bad_epochs"]
        self.start_epoch = ck["epoch"] + 1
        if self.ctx.is_main:
            log.warning("fold %d seed %d: resuming after epoch %d (best val MCC %.4f)",
                        self.fold, self.seed, ck["epoch"], self.best_mcc)
        return self.start_epoch

    # ---- one epoch --------------------------------------------------------------------------
    def epoch_patches(self, epoch: int) -> Tuple[PatchDataset, List[int], np.ndarray]:
        """This rank's patches for ``epoch`` (an equal share on every rank), their training
        order, and the achieved sampler rates over all ranks' patches. The order (and the
        dropped remainder) depends on the configured batch only, so a step redone with a
        smaller micro-batch (``train.auto_batch``) trains on the same samples."""
        cfg, ctx = self.cfg, self.ctx
        patches = self.sampler.sample(cfg.train.patches_per_epoch, self.seed, epoch)
        rates = achieved_rates([p[3] for p in patches], self.n_classes)
        mine = shard(patches, ctx.rank, ctx.world)
        ds = PatchDataset(self.images, self.labels, mine, cfg.train.patch_size, self.n_classes, self.augment,
                          boundary=cfg.loss.boundary > 0, seed=self.seed, epoch=epoch, rank=ctx.rank,
                          shift=self.shift, norms=self.norms, mode=cfg.data.normalization,
                          lakes=self.lakes, lake_p=cfg.augment.lake_paste_p)
        g = torch.Generator()
        g.manual_seed(self.seed * 1009 + epoch)
        order = torch.randperm(len(ds), generator=g).tolist()
        b = cfg.train.batch_size
        if len(order) > b:  # drop the last incomplete batch
            order = order[: len(order) // b * b]
        return ds, order, rates

    def step_loader(self, ds: PatchDataset, order: List[int], start: int = 0) -> Tuple[DataLoader, List[bool]]:
        """Micro-batches of ``self.batch.micro`` from sample ``start`` (a step boundary) on, and
        for each whether it ends an optimiser step (``batch_size x accumulate`` samples)."""
        t = self.cfg.train
        plan = window_batches(order, t.batch_size * t.accumulate, self.batch.micro, start)
        loader = DataLoader(ds, batch_sampler=[b for b, _ in plan], num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        return loader, [u for _, u in plan]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, d: Optional[torch.Tensor], epoch: int,
                   update: bool, step: int = 0) -> Dict[str, float]:
        """Forward and backward on one micro-batch; with ``update`` also the optimiser step
        (:meth:`optimizer_step`). Under DDP, gradients are all-reduced only on the updating
        step (``no_sync`` on the accumulation steps before it). Loss parts that come out
        NaN/inf are remembered for the step's verdict."""
        sync = contextlib.nullcontext()
        if self.ctx.enabled and not update:
            sync = self.net.no_sync()
        with sync:
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.net(x)
            parts = self.loss_fn(logits.float(), y, d, epoch)
            # backward even on a non-finite loss: under DDP every rank must join the all-reduce
            # (the NaN gradients it brings make every rank skip this step alike)
            self.scaler.scale(parts["total"] / self.batch.accum).backward()
        vals = {k: float(v.detach()) for k, v in parts.items()}  # the one device sync of the loss parts
        bad = nonfinite_parts(vals)
        self._window_bad.extend(p for p in bad if p not in self._window_bad)
        if update:
            self.optimizer_step(epoch, step)
        return vals

    def optimizer_step(self, epoch: int, step: int) -> str:
        """Clip and step, unless the loss or the gradient norm (before clipping) is NaN/inf:
        then the step is skipped and counted, and a run of them stops the member
        (``MemberDiverged``). Under AMP a GradScaler overflow skip is left to the scaler."""
        t = self.cfg.train
        self.scaler.unscale_(self.opt)  # a no-op without AMP
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = (torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip else grad_norm(params))
        bad, self._window_bad = self._window_bad, []
        if self.ctx.enabled:  # every rank takes the same decision
            flag = torch.tensor([1.0 if bad else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = ["(on another rank)"]
        scale = float(self.scaler.get_scale()) if self.amp else None
        verdict = self.nonfinite.observe(epoch, step, bad, bool(torch.isfinite(norm)), self.amp, scale)
        if verdict == SKIPPED:
            self.opt.zero_grad(set_to_none=True)
            self.scaler.update()  # AMP: clears the unscale record (and lowers the scale); else a no-op
            return verdict
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return verdict

    def set_lr(self, epoch: int) -> None:
        if self.plateau is None:
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.train.lr * lr_factor(self.cfg, epoch)

    def train_one_epoch(self, epoch: int) -> Dict[str, Any]:
        """Sample, augment and train one epoch; returns its history row (mean loss parts,
        learning rate, achieved sampler rates and pixel shares, non-finite steps skipped,
        micro-batch and accumulation). Out of memory in a step: ``train.auto_batch`` halves
        the micro-batch and redoes that step; otherwise ``MemberOutOfMemory``."""
        seed_all(self.seed, epoch)
        self.set_lr(epoch)
        ds, order, rates = self.epoch_patches(epoch)
        self.net.train()
        self.nonfinite.start_epoch()
        done = _Sums(self.n_classes, self.device)  # finished optimiser steps; ``start``: the next one's first sample
        while done.start < len(order):
            oom = False
            try:
                self.train_steps(ds, order, epoch, done)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                oom = True
            if oom:  # outside the except block: the failed step's tensors are released by now
                self.opt.zero_grad(set_to_none=True)
                forget_unscale(self.scaler)  # an OOM between unscale_ and step: the redo unscales afresh
                self.shrink_batch(epoch, done.start // self.effective_batch)
        return self.epoch_row(epoch, done, rates)

    @property
    def effective_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.accumulate

    def train_steps(self, ds: PatchDataset, order: List[int], epoch: int, done: "_Sums") -> None:
        """The epoch's optimiser steps from sample ``done.start`` on, in micro-batches of the
        current size; each finished step is added to ``done`` (a failed one adds nothing)."""
        loader, updates = self.step_loader(ds, order, done.start)
        step = _Sums(self.n_classes, self.device)
        self.opt.zero_grad(set_to_none=True)
        self._window_bad = []
        for i, (x, y, d) in enumerate(loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            d = d.to(self.device, non_blocking=True) if d.numel() else None
            step.pixels += torch.bincount(y.reshape(-1), minlength=self.n_classes)[:self.n_classes]  # on the device
            step.add_loss(self.train_step(x, y, d, epoch, updates[i], step=done.start // self.effective_batch))
            if updates[i]:  # the step is done: count it
                done.absorb(step)
                step = _Sums(self.n_classes, self.device)
                done.start = min(done.start + self.effective_batch, len(order))
        del loader

    def epoch_row(self, epoch: int, done: "_Sums", rates: np.ndarray) -> Dict[str, Any]:
        """The history row of an epoch: mean loss parts, lr, sampler rates, guards' counts."""
        row: Dict[str, Any] = {"epoch": epoch, "lr": self.opt.param_groups[0]["lr"],
                               **{f"loss_{k}": v / max(done.n, 1) for k, v in done.loss.items()}}
        pixels = done.pixels.cpu().numpy().astype(np.float64)
        for c, name in enumerate(self.class_names):
            row[f"centre_{name}"] = round(float(rates[c]), 4)
            row[f"pixels_{name}"] = round(float(pixels[c] / max(pixels.sum(), 1)), 4)
        row.update(bad_steps=self.nonfinite.epoch_bad, amp_skips=self.nonfinite.epoch_amp_skips,
                   micro_batch=self.batch.micro, accumulate=self.batch.accum)
        return row

    def shrink_batch(self, epoch: int, step: int) -> None:
        """After an out-of-memory step: half the micro-batch, twice the accumulation (logged),
        or ``MemberOutOfMemory`` with the numbers and the fix."""
        free_memory(self.device)
        t = self.cfg.train
        where = f"the training step (epoch {epoch} step {step})"
        msg = f"fold {self.fold} seed {self.seed}: " + oom_message(where, self.batch.micro, self.batch.accum, t.patch_size,
                                                                   self.device, auto_batch=t.auto_batch)
        nxt = smaller_batch(self.batch.micro, self.batch.accum)
        if not t.auto_batch or nxt is None:
            raise MemberOutOfMemory(msg)
        if self.ctx.enabled:
            raise MemberOutOfMemory(msg + " (train.auto_batch does not act under DDP, where every rank must "
                                          "keep the same batches: set the batch size above)")
        log.warning("fold %d seed %d epoch %d step %d: out of memory; auto_batch: micro-batch %d -> %d, "
                    "accumulate %d -> %d (effective batch %d kept), redoing the step", self.fold, self.seed,
                    epoch, step, self.batch.micro, nxt[0], self.batch.accum, nxt[1], self.batch.micro * self.batch.accum)
        self.batch.micro, self.batch.accum = nxt

    # ---- validate and checkpoint -------------------------------------------------------------
    def eval_model(self) -> torch.nn.Module:
        """The weights validation scores: the EMA weights when EMA is on."""
        if self.ema is None:
            return self.model
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.ema.state)
        return m

    def validate(self, epoch: int, row: Dict[str, Any]) -> bool:
        """Score the validation tiles (rank 0, on ``val_every`` epochs and the last);
        adds val MCC overall and per class to ``row``; returns whether this is the best
        epoch so far."""
        cfg, ctx = self.cfg, self.ctx
        if not ctx.is_main:
            return False
        if not self.val_keys:
            return True  # no validation tiles: the last epoch is the best
        if not ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs):
            return False
        acc, _, _ = self.score(self.eval_model())
        row["val_mcc"] = acc.mcc
        for r in acc.per_class(self.class_names):
            row[f"val_mcc_{r['class']}"] = r["mcc"]
        row["val_window"] = self.batch.val_window
        if self.class_monitor is not None:
            warned = self.class_monitor.observe(epoch, acc.cm, [row[f"centre_{c}"] for c in self.class_names],
                                                [row[f"pixels_{c}"] for c in self.class_names])
            for line in warned:
                log.warning(line)
            if warned:
                row["class_warnings"] = warned  # a list: in the epoch line and the checkpoint, not the CSV
        self.check_stuck_start(epoch, acc.mcc)
        if self.plateau is not None:
            self.plateau.step(acc.mcc)
        return acc.mcc > self.best_mcc

    def check_stuck_start(self, epoch: int, mcc: float) -> None:
        """A pretrained start (ImageNet, a file) whose validation MCC is still below 0.15 a
        quarter into the run is warned about once: such starts have been seen stuck near
        0.05-0.10 when RGB filters meet SWIR and thermal."""
        cfg = self.cfg
        if not cfg.model.encoder_weights or getattr(self, "_stuck_warned", False):
            return
        if epoch + 1 >= max(cfg.train.warmup_epochs + 1, round(0.25 * cfg.train.epochs)) and mcc < 0.15:
            self._stuck_warned = True
            log.warning("fold %d: validation MCC %.3f after %d epochs from encoder weights %s: a start stuck this low "
                        "is the sign of filters that do not fit the bands; try model.encoder_first_conv: fresh or "
                        "mean, or model.encoder_weights: null", self.fold, mcc, epoch + 1, cfg.model.encoder_weights)

    def score(self, model: torch.nn.Module, keep_probs: bool = False):
        """``validate`` on the validation tiles; out of memory: with ``train.auto_batch`` the
        window halves until it fits (logged), otherwise ``MemberOutOfMemory``."""
        while True:
            cfg = self.cfg
            if self.batch.val_window != cfg.validation.window:
                cfg = cfg.model_copy(deep=True)
                cfg.validation.window = self.batch.val_window
            oom = False
            try:
                return validate(model, self.val_raw, self.val_labels, self.stats, self.device, cfg, self.n_classes,
                                keep_probs=keep_probs)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                oom = True
            if oom:
                free_memory(self.device)
                side = max(max(a.shape[-2:]) for a in self.val_raw.values())
                used = min(self.batch.val_window, -(-side // 32) * 32)  # the window actually run
                new = smaller_window(used, floor=32)
                t = self.cfg.train
                msg = f"fold {self.fold} seed {self.seed}: " + oom_message(
                    "validation", self.batch.micro, self.batch.accum, t.patch_size, self.device, window=used)
                if not t.auto_batch or new is None:
                    raise MemberOutOfMemory(msg)
                log.warning("fold %d seed %d: out of memory in validation; auto_batch: validation window %d -> %d",
                            self.fold, self.seed, used, new)
                self.batch.val_window = new

    def guard_state(self) -> Dict[str, Any]:
        """What the guards carry over a resume (plain values: ``weights_only`` loads them)."""
        state = {**self.batch.state_dict(), **self.nonfinite.state_dict()}
        cm = self.class_monitor
        state.update(cm.state_dict() if cm else {"class_reported": [], "class_warnings": [], "class_streak": {}})
        return state

    def restore_guards(self, g: Dict[str, Any]) -> None:
        for guard in (self.batch, self.nonfinite, self.class_monitor):
            if guard is not None:
                guard.load_state_dict(g)

    def check_finite(self, epoch: int) -> None:
        """Weights holding NaN/inf stop the member before anything is saved (every rank
        checks: DDP weights are the same everywhere, so every rank stops alike)."""
        states = [("the weights", self.model.state_dict())]
        if self.ema is not None:
            states.append(("the EMA weights", self.ema.state))
        for what, sd in states:
            bad = nonfinite_tensors(sd)
            if bad:
                raise MemberDiverged(self.nonfinite.message(
                    epoch, None, f"{what} hold NaN/inf after the epoch ({', '.join(bad[:3])}"
                                 f"{' ...' if len(bad) > 3 else ''})"))

    def meta(self) -> Dict[str, Any]:
        """What makes a checkpoint self-describing (everything but weights and history)."""
        cfg = self.cfg
        return {
            "format": FORMAT, "kind": self.kind, "spec": self.spec, "sensor": cfg.data.sensor,
            "bands": list(cfg.data.bands),
            "folders": list(BAND_FOLDERS[: len(cfg.data.bands)]),
            "stats": self.stats, "class_map": class_map(cfg.data.label_mode == "binary"), "fold": self.fold,
            "seed": self.seed, "train_tiles": list(self.train_keys), "val_tiles": list(self.val_keys),
            "config": cfg.model_dump(), "code_version": code_version(),
            "class_shares_train": self.shares.tolist(), "tile_sha256": self.tile_fingerprints(), **self.extra_meta,
        }

    def tile_fingerprints(self) -> Dict[str, str]:
        """Content fingerprints of the member's training and validation tiles (members only:
        a streamed pre-training set is not fingerprinted)."""
        if self.kind != "member" or getattr(self.dataset, "lazy", False):
            return {}
        from training.data.competition import tile_sha256

        if not hasattr(self, "_fingerprints"):
            self._fingerprints = {k: tile_sha256(self.dataset.image(k)) for k in self.train_keys + self.val_keys}
        return self._fingerprints

    def checkpoint(self, epoch: int, row: Dict[str, Any], improved: bool) -> None:
        """Rank 0: ``best.pt`` when improved, always ``last.pt`` (everything a resume
        needs, CPU copies) and the CSV log. Weights holding NaN/inf are never written."""
        self.check_finite(epoch)
        if not self.ctx.is_main:
            return
        state = self.ema.state if self.ema is not None else self.model.state_dict()
        if improved:
            self.best_mcc = row.get("val_mcc", self.best_mcc)
            self.bad_epochs = 0
            save_atomic({**self.meta(), "state_dict": cpu_state(state), "epoch": epoch, "best_mcc": self.best_mcc},
                        self.best_path)
        else:
            self.bad_epochs += 1
        write_csv(RunDir(self.out_dir).log_csv(member_name(self.fold, self.seed)), self.history)
        if not self.last_due():
            return
        self._last_written = time.time()
        save_atomic({"kind": self.kind, "fold": self.fold, "seed": self.seed, "config": self.cfg.model_dump(),
                     "epoch": epoch, "state_dict": cpu_state(self.model.state_dict()),
                     "optimizer": _cpu_optimizer_state(self.opt.state_dict()),
                     "plateau": self.plateau.state_dict() if self.plateau is not None else None,
                     "scaler": self.scaler.state_dict(),
                     "ema": cpu_state(self.ema.state) if self.ema is not None else None,
                     "ema_steps": self.ema.steps if self.ema is not None else 0,
                     "history": self.history, "best_mcc": self.best_mcc, "bad_epochs": self.bad_epochs,
                     "guards": self.guard_state()},
                    self.last_path)

    def last_due(self) -> bool:
        """``last.pt`` (model, optimiser, EMA: ~375 MB for ResNet-34) is written after the first
        epoch of a process, then when ``train.checkpoint_every_s`` has passed since the last
        write (every epoch at 0): a cut run redoes at most that much training."""
        every = self.cfg.train.checkpoint_every_s
        return self._last_written is None or every <= 0 or time.time() - self._last_written >= every

    # ---- finalise ---------------------------------------------------------------------------
    def finalise(self) -> Dict[str, Any]:
        """Rank 0: reload the best weights, score them on every validation tile, write
        the out-of-fold probabilities and the member; remove ``last.pt``/``best.pt``."""
        result: Dict[str, Any] = {"fold": self.fold, "seed": self.seed, "best_mcc": self.best_mcc}
        if not self.ctx.is_main:
            return result
        best = load_state(self.best_path, "best-epoch checkpoint", "delete it and re-run")
        self.model.load_state_dict(best["state_dict"])
        per_class: List[Dict[str, Any]] = []
        per_tile: Dict[str, float] = {}
        outcomes: List[Dict[str, Any]] = []
        if self.val_keys:
            acc, per_tile, probs = self.score(self.model, keep_probs=self.save_oof)
            per_class = acc.per_class(self.class_names)
            if self.class_monitor is not None:
                outcomes = self.class_monitor.outcomes(acc.cm)
            if self.save_oof:
                self.write_oof(probs)
        final = {**best, "kind": self.kind, "history": self.history, "per_class": per_class,
                 "per_tile_mcc": per_tile, "val_mcc": best.get("best_mcc"), "best_epoch": best.get("epoch"),
                 "epochs_run": len(self.history), "stopped_early": self.stopped_early,
                 "train_seconds": round(time.time() - self.t0, 1),
                 "class_warnings": list(self.class_monitor.warnings) if self.class_monitor else [],
                 "class_outcomes": outcomes, "ema_initial_share": self.ema.initial_share() if self.ema else None,
                 "bad_steps": self.nonfinite.total_bad, "micro_batch": self.batch.micro, "accumulate": self.batch.accum}
        assert_finite_state(final["state_dict"], self.out_path)  # never a member with NaN/inf weights
        save_atomic(final, self.out_path)
        for p in (self.last_path, self.best_path):
            if os.path.exists(p):
                os.unlink(p)
        result.update(val_mcc=final["val_mcc"], best_epoch=final["best_epoch"], epochs_run=len(self.history),
                      per_class=per_class, seconds=final["train_seconds"], path=self.out_path,
                      class_warnings=final["class_warnings"], class_outcomes=outcomes, bad_steps=final["bad_steps"])
        return result

    def write_oof(self, probs: Dict[str, np.ndarray]) -> None:
        RunDir(self.out_dir).write_oof(member_name(self.fold, self.seed), probs, self.val_labels)

    # ---- the whole run ----------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """set-up -> restore -> (train one epoch -> validate -> checkpoint -> callbacks)* -> finalise."""
        os.makedirs(self.work_dir, exist_ok=True)
        self.setup_data()
        self.setup_model()
        self.restore()
        ctx, cfg = self.ctx, self.cfg
        reporter = self.reporter
        if reporter is None and ctx.is_main:
            reporter = EpochReporter(self.fold, self.seed, cfg.train.epochs, self.class_names, self.start_epoch,
                                     members_after=self.members_after, worker=self.worker, bars=self.progress)
        try:
            for epoch in range(self.start_epoch, cfg.train.epochs):
                te = time.time()
                row = self.train_one_epoch(epoch)
                improved = self.validate(epoch, row)
                row["seconds"] = round(time.time() - te, 2)
                self.history.append(row)
                self.checkpoint(epoch, row, improved)
                if reporter is not None:
                    reporter.epoch_done(row, self.best_mcc)
                stop = cfg.train.early_stopping and self.bad_epochs >= cfg.train.early_stopping
                if ctx.broadcast_flag(bool(stop)):
                    self.stopped_early = True
                    break
                ctx.barrier()
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, row)
        finally:
            if reporter is not None:
                reporter.close()
        result = self.finalise()
        ctx.barrier()
        return result


class _Sums:
    """Loss sums, micro-batch count and label pixels over finished optimiser steps."""

    def __init__(self, n_classes: int, device: Optional[torch.device] = None):
        self.loss: Dict[str, float] = {}
        self.n = 0
        self.pixels = torch.zeros(n_classes, dtype=torch.int64, device=device or "cpu")
        self.start = 0

    def add_loss(self, vals: Dict[str, float]) -> None:
        if not nonfinite_parts(vals):  # a skipped step's NaN stays out of the means
            for k, v in vals.items():
                self.loss[k] = self.loss.get(k, 0.0) + v
            self.n += 1

    def absorb(self, other: "_Sums") -> None:
        for k, v in other.loss.items():
            self.loss[k] = self.loss.get(k, 0.0) + v
        self.n += other.n
        self.pixels += other.pixels


def _cpu_optimizer_state(sd: Dict[str, Any]) -> Dict[str, Any]:
    from training.engine.state import to_device

    return {"state": to_device(sd["state"], torch.device("cpu")), "param_groups": sd["param_groups"]}


def train_member(cfg: Config, dataset, train_keys: List[str], val_keys: List[str], fold: int, seed: int,
                 out_path: str, work_dir: str, ctx: Optional[DistContext] = None,
                 progress: bool = True, init_state: Optional[Dict[str, torch.Tensor]] = None,
                 save_oof: bool = True, kind: str = "member", **trainer_kw: Any) -> Dict[str, Any]:
    """Train one member and write ``out_path``; resumes from ``work_dir`` if a run was cut.
    A thin wrapper over :class:`training.engine.trainer.Trainer`, whose methods are the steps."""
    return Trainer(cfg, dataset, train_keys, val_keys, fold, seed, out_path, work_dir, ctx=ctx,
                   init_state=init_state, save_oof=save_oof, kind=kind, progress=progress,
                   **trainer_kw).fit()
