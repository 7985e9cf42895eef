"""The trainer's steps: restore onto the run's device, DDP shards and updates, checkpoint kinds;
the guards wired in (non-finite steps skipped and counted or stopping a member, weights with
NaN/inf never written, out of memory: the message, auto_batch halving the micro-batch and
redoing the step, validation shrinking its window; a class not learned); crafted resume and
best-epoch checkpoints refused. In-process, tiny model, 64x64 synthetic tiles: seconds per test."""
import csv
import logging
import math
import os
import subprocess

import pytest
import torch

from training.config import load_config
from training.engine.checkpoint import load_checkpoint
from training.engine.guards import MemberDiverged, MemberOutOfMemory, nonfinite_tensors

from tests.helpers import (QUICK, ROOT, TINY, InterruptAfter, craft, cv_cmd_any_fold, kaggle_dataset, kaggle_trainer,
                           make_trainer, repo_env)


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
def test_restore_puts_every_tensor_on_the_target_device(synth_data, tmp_path):
    """A cut run (EMA + plateau scheduler on) restored onto another device: the model,
    optimizer moments and EMA weights all land there (the old code left EMA on the CPU,
    so the first EMA.update on a GPU mixed devices)."""
    t = make_trainer(synth_data, tmp_path, callbacks=[InterruptAfter(0)], **{"train.ema": 0.9, "train.scheduler": "plateau"})
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert os.path.exists(t.last_path)
    ck = torch.load(t.last_path, map_location="cpu", weights_only=True)  # plain types only
    assert ck["kind"] == "member" and ck["optimizer"]["state"] and ck["ema"]

    r = make_trainer(synth_data, tmp_path, device="meta", **{"train.ema": 0.9, "train.scheduler": "plateau"})
    r.setup_data()
    r.setup_model()
    assert r.restore() == 1
    meta = torch.device("meta")
    for k, v in r.model.state_dict().items():
        assert v.device == meta, k
    assert r.ema is not None and r.ema.state
    for k, v in r.ema.state.items():
        assert v.device == meta, ("ema", k)
    n = 0
    for p, st in r.opt.state.items():
        assert p.device == meta
        for k, v in st.items():
            if k == "step":  # torch keeps the step counter a CPU scalar for non-capturable AdamW
                assert v.dim() == 0
                continue
            assert v.device == meta, ("optimizer", k)
            n += 1
    assert n == 2 * len(list(r.model.parameters()))  # exp_avg and exp_avg_sq for every parameter
    assert r.plateau is not None and r.plateau.state_dict()["last_epoch"] == ck["plateau"]["last_epoch"]
    assert r.history == ck["history"]


@pytest.mark.parametrize("n,world", [(7, 2), (8, 2), (5, 3), (1, 2), (0, 2)])
def test_shards_are_equal_and_cover_everything(n, world):
    from training.engine.trainer import shard

    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equal batch counts on every rank
    assert set().union(*map(set, parts)) == set(items)
    assert sum(map(len, parts)) - n < world


class _Tiny(torch.nn.Module):
    """BN-free: DDP's averaged gradient equals the whole batch's exactly."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(5, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Classes:
    class_names = ("background", "glacier", "debris", "lake")


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 5, 16, 16, generator=g), torch.randint(0, 4, (8, 16, 16), generator=g)


def _step_trainer(ctx, accumulate):
    from training.engine.trainer import Trainer

    cfg = load_config(QUICK, {"loss.focal": 1.0, "loss.dice": 0.0, "loss.mcc": 0.0, "loss.boundary": 0.0,
                              "train.accumulate": accumulate, "train.ema": 0.0, "train.grad_clip": 1.0})
    t = Trainer(cfg, _Classes(), [], [], 0, 0, "unused.pt", "unused", ctx, progress=False)
    torch.manual_seed(0)
    t.setup_model(model=_Tiny())
    return t


def _ddp_rank(rank, world, store, result):
    import torch.distributed as dist

    from training.engine.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    t = _step_trainer(DistContext(rank=rank, world=world, device=torch.device("cpu")), accumulate=2)
    calls = []

    def hook(state, bucket):
        calls.append(1)
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world)

    t.net.register_comm_hook(None, hook)
    x, y = _batch()
    half = slice(rank * 4, rank * 4 + 4)  # this rank's half, in two micro-batches of 2
    xs, ys = x[half], y[half]
    t.train_step(xs[:2], ys[:2], None, 0, update=False)
    t.train_step(xs[2:], ys[2:], None, 0, update=True)
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
                    "calls": len(calls)}, result)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_on_half_batches_update_like_one_process(tmp_path):
    """DDP (gloo, 2 ranks, 2 accumulation steps each) == one process on the whole batch;
    gradients are all-reduced once per update (no_sync on the accumulation step)."""
    import torch.multiprocessing as mp

    from training.engine.distributed import DistContext

    result = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_rank, args=(2, str(tmp_path / "store"), result), nprocs=2, join=True,
                       start_method="spawn")
    ddp = torch.load(result, weights_only=True)
    single = _step_trainer(DistContext(), accumulate=1)
    x, y = _batch()
    single.train_step(x, y, None, 0, update=True)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp["params"][k], v, atol=1e-6, rtol=1e-5), k
    # the comm hook runs once per bucket per synchronised backward: once, not twice
    assert ddp["calls"] == 1


def test_checkpoint_kind_is_checked():
    from training.engine.trainer import Trainer

    with pytest.raises(ValueError, match="kind"):
        Trainer(load_config(QUICK), _Classes(), [], [], 0, 0, "x.pt", "w", kind="hkh")


# tiles of the synth_data fixture (Phase-2 names): img001-img004 hold no lake, img005 and img008 do
TRAIN = ["img001", "img002", "img003", "img004", "img006", "img009"]
VAL = ["img005", "img008"]


def tiny(**over):
    base = {"train.epochs": 3, "train.patches_per_epoch": 16, "train.batch_size": 4, "train.patch_size": 64,
            "model.decoder_channels": [16, 16, 16, 8, 8], "train.warmup_epochs": 0, "train.ema": 0.0,
            "train.num_workers": 0}
    base.update(over)
    return load_config(QUICK, base)


@pytest.fixture(scope="module")
def dataset(synth_data):
    from training.data.competition import CompetitionDataset

    return CompetitionDataset(os.path.join(synth_data, "train"))


def run(cfg, dataset, tmp_path, train=TRAIN, val=VAL, fold=0, seed=0):
    from training.engine.trainer import train_member

    out = str(tmp_path / f"fold{fold}_seed{seed}.pt")
    return out, train_member(cfg, dataset, train, val, fold, seed, out, str(tmp_path / ".work" / f"fold{fold}_seed{seed}"),
                             progress=False)


def _csv_rows(tmp_path, fold=0, seed=0):
    with open(tmp_path / "logs" / f"fold{fold}_seed{seed}.csv") as fh:
        return list(csv.DictReader(fh))


def test_isolated_nan_steps_are_skipped_and_counted(dataset, tmp_path, nan_loss_at):
    nan_loss_at({1, 6})  # 4 steps per epoch: epoch 0 step 1, epoch 1 step 2
    out, res = run(tiny(), dataset, tmp_path)
    ck = load_checkpoint(out)
    assert nonfinite_tensors(ck["state_dict"]) == []
    assert [h["bad_steps"] for h in ck["history"]] == [1, 1, 0]
    assert all(math.isfinite(h["loss_total"]) for h in ck["history"])
    assert [r["bad_steps"] for r in _csv_rows(tmp_path)] == ["1", "1", "0"]
    assert res["bad_steps"] == 2


def test_a_run_of_nan_steps_stops_the_member_and_keeps_the_last_good_checkpoint(dataset, tmp_path, nan_loss_at):
    nan_loss_at(range(5, 100))  # from epoch 1 step 1 on
    with pytest.raises(MemberDiverged) as exc:
        run(tiny(), dataset, tmp_path, fold=0, seed=3)
    msg = str(exc.value)
    for needle in ("fold 0 seed 3", "epoch 1 step 3", "focal non-finite", "3 optimiser steps in a row",
                   "train.lr (now 0.002", "loss.boundary", "boundary_ramp_epochs", "No member file"):
        assert needle in msg, (needle, msg)
    assert not os.path.exists(tmp_path / "fold0_seed3.pt")
    last = torch.load(tmp_path / ".work" / "fold0_seed3" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and nonfinite_tensors(last["state_dict"]) == []
    assert os.path.exists(tmp_path / ".work" / "fold0_seed3" / "best.pt")


def test_weights_turned_non_finite_are_never_saved(dataset, tmp_path, monkeypatch):
    """A step that leaves NaN in the weights while the loss was still finite: caught at save time."""
    from training.engine import trainer as trainer_mod

    orig = trainer_mod.Trainer.train_one_epoch

    def poisoned(self, epoch):
        row = orig(self, epoch)
        if epoch == 1:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("inf")
        return row

    monkeypatch.setattr(trainer_mod.Trainer, "train_one_epoch", poisoned)
    cfg = tiny()
    with pytest.raises(MemberDiverged, match="epoch 1.*hold NaN/inf"):
        run(cfg, dataset, tmp_path)
    assert not os.path.exists(tmp_path / "fold0_seed0.pt")
    last = torch.load(tmp_path / ".work" / "fold0_seed0" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and nonfinite_tensors(last["state_dict"]) == []


@pytest.fixture
def oom_above(monkeypatch):
    """A forward that runs out of memory (CUDA's exception type) for training batches larger
    than ``batch`` from training call ``start`` on, and for validation windows larger than
    ``window``: a device that is too small."""
    import segmentation_models_pytorch as smp

    base = smp.Unet.__mro__[1]  # SegmentationModel: the forward every smp architecture uses
    orig = base.forward
    st = {"batch": None, "start": 0, "window": None, "train_calls": 0, "sizes": []}

    def forward(self, x):
        if self.training:
            i = st["train_calls"]
            st["train_calls"] += 1
            if st["batch"] is not None and i >= st["start"] and x.shape[0] > st["batch"]:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
            st["sizes"].append(x.shape[0])
        elif st["window"] is not None and max(x.shape[-2:]) > st["window"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (test)")
        return orig(self, x)

    monkeypatch.setattr(base, "forward", forward)

    def arm(batch=None, start=0, window=None):
        st.update(batch=batch, start=start, window=window)
        return st

    return arm


def test_oom_without_auto_batch_stops_with_the_numbers(dataset, tmp_path, oom_above):
    oom_above(batch=2, start=6)  # epoch 1, step 2
    with pytest.raises(MemberOutOfMemory) as exc:
        run(tiny(), dataset, tmp_path)
    msg = str(exc.value)
    for needle in ("out of memory", "epoch 1 step 2", "train.batch_size 4", "patch 64x64", "effective batch 4",
                   "CPU RAM", "--set train.batch_size=2 --set train.accumulate=2", "train.auto_batch: true"):
        assert needle in msg, (needle, msg)
    assert not os.path.exists(tmp_path / "fold0_seed0.pt")


def test_auto_batch_halves_the_micro_batch_and_redoes_the_step(dataset, tmp_path, oom_above, caplog):
    st = oom_above(batch=2, start=6)
    with caplog.at_level(logging.WARNING, logger="glacier.train"):
        out, res = run(tiny(**{"train.auto_batch": True}), dataset, tmp_path)
    ck = load_checkpoint(out)
    assert len(ck["history"]) == 3 and res["epochs_run"] == 3
    assert [h["micro_batch"] for h in ck["history"]] == [4, 2, 2]
    assert [h["accumulate"] for h in ck["history"]] == [1, 2, 2]
    assert [r["micro_batch"] for r in _csv_rows(tmp_path)] == ["4", "2", "2"]
    # every epoch still trained on all its 16 patches: epoch 1 redid step 2 with two batches of 2
    assert st["sizes"] == [4] * 4 + [4, 4] + [2] * 4 + [2] * 8
    assert any("auto_batch" in r.getMessage() and "micro-batch 4 -> 2" in r.getMessage() for r in caplog.records)
    assert nonfinite_tensors(ck["state_dict"]) == []


def test_validation_oom_falls_back_to_smaller_windows(dataset, tmp_path, oom_above, caplog):
    oom_above(window=32)
    with pytest.raises(MemberOutOfMemory, match="validation.window"):
        run(tiny(), dataset, tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="glacier.train"):
        out, _ = run(tiny(**{"train.auto_batch": True}), dataset, tmp_path / "b")
    ck = load_checkpoint(out)
    assert all("val_mcc" in h for h in ck["history"]) and ck["history"][-1]["val_window"] == 32
    assert any("validation window" in r.getMessage() for r in caplog.records)


def test_class_absent_from_training_patches_triggers_the_recall_warning(dataset, tmp_path, caplog):
    # no lake pixel in the training tiles; both validation tiles hold lake (chosen from the
    # labels, so the test follows the generator)
    has_lake = {k: bool((dataset.label(k) == 3).any()) for k in sorted(dataset.keys)}
    train = [k for k, lake in has_lake.items() if not lake]
    val = [k for k, lake in has_lake.items() if lake][:2]
    assert len(train) >= 3 and len(val) == 2, has_lake
    with caplog.at_level(logging.WARNING, logger="glacier.train"):
        out, res = run(tiny(**{"train.epochs": 4}), dataset, tmp_path, train=train, val=val)
    warned = [r.getMessage() for r in caplog.records if "is not being learned" in r.getMessage()]
    assert len(warned) == 1 and "class lake" in warned[0] and "recall 0.000" in warned[0], warned
    assert "absent from this fold's training tiles" in warned[0]
    ck = load_checkpoint(out)
    assert ck["class_warnings"] == warned and res["class_warnings"] == warned


def _tiny_training(synth_data):
    from training.config import load_config
    from training.data.competition import CompetitionDataset

    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      {"train.epochs": 1, "train.patches_per_epoch": 4, "train.batch_size": 4, "train.patch_size": 64,
                       "model.decoder_channels": [16, 16, 16, 8, 8], "train.warmup_epochs": 0})
    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    return cfg, ds, ds.keys[:6], ds.keys[6:8]


def test_resume_state_refused(synth_data, tmp_path):
    """A crafted last.pt in the work folder stops the run before any epoch; never unpickled."""
    from training.engine.checkpoint import CheckpointError
    from training.engine.trainer import train_member

    cfg, ds, tr, va = _tiny_training(synth_data)
    marker = str(tmp_path / "PWNED")
    work = tmp_path / "work"
    work.mkdir()
    craft(str(work / "last.pt"), marker, {"fold": 0, "seed": 0})
    with pytest.raises(CheckpointError, match="resume state"):
        train_member(cfg, ds, tr, va, 0, 0, str(tmp_path / "fold0_seed0.pt"), str(work), progress=False)
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "fold0_seed0.pt")


def test_best_checkpoint_refused(synth_data, tmp_path, monkeypatch):
    """The best-epoch checkpoint is re-read at the end of a run: a crafted one is refused."""
    import training.engine.trainer as trainer
    from training.engine.checkpoint import CheckpointError

    cfg, ds, tr, va = _tiny_training(synth_data)
    marker = str(tmp_path / "PWNED")
    real_save = trainer.save_atomic

    def swap_best(obj, path):
        if os.path.basename(path) == "best.pt":
            craft(path, marker, {"state_dict": {}})
        else:
            real_save(obj, path)

    monkeypatch.setattr(trainer, "save_atomic", swap_best)
    with pytest.raises(CheckpointError, match="best-epoch checkpoint"):
        trainer.train_member(cfg, ds, tr, va, 0, 0, str(tmp_path / "m.pt"), str(tmp_path / "work"), progress=False)
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_ddp_uneven_patch_count_does_not_hang(synth_data, folds_file, tmp_path):
    """7 patches, batch 2, two gloo ranks: the old shard gave 4 and 3 patches -> 2 and 1
    steps, and rank 0 waited forever in the all-reduce."""
    out = str(tmp_path / "ddp")
    cmd = cv_cmd_any_fold(os.path.join(synth_data, "train"), folds_file, out, "--fold", "0", "--gpus", "2",
               "--set", "train.patches_per_epoch=7", "--set", "train.batch_size=2", "--set", "train.accumulate=2")
    r = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    from training.engine.checkpoint import load_checkpoint

    assert len(load_checkpoint(os.path.join(out, "fold0_seed0.pt"))["history"]) == 2


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_oom_between_unscale_and_step_is_redone_with_auto_batch(synth_data, tmp_path, monkeypatch):
    """With a live GradScaler (CPU's here), an OOM raised after ``unscale_`` used to make the
    redo fail with "unscale_() has already been called on this optimizer"."""
    t = kaggle_trainer(synth_data, tmp_path, **{"train.auto_batch": True, "train.epochs": 1})
    t.setup_data()
    t.setup_model()
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, max_norm, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (test)")
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    row = t.train_one_epoch(0)
    assert row["micro_batch"] == 2 and row["accumulate"] == 2 and math.isfinite(row["loss_total"])
    assert calls["n"] == 3  # the failed step, then its redo and the next step


def test_last_checkpoint_is_time_based(synth_data, tmp_path):
    """last.pt after the first epoch, then only when train.checkpoint_every_s has passed."""
    seen = []

    class Watch:
        def on_epoch_end(self, trainer, epoch, row):
            seen.append(torch.load(trainer.last_path, weights_only=True)["epoch"])

    t = kaggle_trainer(synth_data, tmp_path, **{"train.epochs": 2, "train.checkpoint_every_s": 3600})
    t.callbacks = [Watch()]
    t.fit()
    assert seen == [0, 0]  # every epoch at 0: the resume tests of the trainer and cv cover it


def test_loader_workers_are_split_between_ranks(synth_data, tmp_path):
    from training.engine.distributed import DistContext
    from training.engine.launch import split_cpus
    from training.engine.trainer import Trainer

    ds = kaggle_dataset(synth_data)
    cfg = load_config(QUICK, {**TINY, "train.num_workers": 4})
    t = Trainer(cfg, ds, ["img001"], [], 0, 0, str(tmp_path / "m.pt"), str(tmp_path / "w"),
                DistContext(rank=0, world=2), progress=False)
    assert t.num_workers == split_cpus(2, 4)["loader_workers"] <= 2


def test_robust_recipe_options_train_and_the_member_keeps_its_normalisation(synth_data, tmp_path):
    """Per-tile normalisation, the radiometric shift, lake copy-paste and Lovasz + Tversky
    together: a member trains, its statistics carry the mode the runtime applies, and its
    validation score is the runtime's on those tiles."""
    from glacier_runtime.normalize import tile_stats
    from training.engine.checkpoint import load_checkpoint

    tr = make_trainer(synth_data, tmp_path, **{
        "data.normalization": "tile_percentile", "augment.shift_p": 1.0, "augment.lake_paste_p": 1.0,
        "loss.lovasz": 0.3, "loss.tversky": 0.3, "train.epochs": 2})
    res = tr.fit()
    assert res["best_epoch"] in (0, 1)
    ck = load_checkpoint(str(tmp_path / "fold0_seed0.pt"))
    assert ck["stats"]["mode"] == "tile_percentile" and ck["stats"]["tile_percentiles"] == [2.0, 98.0]
    assert tr.shift is not None and tr.lakes is not None
    key = tr.train_keys[0]
    assert tr.norms[key] == tile_stats(tr.images[key], ck["stats"])  # raw tiles, each with its own numbers
    assert {"loss_lovasz", "loss_tversky"} <= set(ck["history"][-1])
