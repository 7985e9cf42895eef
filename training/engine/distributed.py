"""DDP helpers: launched by torchrun (NCCL on CUDA, gloo on CPU); only rank 0 writes."""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision (e.g. early stop) for every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, 0)
        return bool(t.item())


#: How long a collective may wait for a peer before it fails (seconds; GLACIER_DDP_TIMEOUT_S).
#: A rank that fails exits at once (``abort``), so torchrun ends its peers; the timeout is the
#: backstop for a rank that hangs without failing.
DEFAULT_TIMEOUT_S = 900


class DeviceError(ValueError):
    """``--device cuda`` where torch sees no GPU."""


def check_device(device: str) -> None:
    """``--device cuda`` needs a GPU torch can see; checked before any process starts."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda, but torch sees no GPU here (torch.cuda.is_available() is False; "
                          f"torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
                          "Check the accelerator (nvidia-smi) or use --device auto / cpu.")


def init_distributed(device: str = "auto") -> DistContext:
    """Initialise from torchrun's environment; a plain process gets a single-rank context.
    ``--device cuda`` without a visible GPU is an error (never a silent CPU run)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_device(device)
    want_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if world <= 1:
        dev = torch.device("cuda" if want_cuda else "cpu") if device == "auto" else torch.device(device)
        return DistContext(device=dev)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = float(os.environ.get("GLACIER_DDP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return DistContext(rank=rank, world=world, local_rank=local, device=dev)


def cleanup(ctx: DistContext) -> None:
    """The normal end of a DDP run: every rank got here, so the group can be torn down."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def abort(ctx: DistContext, message: str, code: int = 1) -> None:
    """A rank that fails under DDP: say why, then leave at once. Tearing the process group
    down here would wait for the peers, which wait in a collective for this rank (a known
    NCCL deadlock); torchrun sees the exit and stops the other ranks."""
    sys.stderr.write(f"[rank {ctx.rank}] {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def unused_parameters(model: torch.nn.Module, in_channels: int, size: int = 32) -> List[str]:
    """Names of the trainable parameters that get no gradient from a forward/backward pass.

    smp's U-Net never runs the attention of its last decoder block (that block has no skip
    connection), so with ``decoder_attention_type: scse`` six parameters never get a
    gradient and DDP, waiting for them, fails on the second step ("Expected to have
    finished reduction in the prior iteration"). The probe runs in eval mode on a zero
    input on the model's device, so no BatchNorm statistic and no random state moves."""
    was_training = model.training
    device = next(model.parameters()).device
    if device.type == "meta":  # no data to run (tests that only check where tensors land)
        return []
    model.eval()
    try:
        model.zero_grad(set_to_none=True)
        out = model(torch.zeros(1, in_channels, size, size, device=device))
        out.float().sum().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return unused


def freeze(model: torch.nn.Module, names: List[str]) -> None:
    """Stop training ``names`` (AdamW skips parameters without a gradient anyway: frozen,
    they train exactly as before in one process, and DDP no longer waits for them)."""
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(False)


@contextlib.contextmanager
def ranks_end_together(ctx: DistContext):
    """Around a DDP rank's work: on success the process group is torn down as usual; on any
    exception (Ctrl-C included) the rank :func:`abort` s with the message (and the traceback
    of an unexpected error) instead of waiting in ``destroy_process_group``."""
    try:
        yield
    except BaseException as exc:
        if ctx.enabled:
            from training.runs.run import CvError

            known = isinstance(exc, (CvError, KeyboardInterrupt))
            text = str(exc) if known else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            abort(ctx, text or type(exc).__name__, 130 if isinstance(exc, KeyboardInterrupt) else 1)
        raise
    cleanup(ctx)
