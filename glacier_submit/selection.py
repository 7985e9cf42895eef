"""Which members go into a bundle, and why the others do not.

The rule (``glacier-submit build``): members are considered strongest first by validation
MCC, the strongest member of every fold before any second member of a fold, and each is
kept while the bundle stays under the size budget and ``--max-members``. This is a greedy
rule, not an optimal packing; members of one run have the same size, and then it keeps
the most members the budget allows, with every fold represented whenever one member per
fold fits. Every member gets a table row with the reason it was kept or dropped.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

#: The platform states its limit as "300 MB"; read as 10^6 bytes it can never be exceeded (300 MiB
#: would be 314.6 million bytes): every size the build checks and prints is in this unit.
MB = 1_000_000
MB_UNIT = "MB (10^6 bytes)"
#: How members are chosen under the size budget, as the manifest records it.
SELECTION_DOC = ("strongest by validation MCC, each fold's strongest first, kept while the upload fits "
                 "--max-mb and --max-members (greedy); fp16 first when fp32 does not fit")


def _rank_key(row: Dict[str, Any]):
    mcc = row.get("val_mcc")
    return (-(mcc if mcc is not None else -1.0), row["name"])


def selection_order(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows in the order they are considered: each fold's strongest, then the rest, by MCC."""
    ranked = sorted(rows, key=_rank_key)
    firsts, rest, seen = [], [], set()
    for r in ranked:
        (rest if r["fold"] in seen else firsts).append(r)
        seen.add(r["fold"])
    return firsts + rest


def select_members(rows: Sequence[Dict[str, Any]], budget_bytes: int, base_bytes: int,
                   max_members: Optional[int] = None) -> List[Dict[str, Any]]:
    """Mark each row (``name, fold, seed, val_mcc, bytes``) kept or dropped, with a reason.

    ``bytes`` is the member's share of the stored bundle, ``base_bytes`` what the bundle
    costs without members. Returns new rows in the order they were considered.
    """
    out: List[Dict[str, Any]] = []
    total, n_kept, covered = base_bytes, 0, set()
    for r in selection_order(rows):
        row = dict(r)
        if max_members is not None and n_kept >= max_members:
            row.update(kept=False, reason=f"--max-members {max_members} reached")
        elif total + r["bytes"] > budget_bytes:
            row.update(kept=False, reason=f"size budget: would make {(total + r['bytes']) / MB:.1f} MB "
                                          f"> {budget_bytes / MB:.1f} MB")
        else:
            total += r["bytes"]
            n_kept += 1
            row.update(kept=True, reason=f"strongest of fold {r['fold']}" if r["fold"] not in covered
                       else "next strongest that fits")
            covered.add(r["fold"])
        out.append(row)
    return out


def drop_weakest(table: List[Dict[str, Any]], keep: int, reason: str) -> List[str]:
    """Drop kept rows from the end of the choice order until ``keep`` remain; their names."""
    kept = [r for r in table if r["kept"]]
    dropped = []
    for r in reversed(kept[max(keep, 0):]):
        r.update(kept=False, reason=reason)
        dropped.append(r["name"])
    return dropped


def folds_missing(table: Sequence[Dict[str, Any]]) -> List[int]:
    """Folds that have members but none kept."""
    kept = {r["fold"] for r in table if r["kept"]}
    return sorted({r["fold"] for r in table} - kept)


def render_table(table: Sequence[Dict[str, Any]]) -> str:
    """The member table the build prints: kept first, then dropped, each with its reason."""
    lines = [f"{'member':<20} {'fold':>4} {'seed':>4} {'val MCC':>8} {'MB':>7}  {'kept':<4}  why"]
    for r in sorted(table, key=lambda r: not r["kept"]):
        mcc = r["val_mcc"] if r["val_mcc"] is not None else float("nan")
        lines.append(f"{r['name']:<20} {r['fold']:>4} {r['seed']:>4} {mcc:>8.4f} {r['bytes'] / MB:>7.1f}  "
                     f"{'yes' if r['kept'] else 'no':<4}  {r['reason']}")
    return "\n".join(lines)
