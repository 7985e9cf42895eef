"""Training guards wired into the trainer: non-finite steps skipped/counted or stopping a
member, weights with NaN/inf never written, out of memory (message; auto_batch halves the
micro-batch and redoes the step; validation shrinks its window), a class not learned.

In-process, tiny model, 64x64 synthetic tiles: seconds per test."""
import csv
import logging
import math
import os

import pytest
import torch

from training.engine.checkpoint import load_checkpoint
from training.config import load_config
from training.engine.guards import MemberDiverged, MemberOutOfMemory, nonfinite_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
TRAIN = ["00_01", "00_02", "02_01", "02_02", "00_00", "02_00"]
VAL = ["01_00", "01_01"]


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


@pytest.fixture
def nan_loss_at(monkeypatch):
    """Make the loss's focal part NaN (still attached to the graph, so the gradients are NaN
    too, as in a real divergence) on the chosen training calls (0-based)."""
    from training.losses import CombinedLoss

    orig = CombinedLoss.forward
    calls = {"n": 0, "bad": set()}

    def forward(self, logits, target, dist=None, epoch=0):
        parts = orig(self, logits, target, dist, epoch)
        i = calls["n"]
        calls["n"] += 1
        if i in calls["bad"]:
            parts["focal"] = parts["focal"] * float("nan")
            parts["total"] = sum(v for k, v in parts.items() if k != "total")
        return parts

    monkeypatch.setattr(CombinedLoss, "forward", forward)

    def arm(steps):
        calls["bad"] = set(steps)
        return calls

    return arm


def _csv_rows(tmp_path, fold=0, seed=0):
    with open(tmp_path / "logs" / f"fold{fold}_seed{seed}.csv") as fh:
        return list(csv.DictReader(fh))


# ---- non-finite steps -----------------------------------------------------------------------------
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


# ---- out of memory --------------------------------------------------------------------------------
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


# ---- a class the model is not learning ------------------------------------------------------------
def test_class_absent_from_training_patches_triggers_the_recall_warning(dataset, tmp_path, caplog):
    # no lake pixel in these training tiles; both validation tiles hold lake
    train = ["00_01", "00_02", "02_01", "02_02"]
    with caplog.at_level(logging.WARNING, logger="glacier.train"):
        out, res = run(tiny(**{"train.epochs": 4}), dataset, tmp_path, train=train)
    warned = [r.getMessage() for r in caplog.records if "is not being learned" in r.getMessage()]
    assert len(warned) == 1 and "class lake" in warned[0] and "recall 0.000" in warned[0], warned
    assert "absent from this fold's training tiles" in warned[0]
    ck = load_checkpoint(out)
    assert ck["class_warnings"] == warned and res["class_warnings"] == warned


# ---- cv: the other members go on, the run exits non-zero listing what failed ----------------------
@pytest.fixture(scope="module")
def folds_file(dataset, tmp_path_factory):
    from training.folds import make_folds, save_folds

    f = make_folds({k: dataset.class_pixels(k).tolist() for k in dataset.keys}, k=3, block=1)
    path = str(tmp_path_factory.mktemp("folds") / "folds.json")
    save_folds(f, path)
    return path


TINY_SETS = ["--set", "train.epochs=2", "--set", "train.patches_per_epoch=8", "--set", "train.batch_size=4",
             "--set", "train.patch_size=64", "--set", "model.decoder_channels=[16,16,16,8,8]",
             "--set", "train.warmup_epochs=0", "--set", "train.num_workers=0", "--no-progress"]


def test_cv_goes_on_after_a_diverged_member_and_exits_non_zero(synth_data, folds_file, tmp_path, monkeypatch,
                                                              nan_loss_at):
    from click.testing import CliRunner

    from training.engine import trainer as trainer_mod
    from training.cli import cv_command

    calls = nan_loss_at(set())
    orig = trainer_mod.Trainer.setup_data

    def setup_data(self):  # fold 0's loss is NaN from its first step, fold 1 trains normally
        calls["bad"] = set(range(calls["n"], calls["n"] + 1000)) if self.fold == 0 else set()
        return orig(self)

    monkeypatch.setattr(trainer_mod.Trainer, "setup_data", setup_data)
    out = tmp_path / "w"
    r = CliRunner().invoke(cv_command, ["--config", QUICK, "--data", os.path.join(synth_data, "train"), "--folds",
                                        folds_file, "--out", str(out), "--fold", "0", "--fold", "1", "--device",
                                        "cpu", *TINY_SETS])
    assert r.exit_code != 0, r.output
    assert "fold 0 seed 0: FAILED (diverged)" in r.output and "training diverged at epoch 1 step 0" in r.output
    assert "1 member(s) failed: fold 0 seed 0 (diverged)" in r.output
    assert not os.path.exists(out / "fold0_seed0.pt")
    assert nonfinite_tensors(load_checkpoint(str(out / "fold1_seed0.pt"))["state_dict"]) == []
    text = (out / "cv_summary.txt").read_text()
    assert "FAILED members (1)" in text and "fold 0 seed 0 (diverged)" in text


@pytest.mark.slow
def test_cv_with_a_huge_learning_rate_stops_members_and_exits_non_zero(synth_data, folds_file, tmp_path):
    """The issue's repro as a user runs it: `--set train.lr=1e30` used to exit 0 with NaN members."""
    import subprocess
    import sys

    out = tmp_path / "w"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "training.cli", "cv", "--config", QUICK, "--data",
                        os.path.join(synth_data, "train"), "--folds", folds_file, "--out", str(out), "--fold", "0",
                        "--device", "cpu", *TINY_SETS, "--set", "train.lr=1e30"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0, r.stdout[-2000:]
    both = r.stdout + r.stderr
    assert "training diverged" in both and "lower train.lr (now 1e+30" in both
    for p in out.glob("fold*_seed*.pt"):
        assert nonfinite_tensors(load_checkpoint(str(p))["state_dict"]) == [], p
