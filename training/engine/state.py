"""Restoring a training run's state onto the device the run uses.

A checkpoint is always written from CPU copies and read with ``map_location="cpu"``
(so a run can move between machines); :func:`restore_state` then puts every piece of it
(model weights, optimizer moments, gradient-scaler settings, EMA weights, scheduler
state) on the run's device, so no later step mixes CPU and GPU tensors. Random-number
state is not stored: every epoch reseeds itself from ``(seed, epoch)``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside dicts, lists and tuples moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def cpu_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict (what checkpoints store)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def restore_state(ck: Dict[str, Any], device: torch.device, model: torch.nn.Module,
                  optimizer: Optional[torch.optim.Optimizer] = None, scaler: Any = None, ema: Any = None,
                  plateau: Any = None) -> None:
    """Load a ``last.pt``-style checkpoint into live objects, everything on ``device``.

    The model's parameters must already live on ``device``. Optimizer moments follow
    their parameters (``Optimizer.load_state_dict`` casts them); the optimizer's
    per-parameter ``step`` counters stay CPU scalars, as torch keeps them for
    non-capturable optimizers. EMA weights are moved explicitly: they are plain tensors
    that ``EMA.update`` adds the live weights into.
    """
    device = torch.device(device)
    model.load_state_dict(ck["state_dict"])
    if optimizer is not None and ck.get("optimizer"):
        optimizer.load_state_dict(ck["optimizer"])
        for param, st in optimizer.state.items():
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(param.device)
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    if ema is not None and ck.get("ema"):
        ema.state = {k: v.to(device) for k, v in ck["ema"].items()}
        ema.steps = int(ck.get("ema_steps", 0))
    if plateau is not None and ck.get("plateau"):
        plateau.load_state_dict(ck["plateau"])
