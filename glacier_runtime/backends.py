"""Execution backends: a runner maps a normalised (N, C, H, W) float32 tensor to logits.

* ``TorchRunner``: pure-torch model; BatchNorm folded into the preceding convolution,
  channels_last memory format on the CPU, fp16 autocast on CUDA.
* ``OnnxRunner``: onnxruntime session from the exported graph (CUDA provider when
  available, CPU otherwise). Imported only on this path.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger("glacier.runtime")

_worker = threading.local()


def set_worker_threads(n: int) -> None:
    """Make the calling thread run its forward passes with ``n`` intra-op threads (torch and
    onnxruntime). Used by the predictor's work-item pool: two work items with one thread
    each beat one item with two threads on small CPUs (benchmarks/inference_speed.py)."""
    _worker.threads = max(1, int(n))
    torch.set_num_threads(_worker.threads)


def worker_threads() -> int:
    """Intra-op threads of the calling thread (0: the backend's default)."""
    return int(getattr(_worker, "threads", 0))


def cpu_cores() -> int:
    """Cores this process may use (affinity-aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def pick_device(device: Optional[str] = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the convolution before it (convN/bnN pairs and
    Sequential(conv, bn, ...)); the output is unchanged up to float rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (na, a), (nb, b) in zip(children, children[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    module._modules[na] = fuse_conv_bn_eval(a, b)
                    module._modules[nb] = nn.Identity()
        for i in range(1, 4):
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{i}", nn.Identity())
    return model


class TorchRunner:
    """A torch model ready to run: eval mode, batch norm folded into the convolutions (unless
    ``fold_bn`` is off), channels-last on the CPU, fp16 autocast on CUDA. ``adaptable`` keeps
    an unfolded copy so :meth:`adapt_bn` can re-estimate the batch-norm statistics."""

    def __init__(self, model: nn.Module, device: Optional[str] = None, fold_bn: bool = True,
                 channels_last: Optional[bool] = None, fp16: Optional[bool] = None, adaptable: bool = False):
        self.device = pick_device(device)
        self.fold_bn = fold_bn
        self.channels_last = (self.device.type == "cpu") if channels_last is None else channels_last
        self.fp16 = (self.device.type == "cuda") if fp16 is None else fp16
        model = model.eval()
        self.source = copy.deepcopy(model) if (adaptable and fold_bn) else None
        self.model = self._prepare(model)

    def _prepare(self, model: nn.Module) -> nn.Module:
        if self.fold_bn:
            model = fold_batchnorm(model)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    @property
    def can_adapt(self) -> bool:
        """Whether batch norm is there to adapt (not folded away without an unfolded copy)."""
        from .adapt import batchnorm_layers

        return bool(batchnorm_layers(self.source if self.source is not None else self.model))

    def adapt_bn(self, inputs) -> int:
        """Batch-norm statistics re-estimated on ``inputs`` ((1, C, H, W) normalised tensors),
        see glacier_runtime/adapt.py; returns the inputs used (0 when the model has no batch
        norm left to adapt: folded without an unfolded copy)."""
        from .adapt import adapt_batchnorm

        target = self.source if self.source is not None else self.model
        target = target.to(self.device)
        n = adapt_batchnorm(target, (x.to(self.device) for x in inputs))
        if self.source is not None:
            if n:
                self.model = self._prepare(copy.deepcopy(self.source))
            self.source = self.source.cpu()  # the unfolded copy waits on the CPU, not in GPU memory
        return n

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fp16 and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                y = self.model(x)
        else:
            y = self.model(x)
        return y.float()


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


class OnnxRunner:
    """onnxruntime session(s) for one exported graph.

    On the CPU a worker thread that called ``set_worker_threads(n)`` gets its own n-thread
    session (made once, then reused), so sessions never fight over one intra-op pool. On
    CUDA there is one session on the asked GPU (``device_id``), and ``device`` says CUDA, so
    the predictor batches views and runs one work item at a time as it does for torch; a
    session that silently fell back to the CPU provider is reported and scheduled as the
    CPU."""

    def __init__(self, model_bytes: bytes, device: Optional[str] = None, threads: int = 0):
        import onnxruntime as ort

        dev = pick_device(device)
        available = ort.get_available_providers()
        self.providers: list = ["CPUExecutionProvider"]
        if dev.type == "cuda":
            if "CUDAExecutionProvider" in available:
                self.providers = [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
            else:
                log.warning("onnxruntime has no CUDA provider here (available: %s): the ONNX graph runs on the CPU. "
                            "Install onnxruntime-gpu (the export-gpu extra) instead of onnxruntime", available)
        self._blob, self._threads = model_bytes, int(threads)
        self._sessions: Dict[int, object] = {}
        self._lock = threading.Lock()
        self.session = self._session(self._threads)
        self.input_name = self.session.get_inputs()[0].name
        self.input_type = self.session.get_inputs()[0].type
        self.device = torch.device("cpu")
        if dev.type == "cuda" and len(self.providers) > 1:
            used = list(self.session.get_providers())
            if "CUDAExecutionProvider" in used:
                self.device = torch.device("cuda", dev.index or 0)
            else:
                log.warning("onnxruntime was asked for CUDA but the session runs on %s (a CUDA/cuDNN library "
                            "could not be loaded?): scheduled as the CPU", used)

    def _session(self, threads: int):
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                if threads:
                    opts.intra_op_num_threads = threads
                if threads == 1:  # a pool worker: no spinning threads to steal the other worker's core
                    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._sessions[threads] = ort.InferenceSession(self._blob, sess_options=opts, providers=self.providers)
            return self._sessions[threads]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy()
        arr = np.ascontiguousarray(arr, dtype=np.float16 if "float16" in self.input_type else np.float32)
        wt = worker_threads()
        on_gpu = self.device.type == "cuda"
        session = self.session if on_gpu or not wt or wt == self._threads else self._session(wt)
        out = session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
