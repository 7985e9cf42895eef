"""``--opt a b c`` as ``--opt a --opt b --opt c`` for both CLIs (standard library only)."""
from __future__ import annotations

from typing import List, Sequence


def expand_multi(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """Let ``--opt a b c`` mean ``--opt a --opt b --opt c`` for the options in ``names``,
    so ``--seeds 0 1 2`` and a shell-expanded ``--models weights/*`` both work."""
    out: List[str] = []
    current = None
    for a in argv:
        if a in names:
            current = a
            out.append(a)
            continue
        if current and not a.startswith("-") and out and out[-1] != current:
            out += [current, a]
            continue
        if a.startswith("-"):
            current = None
        out.append(a)
    return out
