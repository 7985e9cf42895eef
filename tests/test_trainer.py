"""The trainer's steps: restore onto the run's device, DDP shards and updates, per-epoch
progress lines off a terminal, checkpoint kinds, config errors before any epoch."""
import os

import pytest
import torch
import yaml

from training.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
TINY = {"train.epochs": 3, "train.patches_per_epoch": 8, "train.batch_size": 4, "train.patch_size": 64,
        "model.decoder_channels": [16, 16, 16, 8, 8], "train.warmup_epochs": 0}


class InterruptAfter:
    """A callback that interrupts the run after ``epoch``, as Ctrl-C would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, row):
        if epoch >= self.epoch:
            raise KeyboardInterrupt(f"interrupted after epoch {epoch}")


def _trainer(synth_data, tmp_path, device="cpu", callbacks=(), **over):
    from training.data.competition import CompetitionDataset
    from training.engine.distributed import DistContext
    from training.engine.trainer import Trainer

    cfg = load_config(QUICK, {**TINY, **over})
    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = sorted(ds.keys)
    return Trainer(cfg, ds, keys[:6], keys[6:8], 0, 0, str(tmp_path / "fold0_seed0.pt"), str(tmp_path / ".work"),
                   DistContext(device=torch.device(device)), progress=False, callbacks=callbacks)


# ---- restore to a device ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
def test_restore_puts_every_tensor_on_the_target_device(synth_data, tmp_path):
    """A cut run (EMA + plateau scheduler on) restored onto another device: the model,
    optimizer moments and EMA weights all land there (the old code left EMA on the CPU,
    so the first EMA.update on a GPU mixed devices)."""
    t = _trainer(synth_data, tmp_path, callbacks=[InterruptAfter(0)], **{"train.ema": 0.9, "train.scheduler": "plateau"})
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert os.path.exists(t.last_path)
    ck = torch.load(t.last_path, map_location="cpu", weights_only=True)  # plain types only
    assert ck["kind"] == "member" and ck["optimizer"]["state"] and ck["ema"]

    r = _trainer(synth_data, tmp_path, device="meta", **{"train.ema": 0.9, "train.scheduler": "plateau"})
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


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
def test_restore_state_scaler_and_ema_device_unit():
    from training.engine.ema import EMA
    from training.engine.schedule import grad_scaler
    from training.engine.state import restore_state

    model = torch.nn.Conv2d(2, 3, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 2, 4, 4)).sum().backward()
    opt.step()
    ema = EMA(model, 0.5)
    ck = {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state,
          "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7,
                     "_growth_tracker": 3}}
    target = torch.nn.Conv2d(2, 3, 1).to("meta")
    t_opt = torch.optim.AdamW(target.parameters())
    t_ema = EMA(target, 0.5)
    t_ema.state = {k: torch.zeros(1) for k in t_ema.state}  # CPU placeholders must be replaced
    scaler = grad_scaler(False)
    restore_state(ck, torch.device("meta"), target, t_opt, scaler, t_ema)
    assert all(v.device.type == "meta" for v in t_ema.state.values())
    assert all(v.device.type == "meta" for st in t_opt.state.values() for k, v in st.items() if k != "step")


# ---- DDP ----------------------------------------------------------------------------------------
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


# ---- progress lines -----------------------------------------------------------------------------
def test_epoch_lines_through_a_pipe(synth_data, tmp_path):
    """Off a terminal every epoch prints one flushed line: fold, seed, epoch/total, loss
    parts, val MCC overall and per class, lr, s/epoch, ETA for the member and the run."""
    from training.engine.progress import EpochReporter

    r_fd, w_fd = os.pipe()
    with os.fdopen(w_fd, "w") as w:
        t = _trainer(synth_data, tmp_path, **{"train.epochs": 2})
        t.reporter = EpochReporter(0, 0, 2, t.class_names, members_after=2, worker=1, bars=True, stream=w)
        t.members_after = 2
        t.fit()
        assert t.reporter.bar is None  # a pipe is not a terminal: no bar even when bars are allowed
    with os.fdopen(r_fd) as r:
        lines = [line for line in r.read().splitlines() if line.strip()]
    assert len(lines) == 2, lines
    for i, line in enumerate(lines):
        assert line.startswith("[worker 1] fold 0 seed 0 | epoch %d/2 | loss " % (i + 1)), line
        for part in ("focal", "dice", "mcc", "val MCC", "background", "glacier", "debris", "lake", "lr ",
                     "s/epoch", "ETA member", "run"):
            assert part in line, (part, line)
    assert "ETA member 0s" in lines[-1]
    # the member it wrote says what it is (build skips kind "pretrain")
    assert torch.load(t.out_path, map_location="cpu", weights_only=True)["kind"] == "member"


def test_eta_counts_the_members_still_to_train():
    from training.engine.progress import EpochReporter, fmt_duration

    rep = EpochReporter(1, 2, 10, ["a"], members_after=3, bars=False, stream=open(os.devnull, "w"))
    rep.times = [10.0, 20.0]
    eta = rep.etas(1)
    assert eta["member"] == pytest.approx(15 * 8) and eta["run"] == pytest.approx(15 * 8 + 3 * 15 * 10)
    assert fmt_duration(3725) == "1h02m" and fmt_duration(75) == "1m15s" and fmt_duration(9) == "9s"


# ---- checkpoint kinds ---------------------------------------------------------------------------
def test_checkpoint_kind_is_checked():
    from training.engine.trainer import Trainer

    with pytest.raises(ValueError, match="kind"):
        Trainer(load_config(QUICK), _Classes(), [], [], 0, 0, "x.pt", "w", kind="hkh")


# ---- config errors before any epoch -------------------------------------------------------------
@pytest.mark.parametrize("train_line", ["train:\n", "train: 5\n", "train: [1, 2]\n"])
def test_set_against_empty_or_scalar_section(tmp_path, train_line):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\n" + train_line)
    if train_line == "train:\n":
        assert load_config(str(p), {"train.epochs": 2}).train.epochs == 2  # empty section: filled in
        return
    with pytest.raises(ConfigError) as exc:
        load_config(str(p), {"train.epochs": 2})
    msg = str(exc.value)
    assert str(p) in msg and "train.epochs" in msg and "`train`" in msg and "mapping" in msg


def test_validation_tta_checked_on_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"validation": {"tta": "d8"}}))
    with pytest.raises(ConfigError) as exc:
        load_config(str(p))
    assert "validation.tta" in str(exc.value) and str(p) in str(exc.value) and "d8" in str(exc.value)
    with pytest.raises(ConfigError, match="validation.tta"):
        load_config(QUICK, {"validation.tta": ["identity", "flip_x"]})


def test_class_dependent_settings_checked_before_training(tmp_path):
    from training.config import check_against_classes

    cfg = load_config(QUICK, {"loss.class_weights": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="class_weights has 2 values for 4 classes"):
        check_against_classes(cfg, ["background", "glacier", "debris", "lake"], QUICK)
    cfg = load_config(QUICK, {"sampler.targets": {"ice": 1.0}})
    with pytest.raises(ConfigError, match="unknown classes"):
        check_against_classes(cfg, ["background", "glacier", "debris", "lake"], QUICK)
