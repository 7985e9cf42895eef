"""Training guards, pure logic: non-finite steps, weight finiteness, out of memory, classes not
being learned. (The guards wired into the trainer are tested in
tests/training/engine/test_trainer.py.)"""
import math

import numpy as np
import pytest
import torch

from training.engine.guards import (AMP_SKIP, OK, SKIPPED, ClassLearningMonitor, MemberDiverged, NonFiniteMonitor,
                             assert_finite_state, grad_norm, is_oom, nonfinite_parts, nonfinite_tensors,
                             oom_message, smaller_batch, smaller_window)


# ---- non-finite steps -----------------------------------------------------------------------------
def test_nonfinite_parts_names_the_culprit():
    nan, inf = float("nan"), float("inf")
    assert nonfinite_parts({"focal": torch.tensor(0.3), "dice": torch.tensor(0.2), "total": torch.tensor(0.5)}) == []
    assert nonfinite_parts({"focal": torch.tensor(0.3), "boundary": torch.tensor(nan),
                            "total": torch.tensor(nan)}) == ["boundary"]
    assert nonfinite_parts({"focal": 1.0, "mcc": inf, "dice": -inf, "total": nan}) == ["mcc", "dice"]
    # every part finite, the sum overflows: the total is to blame
    assert nonfinite_parts({"focal": 3e38, "dice": 3e38, "total": torch.tensor(3e38) * 2}) == ["total"]


def _mon(**kw):
    return NonFiniteMonitor(limit=3, fold=2, seed=7, lr=1e6, boundary=0.15, ramp=3, where="out/.work/fold2_seed7", **kw)


def test_isolated_bad_steps_are_skipped_and_counted():
    m = _mon()
    m.start_epoch()
    seq = [([], True), (["focal"], True), ([], True), ([], False), ([], True), (["total"], False), ([], True)]
    verdicts = [m.observe(0, i, p, g) for i, (p, g) in enumerate(seq)]
    assert verdicts == [OK, SKIPPED, OK, SKIPPED, OK, SKIPPED, OK]
    assert m.epoch_bad == 3 and m.total_bad == 3 and m.in_a_row == 0
    m.start_epoch()
    assert m.epoch_bad == 0 and m.total_bad == 3


def test_a_run_of_bad_steps_stops_with_the_message():
    m = _mon()
    m.observe(4, 10, [], True)
    m.observe(4, 11, ["boundary"], True)
    m.observe(4, 12, ["boundary"], False)
    with pytest.raises(MemberDiverged) as exc:
        m.observe(4, 13, ["boundary"], False)
    msg = str(exc.value)
    for needle in ("fold 2 seed 7", "epoch 4 step 13", "boundary non-finite", "3 optimiser steps in a row",
                   "train.lr (now 1e+06", "loss.boundary (now 0.15)", "loss.boundary_ramp_epochs (now 3)",
                   "out/.work/fold2_seed7", "No member file"):
        assert needle in msg, (needle, msg)
    # only the boundary part went non-finite: its fix is proposed first; otherwise the learning rate
    assert msg.index("loss.boundary (now") < msg.index("train.lr")
    m2 = _mon()
    for i in range(2):
        m2.observe(0, i, ["focal", "boundary"], False)
    with pytest.raises(MemberDiverged) as exc2:
        m2.observe(0, 2, ["focal", "boundary"], False)
    assert str(exc2.value).index("train.lr") < str(exc2.value).index("loss.boundary (now")


def test_run_spans_epochs():
    m = _mon()
    m.observe(0, 5, ["focal"], True)
    m.observe(0, 6, ["focal"], True)
    m.start_epoch()
    with pytest.raises(MemberDiverged, match="epoch 1 step 0"):
        m.observe(1, 0, ["focal"], True)


def test_amp_scaler_skip_is_not_a_divergence():
    m = _mon()
    # finite loss, overflowing fp16 gradients at a large scale: the GradScaler's business
    assert [m.observe(0, i, [], False, amp=True, scale=2.0 ** (16 - i)) for i in range(6)] == [AMP_SKIP] * 6
    assert m.epoch_amp_skips == 6 and m.total_bad == 0
    # the scale has collapsed below 1 and gradients still overflow: a real divergence
    assert m.observe(0, 6, [], False, amp=True, scale=0.5) == SKIPPED
    assert "GradScaler scale 0.5" in m.last_reason
    # a non-finite loss under AMP is never a scaler skip
    assert m.observe(0, 7, ["dice"], True, amp=True, scale=65536.0) == SKIPPED
    # without AMP the same gradients are a bad step
    assert _mon().observe(0, 0, [], False, amp=False) == SKIPPED


def test_grad_norm_matches_torch_and_sees_nan():
    lin = torch.nn.Linear(4, 3)
    lin(torch.randn(5, 4)).sum().backward()
    ref = torch.nn.utils.clip_grad_norm_(lin.parameters(), float("inf"))
    assert torch.allclose(grad_norm(lin.parameters()), ref)
    lin.weight.grad[0, 0] = float("nan")
    assert not torch.isfinite(grad_norm(lin.parameters()))


def test_state_finiteness():
    sd = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).state_dict()
    assert nonfinite_tensors(sd) == []
    assert_finite_state(sd, "x")
    sd["1.running_var"][1] = float("inf")
    sd["0.weight"][0, 0, 0, 0] = float("nan")
    assert nonfinite_tensors(sd) == ["0.weight", "1.running_var"]
    with pytest.raises(MemberDiverged, match=r"fold0_seed0.pt: 2 weight tensor\(s\) hold NaN/inf \(0.weight"):
        assert_finite_state(sd, "fold0_seed0.pt")


# ---- out of memory --------------------------------------------------------------------------------
def test_is_oom_recognises_cuda_and_cpu_allocator_errors():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 68719476736 bytes. Error code 12"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("size mismatch for conv1.weight"))
    assert not is_oom(ValueError("out of range"))


def test_real_cpu_allocator_error_is_recognised():
    try:  # an allocation no machine can serve: the CPU allocator's own exception
        torch.empty(2 ** 62, dtype=torch.uint8)
    except Exception as exc:  # noqa: BLE001
        assert is_oom(exc), repr(exc)
    else:
        pytest.skip("the allocator granted 4 EiB")


@pytest.mark.parametrize("b,a", [(32, 1), (8, 2), (6, 1), (5, 3), (2, 4), (7, 1)])
def test_smaller_batch_keeps_effective_batch(b, a):
    nb, na = smaller_batch(b, a)
    assert nb * na == b * a and 1 <= nb <= b // 2
    assert nb == max(d for d in range(1, b // 2 + 1) if b % d == 0)  # naive oracle: largest divisor <= b/2


def test_smaller_batch_and_window_floors():
    assert smaller_batch(1, 4) is None
    assert smaller_batch(32, 1) == (16, 2)
    assert smaller_window(1024) == 512 and smaller_window(96) is None and smaller_window(200) == 96


def test_oom_message_names_numbers_and_fix():
    msg = oom_message("the training step (epoch 3, step 5)", 32, 1, 256, torch.device("cpu"))
    for needle in ("train.batch_size 32", "patch 256x256", "effective batch 32", "CPU RAM",
                   "--set train.batch_size=16 --set train.accumulate=2", "train.auto_batch: true"):
        assert needle in msg, (needle, msg)
    assert "batch 1 does not fit" in oom_message("x", 1, 1, 512, torch.device("cpu"))
    v = oom_message("validation", 8, 1, 256, torch.device("cpu"), window=1024)
    assert "validation.window 1024" in v and "validation.window: 512" in v


# ---- a class the model is not learning ------------------------------------------------------------
NAMES = ["background", "glacier", "debris", "lake"]


def _cm(truth, pred):
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(truth, pred, labels=range(4))


def test_class_monitor_recall_zero_after_warmup_once():
    rng = np.random.default_rng(0)
    truth = rng.choice(4, 5000, p=[0.6, 0.25, 0.1, 0.05])
    pred = np.where(truth == 3, 0, truth)  # lake never predicted
    mon = ClassLearningMonitor(NAMES, warmup=2, patience=2, fold=1, seed=0, targets={"lake": 0.15})
    rates, pix = [0.3, 0.3, 0.3, 0.1], [0.7, 0.2, 0.09, 0.01]
    assert mon.observe(0, _cm(truth, pred), rates, pix) == []   # warm-up
    assert mon.observe(1, _cm(truth, pred), rates, pix) == []   # warm-up
    assert mon.observe(2, _cm(truth, pred), rates, pix) == []   # 1st strike
    out = mon.observe(3, _cm(truth, pred), rates, pix)           # 2nd strike: reported
    assert len(out) == 1 and "class lake is not being learned" in out[0]
    for needle in ("fold 1 seed 0 epoch 3", "recall 0.000", "centred 10.0 %", "sampler.targets.lake 0.15",
                   "loss.class_weights"):
        assert needle in out[0], (needle, out[0])
    assert mon.observe(4, _cm(truth, pred), rates, pix) == []   # once per member
    assert mon.warnings == out


def test_class_monitor_under_predicted_share_and_recovery():
    truth = np.array([0] * 800 + [2] * 200)
    pred = truth.copy()
    pred[800:795 + 200] = 0  # debris: 5 of 200 pixels predicted -> share 0.5 % vs 20 %
    mon = ClassLearningMonitor(NAMES, warmup=0, patience=2)
    assert mon.observe(0, _cm(truth, pred), [0.25] * 4, [0.25] * 4) == []
    assert mon.observe(1, _cm(truth, truth), [0.25] * 4, [0.25] * 4) == []  # recovered: streak reset
    assert mon.observe(2, _cm(truth, pred), [0.25] * 4, [0.25] * 4) == []
    out = mon.observe(3, _cm(truth, pred), [0.25] * 4, [0.25] * 4)
    assert len(out) == 1 and "class debris" in out[0] and "0.5 % of pixels vs 20 %" in out[0]
    # classes absent from the validation labels are never reported
    assert not any("lake" in w or "glacier" in w for w in mon.warnings)


def test_class_monitor_absent_from_training_tiles_says_so():
    truth = np.array([0] * 90 + [3] * 10)
    pred = np.zeros(100, int)
    mon = ClassLearningMonitor(NAMES, warmup=0, patience=1, absent=["lake"])
    out = mon.observe(0, _cm(truth, pred), [0.5, 0.5, 0, 0], [0.9, 0.1, 0, 0])
    assert len(out) == 1 and "absent from this fold's training tiles" in out[0]


def test_is_finite_oracle():
    # the monitor's finiteness agrees with math.isfinite on plain floats
    for v in (0.0, 1e38, float("inf"), float("-inf"), float("nan")):
        assert (nonfinite_parts({"a": v}) == []) == math.isfinite(v)


# ---- micro-batches over the epoch order -----------------------------------------------------------
def test_window_batches_same_samples_per_step_after_halving():
    from training.engine.guards import window_batches

    order = list(np.random.default_rng(0).permutation(40))[:36]
    full = window_batches(order, effective=8, micro=4)
    assert [len(b) for b, _ in full] == [4] * 9 and [u for _, u in full] == [False, True] * 4 + [True]
    steps = [sum((b for b, _ in full[i:i + 2]), []) for i in range(0, 8, 2)]
    half = window_batches(order, effective=8, micro=2, start=16)  # redo step 2 onwards with half the micro-batch
    assert [len(b) for b, _ in half] == [2] * 10
    redo = [sum((b for b, _ in half[i:i + 4]), []) for i in range(0, 8, 4)]
    assert redo == steps[2:]  # naive oracle: the same samples in the same steps
    assert sum((b for b, _ in half), []) == order[16:]
    with pytest.raises(ValueError, match="step boundary"):
        window_batches(order, 8, 4, start=4)


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_class_guard_outcome_says_whether_the_class_recovered():
    from training.engine.guards import ClassLearningMonitor

    names = ["background", "glacier", "debris", "lake"]
    mon = ClassLearningMonitor(names, warmup=0, patience=1)
    weak = np.diag([100, 50, 0, 5]).astype(float)
    weak[2, 0] = 20  # debris all predicted as background: recall 0
    assert mon.observe(0, weak, [0.25] * 4, [0.25] * 4)
    good = np.diag([100, 50, 18, 5]).astype(float)
    good[2, 0] = 2
    (o,) = mon.outcomes(good)
    tp, fn, fp = 18.0, 2.0, 0.0
    tn = good.sum() - tp - fn - fp
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert o["class"] == "debris" and o["recovered"] and o["warned_epoch"] == 0
    assert abs(o["final_recall"] - 0.9) < 1e-12 and abs(o["final_mcc"] - mcc) < 1e-12
    (o,) = mon.outcomes(weak)
    assert not o["recovered"] and o["final_recall"] == 0.0
