"""Shared helpers for the benchmark scripts."""
from __future__ import annotations

import json
import os
from typing import Any, Dict


def write_result(path: str, result: Dict[str, Any]) -> None:
    """Write a benchmark result as JSON (creating the folder)."""
    if not path:
        return
    from glacier_runtime.atomic import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
