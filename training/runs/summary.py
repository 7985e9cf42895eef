"""The summary of a CV run: the per-member table, the pooled out-of-fold scores per class,
the grade against the targets; ``cv_summary.json``/``.txt``, ``training_log.txt`` and the
curves figure."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.rundir import RunDir, fold_members, read_oof



def oof_confusion(out: str, folds: Dict, dataset, seeds: Sequence[int]):
    """Pooled confusion of out-of-fold predictions over every training tile (mean over
    seeds' probabilities), or ``None`` when there are none. The saved probabilities
    already carry the masked-pixel rule (``Predictor.masked_to_background``)."""
    from training.metrics import ConfusionAccumulator

    oof = read_oof(fold_members(RunDir(out), folds, seeds), labels=False)  # labels from the data
    acc = ConfusionAccumulator(len(dataset.class_names))
    for f in folds["folds"]:
        for key in f["val"]:
            probs = oof.mean_probs(key)
            if probs is not None:
                acc.update(dataset.label(key), probs.argmax(0))
    return acc if oof.keys else None


def oof_score(out: str, folds: Dict, dataset, seeds: Sequence[int]) -> Optional[float]:
    """MCC of out-of-fold predictions over every training tile (mean over seeds' probs)."""
    acc = oof_confusion(out, folds, dataset, seeds)
    return acc.mcc if acc is not None else None


def summarise(out: str, jobs: List[Tuple[int, int]], folds: Dict, dataset, seeds,
              targets: Optional[str] = None) -> Dict[str, Any]:
    """The run's table, the pooled OOF scores per class, and the grade against the targets."""
    from training.engine.checkpoint import load_checkpoint
    from training.reporting.grading import class_facts, grade, load_targets

    rows = []
    for fold, seed in jobs:
        p = RunDir(out).member(fold, seed)
        if not os.path.exists(p):
            continue
        ck = load_checkpoint(p)
        rows.append({"fold": fold, "seed": seed, "val_mcc": ck.get("val_mcc"), "best_epoch": ck.get("best_epoch"),
                     "epochs_run": ck.get("epochs_run"), "seconds": ck.get("train_seconds"),
                     "per_class": ck.get("per_class"), "path": p, "arch": ck["spec"]["arch"],
                     "encoder": ck["spec"]["encoder"], "size_mb": round(os.path.getsize(p) / 2 ** 20, 1),
                     "class_warnings": ck.get("class_warnings") or [], "class_outcomes": ck.get("class_outcomes") or [],
                     "bad_steps": ck.get("bad_steps", 0)})
    mccs = [r["val_mcc"] for r in rows if r["val_mcc"] is not None]
    by_fold: Dict[int, List[float]] = {}
    for r in rows:
        if r["val_mcc"] is not None:
            by_fold.setdefault(r["fold"], []).append(r["val_mcc"])
    fold_means = {f: float(np.mean(v)) for f, v in by_fold.items()}
    acc = oof_confusion(out, folds, dataset, seeds)
    oof_pc = acc.per_class(dataset.class_names) if acc is not None else []
    facts: Dict[str, Any] = {"mean_fold_mcc": float(np.mean(list(fold_means.values()))) if fold_means else None,
                             "best_fold_mcc": max(fold_means.values()) if fold_means else None}
    facts.update(class_facts(oof_pc))
    return {
        "members": rows,
        "mean_val_mcc": float(np.mean(mccs)) if mccs else None,
        "std_val_mcc": float(np.std(mccs)) if mccs else None,
        "fold_mcc": {str(f): m for f, m in sorted(fold_means.items())},
        "oof_mcc": acc.mcc if acc is not None else None,
        "oof_per_class": oof_pc,
        "class_names": list(dataset.class_names),
        "grade": grade("cv", facts, load_targets(targets) if targets else None),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def render_training_log(summary: Dict[str, Any]) -> str:
    """The plain-text log users share: best epoch, per-fold MCC, mean, per-class IoU,
    training time, checkpoint size, and the grade with every criterion."""
    from training.reporting.grading import render_grade

    lines = [f"glacier-train cv, {summary['date']}", ""]
    lines.append(f"{'fold':>4} {'seed':>4} {'val MCC':>8} {'best epoch':>10} {'epochs':>6} {'minutes':>7} {'MB':>6}")
    for r in summary["members"]:
        lines.append(f"{r['fold']:>4} {r['seed']:>4} {r['val_mcc'] if r['val_mcc'] is not None else float('nan'):>8.4f} "
                     f"{r['best_epoch'] if r['best_epoch'] is not None else '-':>10} {r['epochs_run'] or 0:>6} "
                     f"{(r['seconds'] or 0) / 60:>7.1f} {r.get('size_mb', 0):>6.1f}")
    if summary.get("fold_mcc"):
        lines.append("per-fold MCC (mean over seeds): " + ", ".join(f"{f}: {m:.4f}" for f, m in summary["fold_mcc"].items()))
    if summary["mean_val_mcc"] is not None:
        lines.append(f"mean val MCC {summary['mean_val_mcc']:.4f} +- {summary['std_val_mcc']:.4f}")
    total = sum((r["seconds"] or 0) for r in summary["members"])
    lines.append(f"training time {total / 60:.1f} min in all")
    if summary.get("oof_per_class"):
        lines += ["", f"out-of-fold, pooled over all training tiles: MCC {summary['oof_mcc']:.4f}",
                  f"{'class':<12} {'IoU':>7} {'recall':>7} {'precision':>9} {'MCC 1-vs-rest':>13} {'pixels':>10}"]
        for c in summary["oof_per_class"]:
            lines.append(f"{c['class']:<12} {c['iou']:>7.3f} {c['recall']:>7.3f} {c['precision']:>9.3f} "
                         f"{c['mcc']:>13.3f} {c['support']:>10}")
    lines += ["", "targets (training/reporting/targets.yaml):", render_grade(summary["grade"])]
    return "\n".join(lines) + "\n"


def outcome_line(o: Dict[str, Any]) -> str:
    """How a class the guard warned about ended, on the member's kept weights."""
    state = "recovered by the end" if o["recovered"] else "still not learned at the end"
    return (f"{o['class']}: {state} (final validation recall {o['final_recall']:.3f}, one-vs-rest MCC "
            f"{o['final_mcc']:.3f})")


def render_summary(summary: Dict[str, Any]) -> str:
    names = summary["class_names"]
    head = f"{'fold':>4} {'seed':>4} {'val MCC':>8} {'epoch':>6} {'time s':>7}  " + " ".join(f"{n[:9]:>9}" for n in names)
    lines = [head, "-" * len(head)]
    for r in summary["members"]:
        pc = {c["class"]: c["mcc"] for c in (r["per_class"] or [])}
        lines.append(f"{r['fold']:>4} {r['seed']:>4} {r['val_mcc']:>8.4f} {r['best_epoch']:>6} {r['seconds'] or 0:>7.0f}  "
                     + " ".join(f"{pc.get(n, float('nan')):>9.3f}" for n in names))
    if summary["mean_val_mcc"] is not None:
        lines.append(f"mean val MCC {summary['mean_val_mcc']:.4f} +- {summary['std_val_mcc']:.4f}")
    if summary["oof_mcc"] is not None:
        lines.append(f"out-of-fold MCC over all training tiles {summary['oof_mcc']:.4f}")
    if summary.get("grade"):
        lines.append(f"grade against the targets: {summary['grade']['grade']} (details: training_log.txt)")
    warned = [(r, w) for r in summary["members"] for w in r.get("class_warnings") or []]
    if warned:  # the class guard's warnings, repeated where the user reads the results, with how they ended
        lines.append("classes reported not learned during training:")
        for r, w in warned:
            lines.append(f"  {w}")
            lines.extend(f"    -> {outcome_line(o)}" for o in r.get("class_outcomes") or []
                         if f"class {o['class']} is not being learned" in w)
    failed = summary.get("failed") or []
    if failed:
        lines.append(f"FAILED members ({len(failed)}): no member file written")
        lines.extend(f"  fold {f['fold']} seed {f['seed']} ({f['kind']}): {f['message']}" for f in failed)
    return "\n".join(lines)


