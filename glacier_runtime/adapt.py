"""Test-time adaptation: each member's batch-norm statistics re-estimated on the test tiles
(``build --adapt bn``). The platform hands the solution every tile at once, so the
statistics of the region being scored can replace the training region's.

Rule: every BatchNorm layer's running mean and variance are reset and re-accumulated as a
cumulative average (momentum None) over one forward pass per input (a normalised tile or
window): running_mean = the mean over inputs of each input's per-channel mean, running_var
= the mean of each input's unbiased per-channel variance. Learnt scales and shifts and
every other weight stay. Standard library, numpy and torch only: this ships in the bundle.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def batchnorm_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Re-estimate ``model``'s batch-norm statistics on ``inputs`` ((1, C, H, W) tensors on
    the model's device); returns how many inputs were used (0: statistics unchanged)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the inputs
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
        for m in layers:
            mean, var, count, momentum = saved[id(m)]
            if n == 0 or not ok:  # nothing seen, or a failure part-way: the trained statistics stay
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
            m.momentum = momentum
        model.eval()
    return n
