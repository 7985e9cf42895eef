"""Progress for long runs: tqdm bars on a terminal, one flushed line per epoch elsewhere.

``nohup ... > log``, notebook ``%%bash`` cells, pipes and fold-parallel workers are not
terminals; there the user still needs to see each epoch (fold, seed, losses, validation
MCC per class, learning rate, time and ETA) as it happens.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence, TextIO


def fmt_duration(seconds: Optional[float]) -> str:
    """``3725`` -> ``1h02m``; ``75`` -> ``1m15s``."""
    if seconds is None:
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class EpochReporter:
    """Reports the epochs of one member.

    ``bars``: use a tqdm bar when ``stream`` is a terminal (otherwise, or when False,
    print one line per epoch). ``members_after``: members this process trains after
    this one (for the run's ETA). ``worker``: fold-parallel worker id, put on every line.
    """

    def __init__(self, fold: int, seed: int, epochs: int, class_names: Sequence[str], start_epoch: int = 0,
                 members_after: int = 0, worker: Optional[int] = None, bars: bool = True,
                 stream: Optional[TextIO] = None):
        self.fold, self.seed, self.epochs = fold, seed, epochs
        self.class_names = list(class_names)
        self.members_after, self.worker = members_after, worker
        self.stream = stream if stream is not None else sys.stdout
        self.times: list = []
        self.bar = None
        if bars and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, initial=start_epoch, desc=self._tag(), unit="ep", leave=False,
                            dynamic_ncols=True, file=self.stream)

    def _tag(self) -> str:
        who = "pretrain" if self.fold < 0 else f"fold {self.fold}"
        tag = f"{who} seed {self.seed}"
        return f"[worker {self.worker}] {tag}" if self.worker is not None else tag

    def etas(self, epoch: int) -> Dict[str, float]:
        per = sum(self.times) / len(self.times)
        member = per * (self.epochs - epoch - 1)
        return {"member": member, "run": member + self.members_after * per * self.epochs}

    def line(self, row: Dict[str, Any], best: float) -> str:
        epoch = int(row["epoch"])
        losses = {k[5:]: v for k, v in row.items() if k.startswith("loss_")}
        parts = [self._tag(), f"epoch {epoch + 1}/{self.epochs}"]
        loss = f"loss {losses.pop('total', float('nan')):.4f}"
        if losses:
            loss += " (" + " ".join(f"{k} {v:.4f}" for k, v in losses.items()) + ")"
        parts.append(loss)
        if "val_mcc" in row:
            per = " ".join(f"{n} {row.get('val_mcc_' + n, float('nan')):.3f}" for n in self.class_names)
            parts.append(f"val MCC {row['val_mcc']:.4f} [{per}] best {best:.4f}")
        parts.append(f"lr {row['lr']:.2e}")
        if row.get("bad_steps"):  # the non-finite guard: isolated bad steps, skipped
            parts.append(f"{row['bad_steps']} non-finite step{'s' if row['bad_steps'] != 1 else ''} skipped")
        eta = self.etas(epoch)
        parts.append(f"{row['seconds']:.1f} s/epoch")
        parts.append(f"ETA member {fmt_duration(eta['member'])} run {fmt_duration(eta['run'])}")
        return " | ".join(parts)

    def epoch_done(self, row: Dict[str, Any], best: float) -> None:
        self.times.append(float(row["seconds"]))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row.get('loss_total', 0):.3f}", val=f"{row.get('val_mcc', float('nan')):.3f}",
                                 best=f"{best:.3f}")
            self.bar.update(1)
            for w in row.get("class_warnings") or []:
                self.bar.write("  ! " + w, file=self.stream)
            return
        self.stream.write(self.line(row, best) + "\n")
        for w in row.get("class_warnings") or []:  # the class guard, once per member
            self.stream.write("  ! " + w + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
