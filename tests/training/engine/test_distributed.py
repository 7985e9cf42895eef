"""DDP helpers: a plain process gets a single-rank context (rank 0 writes, barriers and
broadcasts are no-ops); under two gloo ranks every rank gets rank 0's flag."""
import torch

from training.engine.distributed import DistContext, cleanup, init_distributed


def test_plain_process_is_a_single_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.device) == (0, 1, 0, torch.device("cpu"))
    assert ctx.is_main and not ctx.enabled
    assert ctx.broadcast_flag(True) is True and ctx.broadcast_flag(False) is False
    ctx.barrier()  # no process group: nothing to wait for
    cleanup(ctx)
    auto = init_distributed("auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu").world == 1


def test_only_rank_zero_is_main():
    assert DistContext(rank=0, world=2).is_main and DistContext(rank=0, world=2).enabled
    assert not DistContext(rank=1, world=2).is_main


def _rank(rank, world, store, flags, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world=world)
    got = ctx.broadcast_flag(flags[rank])
    ctx.barrier()
    torch.save({"got": got}, f"{out}.{rank}")
    cleanup(ctx)


def test_broadcast_flag_gives_every_rank_rank_zeros_decision(tmp_path):
    import torch.multiprocessing as mp

    flags = (False, True)
    out = str(tmp_path / "flag")
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), flags, out), nprocs=2, join=True, start_method="spawn")
    assert [torch.load(f"{out}.{r}", weights_only=True)["got"] for r in range(2)] == [flags[0], flags[0]]
