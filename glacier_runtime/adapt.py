"""Test-time adaptation: each member's batch-norm statistics re-estimated on the test tiles
(``build --adapt bn``). The platform hands the solution every tile at once, so the
statistics of the region being scored can replace the training region's.

Rule: one forward pass per input (a normalised tile or window) with batch norm in training
mode (each input normalised with its own statistics, as a training batch is); each batch-norm
layer's input is pooled over every pixel of every input, and its running mean and variance
become that pool's mean and (unbiased) variance, so the spread between tiles counts as it
does between the patches of a training batch. Learnt scales and shifts and every other weight
stay. A failure part-way, or no input, leaves the trained statistics. Standard library, numpy
and torch only: this ships in the bundle.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn as nn


def batchnorm_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Pool:
    """Per-channel sums of a layer's input over every pixel of every input (float64)."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, None, None

    def __call__(self, module, inputs) -> None:
        x = inputs[0].detach().double()
        dims = [0] + list(range(2, x.dim()))
        s, s2 = x.sum(dims), (x * x).sum(dims)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.numel() // x.shape[1]

    def stats(self):
        mean = self.s / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0.0) * (self.n / max(self.n - 1, 1))
        return mean, var


def adapt_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Re-estimate ``model``'s batch-norm statistics on ``inputs`` ((1, C, H, W) tensors on
    the model's device); returns how many inputs were used (0: statistics unchanged)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers}
    pools: Dict[int, _Pool] = {id(m): _Pool() for m in layers}
    hooks = [m.register_forward_pre_hook(pools[id(m)]) for m in layers]
    model.eval()
    for m in layers:
        m.train()
    n, ok = 0, False
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
                n += 1
        ok = True
    finally:
        for h in hooks:
            h.remove()
        for m in layers:
            mean, var, count = saved[id(m)]
            pool = pools[id(m)]
            if ok and n and pool.n:
                pm, pv = pool.stats()
                m.running_mean.copy_(pm.to(m.running_mean.dtype))
                m.running_var.copy_(pv.to(m.running_var.dtype))
                m.num_batches_tracked.copy_(count + n)
            else:  # nothing seen, or a failure part-way: the trained statistics stay
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        model.eval()
    return n
