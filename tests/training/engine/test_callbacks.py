"""Callbacks of the training loop: the trainer calls ``on_epoch_end`` once per epoch, after the
epoch's checkpoint, with the epoch and its history row; an exception raised there ends the run,
with the last checkpoint kept so that the member resumes."""
import os

import pytest
import torch

from training.engine.callbacks import Callback
from tests.helpers import make_trainer


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_epoch_end(self, trainer, epoch, row):
        last = torch.load(trainer.last_path, map_location="cpu", weights_only=True)
        self.calls.append((trainer, epoch, row, last["epoch"]))


class StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, row):
        if epoch == self.epoch:
            raise RuntimeError(f"stopped by a callback after epoch {epoch}")


def test_the_base_callback_does_nothing():
    assert Callback().on_epoch_end(None, 0, {}) is None


def test_called_once_per_epoch_with_the_epoch_and_its_row(synth_data, tmp_path):
    rec = Recorder()
    t = make_trainer(synth_data, tmp_path, callbacks=[rec], **{"train.epochs": 2, "train.checkpoint_every_s": 0})
    t.fit()
    assert [(c[1], c[3]) for c in rec.calls] == [(0, 0), (1, 1)]  # after that epoch's last.pt was written
    assert all(c[0] is t for c in rec.calls)
    assert [c[2] for c in rec.calls] == t.history and rec.calls[1][2] is t.history[1]
    assert "val_mcc" in rec.calls[0][2] and os.path.exists(t.out_path)


def test_an_exception_ends_the_run_and_the_member_resumes(synth_data, tmp_path):
    t = make_trainer(synth_data, tmp_path, callbacks=[StopAfter(0)], **{"train.epochs": 2})
    with pytest.raises(RuntimeError, match="stopped by a callback after epoch 0"):
        t.fit()
    assert not os.path.exists(t.out_path)  # no member written
    last = torch.load(t.last_path, map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and len(last["history"]) == 1
    again = make_trainer(synth_data, tmp_path, **{"train.epochs": 2})
    again.setup_data()
    again.setup_model()
    assert again.restore() == 1 and again.history == last["history"]  # the next run goes on at epoch 1
