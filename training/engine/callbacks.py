"""Hooks into the training loop: :class:`Callback` objects passed to the trainer (or to
``run_cv``) are called after every epoch's checkpoint, on every rank. A callback keeps its
own state; raising from it ends the run as that exception would (the last checkpoint is
kept, so the member resumes)."""
from __future__ import annotations

from typing import Any, Dict


class Callback:
    """Override what you need; every hook does nothing by default."""

    def on_epoch_end(self, trainer: Any, epoch: int, row: Dict[str, Any]) -> None:
        """After epoch ``epoch`` was validated and checkpointed (``row``: its history row)."""
