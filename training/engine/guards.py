"""Training guards: turn the failures that cost hours of GPU time into early, clear events.

- a non-finite loss or gradient norm, told apart from a GradScaler skip under AMP: isolated
  bad steps are skipped and counted, a run of them stops the member (``MemberDiverged``);
- weights holding NaN/inf are never saved (``assert_finite_state``);
- out of memory (CUDA or the CPU allocator): a message with the numbers and a batch size +
  accumulation that keep the effective batch (``oom_message``, ``smaller_batch``);
- a class the model is not learning: reported once per member after a warm-up, with the
  sampler's achieved rate for it and the config keys that move it (``ClassLearningMonitor``).

Pure logic on tensors and numbers: the training loop decides where to call it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch


class MemberFailed(RuntimeError):
    """A member that cannot finish; the message is for the user (what happened, what to do).
    ``cv`` records it, goes on with the other members and exits non-zero at the end."""

    kind = "failed"


class MemberDiverged(MemberFailed):
    kind = "diverged"


class MemberOutOfMemory(MemberFailed):
    kind = "out of memory"


# ---- non-finite loss and gradients ----------------------------------------------------------------
def nonfinite_parts(parts: Mapping[str, object]) -> List[str]:
    """Names of the loss parts (tensors or floats) that are NaN or inf; ``total`` is named
    only when every part is finite but their sum is not."""
    bad = [k for k, v in parts.items() if k != "total" and not math.isfinite(float(v))]
    if not bad and "total" in parts and not math.isfinite(float(parts["total"])):
        bad = ["total"]
    return bad


OK, SKIPPED, AMP_SKIP = "ok", "skipped", "amp_skip"


@dataclass
class NonFiniteMonitor:
    """Watches every optimiser step. A step is bad when its loss or its gradient norm
    (before clipping) is NaN/inf; under AMP a non-finite gradient with a finite loss is the
    GradScaler's normal overflow skip (it halves its scale and retries), counted apart, unless
    the scale has already fallen below ``amp_min_scale``: gradients that overflow fp16 even
    unscaled are a real divergence. ``limit`` bad steps in a row stop the member."""

    limit: int = 3
    amp_min_scale: float = 1.0
    fold: int = 0
    seed: int = 0
    lr: float = 0.0
    boundary: float = 0.0
    ramp: int = 0
    where: str = ""
    in_a_row: int = 0
    total_bad: int = 0
    epoch_bad: int = 0
    epoch_amp_skips: int = 0
    last_reason: str = ""
    parts_seen: List[str] = field(default_factory=list)

    def start_epoch(self) -> None:
        self.epoch_bad = 0
        self.epoch_amp_skips = 0

    def state_dict(self) -> Dict[str, int]:
        """What a resume carries over (plain values: ``weights_only`` loads them)."""
        return {"bad_steps_total": self.total_bad}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.total_bad = int(state.get("bad_steps_total", 0))

    def observe(self, epoch: int, step: int, bad_parts: Sequence[str], grad_finite: bool,
                amp: bool = False, scale: Optional[float] = None) -> str:
        """Classify one optimiser step: ``ok``, ``skipped`` (bad: do not apply it) or
        ``amp_skip`` (the scaler skips it). Raises ``MemberDiverged`` on the ``limit``-th bad
        step in a row."""
        if not bad_parts and grad_finite:
            self.in_a_row = 0
            return OK
        if not bad_parts and amp and (scale is None or scale >= self.amp_min_scale):
            self.epoch_amp_skips += 1
            return AMP_SKIP
        if bad_parts:
            reason = f"loss part{'s' if len(bad_parts) > 1 else ''} {', '.join(bad_parts)} non-finite"
            self.parts_seen.extend(p for p in bad_parts if p not in self.parts_seen)
        elif amp:
            reason = (f"gradients non-finite even at GradScaler scale {scale:g} (loss finite): not an fp16 "
                      "overflow but a divergence")
        else:
            reason = "gradient norm non-finite (loss finite)"
        self.in_a_row += 1
        self.total_bad += 1
        self.epoch_bad += 1
        self.last_reason = reason
        if self.in_a_row >= self.limit:
            raise MemberDiverged(self.message(epoch, step))
        return SKIPPED

    def message(self, epoch: int, step: Optional[int], reason: Optional[str] = None) -> str:
        """What went wrong, where (``step`` None: at the end of the epoch), and the fix."""
        what = reason or f"{self.last_reason} on {self.in_a_row} optimiser steps in a row"
        fixes = [f"lower train.lr (now {self.lr:g}; try {self.lr / 10:g})",
                 f"lower loss.boundary (now {self.boundary:g})",
                 f"lengthen loss.boundary_ramp_epochs (now {self.ramp})"]
        if self.parts_seen == ["boundary"]:  # only the boundary part blew up: its weight first
            fixes = fixes[1:] + fixes[:1]
        keep = f"; the last good checkpoint is kept in {self.where}" if self.where else ""
        at = f"epoch {epoch} step {step}" if step is not None else f"epoch {epoch}"
        return (f"fold {self.fold} seed {self.seed}: training diverged at {at}: {what} "
                f"({self.total_bad} non-finite step{'s' if self.total_bad != 1 else ''} in all). "
                f"Fix: {', '.join(fixes[:-1])}, or {fixes[-1]}. No member file was written{keep}.")


def grad_norm(parameters) -> torch.Tensor:
    """Total L2 norm of the gradients (NaN/inf when any gradient is), without clipping."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating tensors of a state dict that hold NaN or inf (one device sync)."""
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(state[k]).all().cpu() for k in names])
    if bool(flags.all()):
        return []
    return [k for k, ok in zip(names, flags.tolist()) if not ok]


def assert_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to save weights holding NaN/inf: raises ``MemberDiverged`` naming the tensors."""
    bad = nonfinite_tensors(state)
    if bad:
        raise MemberDiverged(f"{what}: {len(bad)} weight tensor(s) hold NaN/inf ({', '.join(bad[:4])}"
                             f"{' ...' if len(bad) > 4 else ''}); not written")


# ---- out of memory --------------------------------------------------------------------------------
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate",
             "cublas_status_alloc_failed", "not enough memory")


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's RuntimeError ("DefaultCPUAllocator: can't
    allocate memory") and Python's MemoryError."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if isinstance(exc, MemoryError) or (oom_types and isinstance(exc, oom_types)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def free_memory(device: torch.device) -> None:
    """Give cached blocks back after an OOM so a smaller retry can use them."""
    import gc

    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_memory(device: torch.device) -> str:
    """The device's memory in words: total, and the peak torch allocated (CUDA)."""
    gib = 1024 ** 3
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(idx).total_memory
        peak = torch.cuda.max_memory_allocated(idx)
        return f"{torch.cuda.get_device_name(idx)} {idx}: {total / gib:.1f} GiB, peak {peak / gib:.1f} GiB allocated by torch"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return f"CPU RAM {total / gib:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return "CPU RAM (size unknown)"


def smaller_batch(batch: int, accumulate: int) -> Optional[Tuple[int, int]]:
    """A micro-batch about half as big and the accumulation that keeps the effective batch
    ``batch * accumulate`` exactly; None at batch 1."""
    if batch <= 1:
        return None
    new = max(d for d in range(1, batch // 2 + 1) if batch % d == 0)
    return new, accumulate * (batch // new)


def smaller_window(window: int, floor: int = 64) -> Optional[int]:
    """Half the validation window, kept a multiple of 32; None below ``floor``."""
    new = window // 2 // 32 * 32
    return new if new >= floor else None


def oom_message(where: str, batch: int, accumulate: int, patch: int, device: torch.device,
                auto_batch: bool = False, window: Optional[int] = None) -> str:
    """The out-of-memory message: the numbers, then a setting that fits and keeps training equal."""
    mem = device_memory(device)
    if window is not None:  # validation
        w = smaller_window(window)
        fix = (f"set validation.window: {w} (validation windows only; training is unchanged)" if w else
               "validate on a device with more memory")
        return (f"out of memory in {where} with validation.window {window} on {mem}. Fix: {fix}, "
                "or set train.auto_batch: true to shrink it by itself.")
    alt = smaller_batch(batch, accumulate)
    if alt is None:
        fix = f"use a smaller train.patch_size (now {patch}) or a smaller model: batch 1 does not fit"
    else:
        fix = (f"--set train.batch_size={alt[0]} --set train.accumulate={alt[1]} (the effective batch stays "
               f"{batch * accumulate})")
        if not auto_batch:
            fix += ", or set train.auto_batch: true to do this by itself"
    return (f"out of memory in {where} with train.batch_size {batch} x patch {patch}x{patch} "
            f"(train.accumulate {accumulate}, effective batch {batch * accumulate}) on {mem}. Fix: {fix}.")


# ---- a class the model is not learning ------------------------------------------------------------
@dataclass
class ClassLearningMonitor:
    """After ``warmup`` epochs, a class present in the validation labels whose recall stays 0,
    or whose predicted share stays below ``share_ratio`` x its label share, for ``patience``
    validations in a row is reported once (per member) with the sampler's achieved rate for
    it and the config keys that move it."""

    class_names: Sequence[str]
    warmup: int = 1
    patience: int = 2
    share_ratio: float = 0.1
    fold: int = 0
    seed: int = 0
    targets: Mapping[str, float] = field(default_factory=dict)
    absent: Sequence[str] = ()
    streak: Dict[str, int] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    reported: List[str] = field(default_factory=list)
    reported_at: Dict[str, int] = field(default_factory=dict)  # class -> epoch of its warning

    def observe(self, epoch: int, cm: np.ndarray, centre_rates: Sequence[float],
                pixel_rates: Sequence[float]) -> List[str]:
        """One validation's confusion matrix (rows truth, columns prediction); returns the
        warnings raised by it (each class at most once per member)."""
        cm = np.asarray(cm, np.float64)
        total = max(cm.sum(), 1.0)
        new: List[str] = []
        for c, name in enumerate(self.class_names):
            support, predicted = cm[c].sum(), cm[:, c].sum()
            if support <= 0:
                self.streak[name] = 0
                continue
            recall = cm[c, c] / support
            label_share, pred_share = support / total, predicted / total
            weak = recall == 0 or pred_share < self.share_ratio * label_share
            self.streak[name] = self.streak.get(name, 0) + 1 if (weak and epoch >= self.warmup) else 0
            if self.streak[name] >= self.patience and name not in self.reported:
                self.reported.append(name)
                self.reported_at[name] = int(epoch)
                new.append(self._message(epoch, name, recall, pred_share, label_share,
                                         float(centre_rates[c]), float(pixel_rates[c])))
        self.warnings.extend(new)
        return new

    def state_dict(self) -> Dict[str, object]:
        return {"class_reported": list(self.reported), "class_warnings": list(self.warnings),
                "class_streak": dict(self.streak), "class_reported_at": dict(self.reported_at)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.reported = list(state.get("class_reported", []))
        self.warnings = list(state.get("class_warnings", []))
        self.streak = dict(state.get("class_streak", {}))
        self.reported_at = dict(state.get("class_reported_at", {}))

    def outcomes(self, cm: np.ndarray) -> List[Dict[str, object]]:
        """For each class warned about: did it recover by the end? ``cm`` is the final
        (kept) weights' validation confusion. Recovered = recall above 0 and a predicted
        share of at least ``share_ratio`` x its label share (the warning's test, passed)."""
        cm = np.asarray(cm, np.float64)
        total = max(cm.sum(), 1.0)
        out: List[Dict[str, object]] = []
        for name in self.reported:
            c = list(self.class_names).index(name)
            support, predicted, tp = cm[c].sum(), cm[:, c].sum(), cm[c, c]
            recall = tp / support if support else 0.0
            fp, fn = predicted - tp, support - tp
            tn = total - tp - fp - fn
            den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            mcc = float((tp * tn - fp * fn) / den) if den else 0.0
            ok = support > 0 and recall > 0 and predicted / total >= self.share_ratio * support / total
            out.append({"class": name, "warned_epoch": self.reported_at.get(name), "recovered": bool(ok),
                        "final_recall": float(recall), "final_mcc": mcc})
        return out

    def _message(self, epoch: int, name: str, recall: float, pred_share: float, label_share: float,
                 centre: float, pixels: float) -> str:
        head = (f"fold {self.fold} seed {self.seed} epoch {epoch}: class {name} is not being learned: validation "
                f"recall {recall:.3f}, predicted on {100 * pred_share:.3g} % of pixels vs {100 * label_share:.3g} % "
                f"in the labels, for {self.patience} validations in a row")
        if name in self.absent:
            return (f"{head}. It is absent from this fold's training tiles, so no patch can show it: re-make the "
                    "folds (`glacier-train folds` stratifies rare classes) or add tiles that hold it.")
        target = self.targets.get(name)
        tgt = f" (sampler.targets.{name} {target:g})" if target is not None else ""
        return (f"{head}. The sampler centred {100 * centre:.1f} % of the epoch's patches on it{tgt}, and it "
                f"covered {100 * pixels:.2f} % of the training pixels. Move it with sampler.targets.{name} "
                "(more patches centred on it), loss.class_weights (auto weighs rare classes up), or "
                "loss.focal_gamma.")


# ---- the batch and window that fit in memory (train.auto_batch) ---------------------------------------
@dataclass
class BatchGuard:
    """The micro-batch, accumulation and validation window a run uses now: ``train.auto_batch``
    shrinks them after an out-of-memory error (the effective batch stays), and a resume keeps
    what was found to fit."""
    micro: int
    accum: int
    val_window: int

    def shrink_batch(self) -> Optional[Tuple[int, int]]:
        """Half the micro-batch, twice the accumulation; None at batch 1 (nothing changed)."""
        nxt = smaller_batch(self.micro, self.accum)
        if nxt is not None:
            self.micro, self.accum = nxt
        return nxt

    def state_dict(self) -> Dict[str, int]:
        return {"micro": self.micro, "accum": self.accum, "val_window": self.val_window}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.micro = int(state.get("micro", self.micro))
        self.accum = int(state.get("accum", self.accum))
        self.val_window = int(state.get("val_window", self.val_window))


# ---- micro-batches over a fixed epoch order (what auto_batch resumes from) ------------------------
def window_batches(order: Sequence[int], effective: int, micro: int, start: int = 0) -> List[Tuple[List[int], bool]]:
    """The epoch's samples ``order`` cut into optimiser steps of ``effective`` samples, each
    cut into micro-batches of at most ``micro``: ``[(indices, update)]`` where ``update``
    marks the last micro-batch of its step. Starts at sample ``start`` (a step boundary), so
    a step redone with a smaller micro-batch sees exactly the samples it saw before."""
    if start % effective:
        raise ValueError(f"start {start} is not a step boundary (steps of {effective} samples)")
    out: List[Tuple[List[int], bool]] = []
    order = list(order)
    for w0 in range(start, len(order), effective):
        window = order[w0:w0 + effective]
        chunks = [window[i:i + micro] for i in range(0, len(window), micro)]
        out.extend((c, i == len(chunks) - 1) for i, c in enumerate(chunks))
    return out
