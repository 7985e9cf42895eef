"""Grade a run against the targets users work to (``training/reporting/targets.yaml``).

A grade is the highest level (pass < good < excellent) whose criteria, and every lower
level's, are all met; below pass the grade is ``below pass``. Every criterion is reported
with its value, so the user sees what is missing, not only the verdict. Light module:
numpy and yaml only, so ``evaluate`` can grade without the training stack.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

LEVELS = ("pass", "good", "excellent")
DEFAULT_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.yaml")
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}


class TargetsError(ValueError):
    """A targets file that cannot be used (names the file, the key and the fix)."""


def _parse_rule(rule: Any, where: str) -> tuple:
    text = str(rule).strip()
    for sym in (">=", "<=", "==", ">", "<"):
        if text.startswith(sym):
            try:
                return sym, float(text[len(sym):])
            except ValueError:
                break
    raise TargetsError(f"{where}: cannot read rule {rule!r}; write it like \">= 0.80\" "
                       f"(one of {', '.join(_OPS)} followed by a number)")


def load_targets(path: Optional[str] = None) -> Dict[str, Dict[str, Dict[str, tuple]]]:
    """Read the targets file: ``{kind: {level: {criterion: (op, threshold)}}}``."""
    import yaml

    path = path or DEFAULT_TARGETS
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise TargetsError(f"{path}: cannot read the targets file ({exc.strerror})") from exc
    if not isinstance(raw, dict):
        raise TargetsError(f"{path}: expected a mapping of run kinds (pretrain, cv, evaluate)")
    out: Dict[str, Dict[str, Dict[str, tuple]]] = {}
    for kind, levels in raw.items():
        if not isinstance(levels, dict):
            raise TargetsError(f"{path}: '{kind}' must map levels ({', '.join(LEVELS)}) to criteria")
        out[kind] = {}
        for level, crit in levels.items():
            if level not in LEVELS:
                raise TargetsError(f"{path}: '{kind}.{level}' is not a level; use {', '.join(LEVELS)}")
            if not isinstance(crit, dict):
                raise TargetsError(f"{path}: '{kind}.{level}' must map criterion names to rules")
            out[kind][level] = {name: _parse_rule(rule, f"{path}: '{kind}.{level}.{name}'")
                                for name, rule in crit.items()}
    return out


def smooth_convergence(losses: Sequence[float], tolerance: float = 0.10) -> Optional[bool]:
    """Smooth = every loss finite, and no epoch-to-epoch rise larger than ``tolerance``
    times the first epoch's loss. ``None`` with fewer than two epochs."""
    vals = [float(v) for v in losses]
    if len(vals) < 2:
        return None
    if not all(math.isfinite(v) for v in vals):
        return False
    rises = [b - a for a, b in zip(vals, vals[1:])]
    return max(rises) <= tolerance * abs(vals[0])


def class_facts(per_class: Sequence[Mapping[str, Any]], present_only: bool = True) -> Dict[str, float]:
    """Facts derived from per-class scores: mean/min IoU and recall, lake IoU and recall.

    Classes absent from the labels (support 0) are left out of means and minima, and a
    lake criterion on data without lakes is not available (``nan``).
    """
    rows = [r for r in per_class if not present_only or r.get("support", 1) > 0]
    facts: Dict[str, float] = {}
    ious = [float(r["iou"]) for r in rows if _finite(r.get("iou"))]
    recalls = [float(r["recall"]) for r in rows if _finite(r.get("recall"))]
    facts["mean_iou"] = float(np.mean(ious)) if ious else float("nan")
    facts["min_class_iou"] = float(min(ious)) if ious else float("nan")
    facts["min_class_recall"] = float(min(recalls)) if recalls else float("nan")
    lake = [r for r in rows if str(r.get("class", "")).lower() == "lake"]
    facts["lake_iou"] = float(lake[0]["iou"]) if lake and _finite(lake[0].get("iou")) else float("nan")
    facts["lake_recall"] = float(lake[0]["recall"]) if lake and _finite(lake[0].get("recall")) else float("nan")
    return facts


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def grade(kind: str, facts: Mapping[str, Any], targets: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Grade ``facts`` (criterion name -> value) against ``targets[kind]``.

    Returns ``{"grade": str, "criteria": [{level, name, value, rule, met}]}``; ``met`` is
    ``None`` where the value is not available (shown as n/a, does not block a level).
    """
    targets = targets if targets is not None else load_targets()
    if kind not in targets:
        raise TargetsError(f"no targets for '{kind}' (have {', '.join(targets) or 'none'})")
    crit: List[Dict[str, Any]] = []
    reached = "below pass"
    blocked = False
    for level in LEVELS:
        level_ok = True
        for name, (sym, thr) in targets[kind].get(level, {}).items():
            value = facts.get(name)
            if isinstance(value, bool):
                value = float(value)
            met: Optional[bool] = None if not _finite(value) else bool(_OPS[sym](float(value), thr))
            crit.append({"level": level, "name": name, "value": None if met is None else float(value),
                         "rule": f"{sym} {thr:g}", "met": met})
            if met is False:
                level_ok = False
        if level_ok and not blocked:
            reached = level
        else:
            blocked = True
    return {"grade": reached, "criteria": crit}


def render_grade(g: Mapping[str, Any]) -> str:
    """Plain-text table: one line per criterion, met / NOT met / n/a, then the grade."""
    lines = [f"{'level':<10} {'criterion':<20} {'value':>9}  {'target':<9} status"]
    for c in g["criteria"]:
        val = "n/a" if c["value"] is None else f"{c['value']:.4f}"
        status = "n/a" if c["met"] is None else ("met" if c["met"] else "NOT met")
        lines.append(f"{c['level']:<10} {c['name']:<20} {val:>9}  {c['rule']:<9} {status}")
    lines.append(f"grade: {g['grade']}")
    return "\n".join(lines)
