"""Which finished members in ``--out`` belong to this run: the same fold tiles and the same
config (settings that change only speed aside). Others stop the run with each difference
named, or go with ``--force-retrain``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from training.rundir import RunDir
from training.config import config_differences
from training.runs.run import CvError, Echo

def _tile_difference(what: str, had: Sequence[str], want: Sequence[str]) -> Optional[str]:
    if list(had) == list(want):
        return None
    extra, missing = sorted(set(had) - set(want)), sorted(set(want) - set(had))
    if not extra and not missing:
        return f"{what} tiles are the same set in another order"
    return (f"{what} tiles differ: the member has {extra[:6]}{' ...' if len(extra) > 6 else ''} that this run's "
            f"fold does not, and lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def stale_members(out: str, folds: Dict[str, Any], folds_path: str, config: Dict[str, Any],
                  ) -> Dict[Tuple[int, int], List[str]]:
    """Every ``fold{k}_seed{s}.pt`` in ``out`` that does not belong to this run, with the
    reasons: a fold the folds file lacks, other training/validation tiles, another config,
    an unreadable file."""
    from training.engine.checkpoint import load_checkpoint

    by_fold = {f["fold"]: f for f in folds["folds"]}
    problems: Dict[Tuple[int, int], List[str]] = {}
    for fold, seed, path in RunDir(out).members():
        try:
            ck = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001
            problems[(fold, seed)] = [f"unreadable ({exc})"]
            continue
        reasons = []
        if fold not in by_fold:
            reasons.append(f"fold {fold} is not in {folds_path} (folds {sorted(by_fold)})")
        else:
            for what, key in (("training", "train"), ("validation", "val")):
                d = _tile_difference(what, ck.get(f"{key}_tiles", []), by_fold[fold][key])
                if d:
                    reasons.append(d)
        reasons += config_differences(ck.get("config") or {}, config)
        if reasons:
            problems[(fold, seed)] = reasons
    return problems


def resolve_members(out: str, folds: Dict[str, Any], folds_path: str, config: Dict[str, Any],
                    force: bool, echo: Echo, delete: bool = True) -> None:
    """Stop (or with ``force`` remove) every finished member that does not belong to this
    run; the message names each difference."""
    problems = stale_members(out, folds, folds_path, config)
    if not problems:
        return
    lines = []
    for (fold, seed), reasons in sorted(problems.items()):
        lines.append(f"  {RunDir(out).member(fold, seed)}:")
        lines += [f"    - {r}" for r in reasons]
    if not force:
        raise CvError(f"{out} holds members that do not belong to this run:\n" + "\n".join(lines)
                      + "\nRe-run with --force-retrain to replace them, or use another --out "
                        "(reusing them would mix folds or settings into the OOF score and the ensemble).")
    if delete:
        echo("--force-retrain: removing members that do not belong to this run:\n" + "\n".join(lines))
        for fold, seed in problems:
            RunDir(out).remove_member(fold, seed)
