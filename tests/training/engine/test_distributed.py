"""DDP helpers: a plain process gets a single-rank context (rank 0 writes, barriers and
broadcasts are no-ops); under two gloo ranks every rank gets rank 0's flag."""
import torch

from training.engine.distributed import DistContext, cleanup, init_distributed
import os
import signal
import subprocess
import sys
import textwrap
import time
import pytest
from tests.helpers import LAST_BLOCK_ATTENTION, SCSE, kaggle_cv_cmd, kaggle_trainer, repo_env


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


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_unused_parameters_are_frozen_and_training_is_unchanged(synth_data, tmp_path, monkeypatch):
    """With scse the probe finds exactly the last decoder block's attention (named by hand
    above) and freezes it; the member then equals one trained with nothing frozen (AdamW
    never updates a parameter without a gradient): the probe moves no BatchNorm statistic
    and no random state. Without attention nothing is frozen."""
    import training.engine.trainer as trainer_mod

    a = kaggle_trainer(synth_data, tmp_path / "a", **SCSE, **{"train.epochs": 1})
    ra = a.fit()
    assert sorted(a.unused) == sorted(LAST_BLOCK_ATTENTION)
    assert sorted(n for n, p in a.model.named_parameters() if not p.requires_grad) == sorted(LAST_BLOCK_ATTENTION)
    monkeypatch.setattr(trainer_mod, "unused_parameters", lambda model, bands: [])
    b = kaggle_trainer(synth_data, tmp_path / "b", **SCSE, **{"train.epochs": 1})
    rb = b.fit()
    assert b.unused == [] and ra["val_mcc"] == rb["val_mcc"]
    sa = torch.load(ra["path"], weights_only=True)["state_dict"]
    sb = torch.load(rb["path"], weights_only=True)["state_dict"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    monkeypatch.undo()
    plain = kaggle_trainer(synth_data, tmp_path / "plain")
    plain.setup_data()
    plain.setup_model()
    assert plain.unused == [] and all(p.requires_grad for p in plain.model.parameters())


_FAILING_RANK = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    def destroy_process_group(*a, **kw):  # NCCL's known deadlock: teardown waits for the peer in its collective
        time.sleep(3600)
    dist.destroy_process_group = destroy_process_group
    from training.engine import trainer
    real = trainer.Trainer.train_step
    def train_step(self, *a, **kw):
        if self.ctx.rank == 1:
            raise RuntimeError("rank 1 broke on purpose (test)")
        return real(self, *a, **kw)
    trainer.Trainer.train_step = train_step
    from training.cli import main
    main(sys.argv[1:])
""")


def test_a_failing_rank_ends_the_run_quickly_with_its_message(synth_data, folds_file, tmp_path):
    """Rank 1 raises in its first step while rank 0 waits in the all-reduce: the run must end
    (not hang for the collective's timeout) and say what failed. The script makes
    ``destroy_process_group`` hang as NCCL's does when a peer sits in a collective (gloo's
    returns), so a failing rank that tears the group down instead of leaving hangs here."""
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    out = str(tmp_path / "w")
    args = kaggle_cv_cmd(synth_data, folds_file, out, "--fold", "0")[3:]  # the glacier-train arguments
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    env = dict(repo_env(), GLACIER_DDP_TIMEOUT_S="600")
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        from training.engine.launch import descendants

        for pid in [*descendants(proc.pid), proc.pid]:  # leave no rank behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.communicate()
        pytest.fail("the run hung after rank 1 failed")
    assert proc.returncode != 0
    assert "rank 1 broke on purpose" in err, err[-3000:]
    assert time.time() - t0 < 240  # far below the collective's 600 s timeout
    assert not os.path.exists(os.path.join(out, "fold0_seed0.pt"))
