"""Progress of a training run: one flushed line per epoch off a terminal, ETAs for the member and
the run."""
import os

import pytest
import torch

from tests.helpers import make_trainer


def test_epoch_lines_through_a_pipe(synth_data, tmp_path):
    """Off a terminal every epoch prints one flushed line: fold, seed, epoch/total, loss
    parts, val MCC overall and per class, lr, s/epoch, ETA for the member and the run."""
    from training.engine.progress import EpochReporter

    r_fd, w_fd = os.pipe()
    with os.fdopen(w_fd, "w") as w:
        t = make_trainer(synth_data, tmp_path, **{"train.epochs": 2})
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
