"""DDP helpers: launched by torchrun (NCCL on CUDA, gloo on CPU); only rank 0 writes."""
from __future__ import annotations

import os
from dataclasses import dataclass

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


def init_distributed(device: str = "auto") -> DistContext:
    """Initialise from torchrun's environment; a plain process gets a single-rank context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, local_rank=local, device=dev)


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
