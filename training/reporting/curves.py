"""Training curves: loss parts and validation MCC (overall and per class) per epoch for
every member of a run, from the per-epoch CSV logs ``cv`` writes (``OUT/logs/*.csv``).

matplotlib is optional: without it :func:`plot_curves` returns ``None`` and says why.
"""
from __future__ import annotations

import csv
import glob
import logging
import math
import os
from typing import Dict, List, Optional

log = logging.getLogger("glacier.curves")

History = List[Dict[str, float]]


def _num(v: str) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_histories(weights_dir: str) -> Dict[str, History]:
    """``{member name: [per-epoch row]}`` from ``weights_dir/logs/*.csv`` (numbers only)."""
    out: Dict[str, History] = {}
    from training.rundir import RunDir

    for path in sorted(glob.glob(os.path.join(RunDir(weights_dir).logs_dir, "*.csv"))):
        rows: History = []
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                rows.append({k: v for k, v in ((k, _num(v)) for k, v in r.items()) if v is not None})
        if rows:
            out[os.path.splitext(os.path.basename(path))[0]] = rows
    return out


def plot_curves(histories: Dict[str, History], path: str, title: str = "training curves") -> Optional[str]:
    """One figure: total loss, loss parts (mean over members), validation MCC per member,
    and validation MCC per class (mean over members). Returns the PNG path or ``None``."""
    if not histories:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves figure (pip install matplotlib)")
        return None
    from glacier_runtime.atomic import atomic_write_with

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    parts = sorted({k for h in histories.values() for r in h for k in r if k.startswith("loss_") and k != "loss_total"})
    classes = sorted({k[len("val_mcc_"):] for h in histories.values() for r in h for k in r if k.startswith("val_mcc_")})
    for name, h in histories.items():
        ep = [r.get("epoch", i) + 1 for i, r in enumerate(h)]
        axes[0].plot(ep, [r.get("loss_total", float("nan")) for r in h], lw=1, label=name)
        val = [(r.get("epoch", i) + 1, r["val_mcc"]) for i, r in enumerate(h) if "val_mcc" in r]
        if val:
            axes[2].plot(*zip(*val), lw=1, marker=".", label=name)

    def mean_curve(key: str):
        by_epoch: Dict[float, List[float]] = {}
        for h in histories.values():
            for i, r in enumerate(h):
                if key in r:
                    by_epoch.setdefault(r.get("epoch", i) + 1, []).append(r[key])
        xs = sorted(by_epoch)
        return xs, [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs]

    for p in parts:
        axes[1].plot(*mean_curve(p), lw=1.2, label=p[len("loss_"):])
    for c in classes:
        axes[3].plot(*mean_curve(f"val_mcc_{c}"), lw=1.2, marker=".", label=c)
    for ax, t in zip(axes, ("total loss (per member)", "loss parts (mean of members)",
                            "validation MCC (per member)", "validation MCC per class (mean)")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    if len(histories) <= 15:
        axes[0].legend(fontsize=6, ncol=2)
    for ax in (axes[1], axes[3]):
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in (axes[2], axes[3]):
        ax.set_ylim(-0.05, 1.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path
