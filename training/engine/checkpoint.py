"""Self-describing checkpoints, written atomically (temp file + rename).

A member checkpoint carries everything needed to use it without its config: format,
architecture spec, state dict, sensor and band names, normalisation statistics (from the
fold's training tiles only), class map, fold, seed, training and validation tile ids,
metric history, best validation MCC, config and code version.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

FORMAT = "glacier-checkpoint/1"
REQUIRED = ("format", "spec", "state_dict", "bands", "stats", "class_map", "fold", "seed", "train_tiles")


def code_version() -> str:
    from glacier_runtime import __version__

    try:
        import subprocess

        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    """``torch.save`` through the one atomic writer (fsync + rename)."""
    from glacier_runtime.atomic import atomic_write_with
    from glacier_runtime.safeload import plain

    safe = plain(obj, f"checkpoint {path}")  # refuses anything torch.load(weights_only=True) would refuse
    atomic_write_with(path, lambda tmp: torch.save(safe, tmp))


class CheckpointError(ValueError):
    pass


def load_state(path: str, what: str = "checkpoint", fix: str = "re-run training to rewrite it") -> Any:
    """``torch.load(weights_only=True)``, never a full unpickle: a file holding anything but
    tensors and plain types is refused with a :class:`CheckpointError` naming it."""
    from glacier_runtime.safeload import UnsafeFileError, safe_load

    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} not found")
    try:
        return safe_load(path, what, fix)
    except UnsafeFileError as exc:
        raise CheckpointError(str(exc)) from None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load and check a member checkpoint (weights only); errors name the file and what is wrong."""
    ck = load_state(path, "checkpoint", "re-run training (`glacier-train cv`) to rewrite it")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a glacier member checkpoint (format {ck.get('format') if isinstance(ck, dict) else type(ck)}); "
            "use the fold{k}_seed{s}.pt files written by `glacier-train cv`")
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; re-run training to rewrite it")
    return ck
