"""The per-epoch CSV log of a member (``OUT/logs/fold{k}_seed{s}.csv``)."""
from __future__ import annotations

import csv
import io
from typing import Any, Dict, List

from glacier_runtime.atomic import atomic_write_bytes


def write_csv(path: str, history: List[Dict[str, Any]]) -> None:
    if not history:
        return
    cols = list(dict.fromkeys(k for h in history for k, v in h.items() if not isinstance(v, (list, dict))))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow(h)
    atomic_write_bytes(path, buf.getvalue().encode())
