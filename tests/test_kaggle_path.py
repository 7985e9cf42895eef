"""The two-GPU path on its CPU stand-ins: DDP with the shipped configs' attention, EMA that
learns, a failing rank and Ctrl-C, pre-training that skips a finished run, an out-of-memory
redo under a gradient scaler, ONNX Runtime on CUDA, evaluate on the CPU, and (fold, seed)
jobs dealt from one queue."""
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
HKH_QUICK = os.path.join(ROOT, "configs", "hkh_pretrain_quick.yaml")
TINY = {"train.epochs": 2, "train.patches_per_epoch": 8, "train.batch_size": 4, "train.patch_size": 64,
        "model.decoder_channels": [16, 16, 16, 8, 8], "train.warmup_epochs": 0, "train.num_workers": 0}
TINY_SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v).replace(' ', '')}")]
SCSE = {"model.decoder_attention_type": "scse", "model.decoder_channels": [32, 32, 16, 16, 16]}
#: smp's U-Net never runs its last decoder block's first attention (that block has no skip)
LAST_BLOCK_ATTENTION = ["decoder.blocks.4.attention1.attention.cSE.1.weight",
                        "decoder.blocks.4.attention1.attention.cSE.1.bias",
                        "decoder.blocks.4.attention1.attention.cSE.3.weight",
                        "decoder.blocks.4.attention1.attention.cSE.3.bias",
                        "decoder.blocks.4.attention1.attention.sSE.0.weight",
                        "decoder.blocks.4.attention1.attention.sSE.0.bias"]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _dataset(synth_data):
    from training.data.competition import CompetitionDataset

    return CompetitionDataset(os.path.join(synth_data, "train"))


def _trainer(synth_data, tmp_path, **over):
    from training.engine.trainer import Trainer

    ds = _dataset(synth_data)
    keys = sorted(ds.keys)
    return Trainer(load_config(QUICK, {**TINY, **over}), ds, keys[:6], keys[6:8], 0, 0,
                   str(tmp_path / "fold0_seed0.pt"), str(tmp_path / ".work"), progress=False)


@pytest.fixture(scope="module")
def folds_path(synth_data, tmp_path_factory):
    from training.folds import make_folds, save_folds

    ds = _dataset(synth_data)
    path = str(tmp_path_factory.mktemp("kfolds") / "folds.json")
    save_folds(make_folds({k: ds.class_pixels(k).tolist() for k in ds.keys}, k=3, block=1), path)
    return path


def _cv_cmd(synth_data, folds, out, *extra):
    return [sys.executable, "-m", "training.cli", "cv", "--config", QUICK, "--data", os.path.join(synth_data, "train"),
            "--folds", folds, "--out", out, "--device", "cpu", "--no-progress", *TINY_SETS, *extra]


# ---- 1. DDP with the shipped configs' scse attention ------------------------------------------------
def test_shipped_t4_configs_use_scse():
    for name in ("competition_finetune_t4x2.yaml", "hkh_pretrain_t4x2.yaml"):
        assert load_config(os.path.join(ROOT, "configs", name)).model.decoder_attention_type == "scse", name


def test_unused_parameters_are_frozen_and_training_is_unchanged(synth_data, tmp_path, monkeypatch):
    """With scse the probe finds exactly the last decoder block's attention (named by hand
    above) and freezes it; the member then equals one trained with nothing frozen (AdamW
    never updates a parameter without a gradient): the probe moves no BatchNorm statistic
    and no random state. Without attention nothing is frozen."""
    import training.engine.trainer as trainer_mod

    a = _trainer(synth_data, tmp_path / "a", **SCSE, **{"train.epochs": 1})
    ra = a.fit()
    assert sorted(a.unused) == sorted(LAST_BLOCK_ATTENTION)
    assert sorted(n for n, p in a.model.named_parameters() if not p.requires_grad) == sorted(LAST_BLOCK_ATTENTION)
    monkeypatch.setattr(trainer_mod, "unused_parameters", lambda model, bands: [])
    b = _trainer(synth_data, tmp_path / "b", **SCSE, **{"train.epochs": 1})
    rb = b.fit()
    assert b.unused == [] and ra["val_mcc"] == rb["val_mcc"]
    sa = torch.load(ra["path"], weights_only=True)["state_dict"]
    sb = torch.load(rb["path"], weights_only=True)["state_dict"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    monkeypatch.undo()
    plain = _trainer(synth_data, tmp_path / "plain")
    plain.setup_data()
    plain.setup_model()
    assert plain.unused == [] and all(p.requires_grad for p in plain.model.parameters())


def test_ddp_cv_with_scse_trains_to_the_end(synth_data, folds_path, tmp_path):
    """Two gloo ranks, the shipped configs' attention: the second step used to fail with
    "Expected to have finished reduction in the prior iteration"."""
    from training.engine.checkpoint import load_checkpoint

    out = str(tmp_path / "w")
    r = subprocess.run(_cv_cmd(synth_data, folds_path, out, "--fold", "0", "--gpus", "2",
                               "--set", "model.decoder_attention_type=scse",
                               "--set", "model.decoder_channels=[32,32,16,16,16]"),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ck = load_checkpoint(os.path.join(out, "fold0_seed0.pt"))
    assert len(ck["history"]) == 2 and ck["spec"]["decoder_attention_type"] == "scse"


@pytest.mark.slow
def test_ddp_pretrain_with_scse_trains_to_the_end(tmp_path):
    from training.data.hkh import write_fake_hkh

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 8, 2, 64, 0)
    out = str(tmp_path / "pre" / "hkh.pt")
    r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", HKH_QUICK, "--data", data,
                        "--out", out, "--device", "cpu", "--gpus", "2", "--no-progress", *TINY_SETS,
                        "--set", "model.decoder_attention_type=scse", "--set", "model.decoder_channels=[32,32,16,16,16]"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert os.path.exists(out)


# ---- 2. EMA that learns -------------------------------------------------------------------------------
@pytest.mark.parametrize("decay,n", [(0.999, 8), (0.999, 150), (0.9, 3), (0.9, 40)])
def test_ema_initial_share_follows_the_warmup_rule(decay, n):
    """A one-weight model that starts at 1 and is 0 after it: the EMA's value is the initial
    weights' share, which must equal prod over updates t < n of min(decay, (1+t)/(10+t))."""
    from training.engine.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay)
    with torch.no_grad():
        model.weight.fill_(0.0)
    for _ in range(n):
        ema.update(model)
    want = math.prod(min(decay, (1 + t) / (10 + t)) for t in range(n))
    assert ema.steps == n
    assert abs(float(ema.state["weight"]) - want) < 1e-6 and abs(ema.initial_share() - want) < 1e-12
    # without the warm-up, 0.999 over 150 steps would still hold 86 % of the start
    if decay == 0.999 and n == 150:
        assert want < 0.07 < 0.999 ** 150


def test_resume_keeps_the_ema_step_count(synth_data, tmp_path):
    from training.engine.state import restore_state

    class InterruptAfter:
        def on_epoch_end(self, trainer, epoch, row):
            raise KeyboardInterrupt

    t = _trainer(synth_data, tmp_path, **{"train.ema": 0.999, "train.checkpoint_every_s": 0})
    t.callbacks = [InterruptAfter()]
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ck = torch.load(t.last_path, weights_only=True)
    assert ck["ema_steps"] == t.ema.steps == 2  # 8 patches / batch 4 = 2 optimiser steps
    r = _trainer(synth_data, tmp_path, **{"train.ema": 0.999, "train.checkpoint_every_s": 0})
    r.setup_data()
    r.setup_model()
    restore_state(ck, r.device, r.model, r.opt, r.scaler, r.ema, r.plateau)
    assert r.ema.steps == 2


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


def test_summary_says_whether_a_warned_class_recovered():
    from training.runs.summary import render_summary

    warning = "fold 0 seed 0 epoch 3: class debris is not being learned: validation recall 0.000"
    member = {"fold": 0, "seed": 0, "val_mcc": 0.8, "best_epoch": 19, "seconds": 1.0, "per_class": [],
              "class_warnings": [warning],
              "class_outcomes": [{"class": "debris", "warned_epoch": 3, "recovered": True, "final_recall": 0.81,
                                  "final_mcc": 0.758}]}
    text = render_summary({"class_names": ["background"], "members": [member], "mean_val_mcc": 0.8,
                           "std_val_mcc": 0.0, "oof_mcc": None})
    assert warning in text and "debris: recovered by the end (final validation recall 0.810, one-vs-rest MCC 0.758)" in text


# ---- 3./4. a failing rank, and Ctrl-C ------------------------------------------------------------------
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


def test_a_failing_rank_ends_the_run_quickly_with_its_message(synth_data, folds_path, tmp_path):
    """Rank 1 raises in its first step while rank 0 waits in the all-reduce: the run must end
    (not hang for the collective's timeout) and say what failed. The script makes
    ``destroy_process_group`` hang as NCCL's does when a peer sits in a collective (gloo's
    returns), so a failing rank that tears the group down instead of leaving hangs here."""
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    out = str(tmp_path / "w")
    args = _cv_cmd(synth_data, folds_path, out, "--fold", "0")[3:]  # the glacier-train arguments
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    env = dict(_env(), GLACIER_DDP_TIMEOUT_S="600")
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


def _alive(pids):
    from training.engine.launch import alive

    return alive(pids)


@pytest.mark.slow
def test_ctrl_c_on_the_launcher_leaves_no_rank_alive(synth_data, folds_path, tmp_path):
    """SIGINT to `cv --gpus 2`: the launcher forwards it and waits; when it has exited no
    rank process is left, and the lock on --out was held until then (it is gone now)."""
    from training.engine.launch import descendants

    out = str(tmp_path / "w")
    cmd = _cv_cmd(synth_data, folds_path, out, "--fold", "0", "--gpus", "2", "--set", "train.epochs=50")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    family = {}
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.exists(os.path.join(out, ".work", "fold0_seed0", "last.pt")):
        family.update(descendants(proc.pid))
        time.sleep(0.2)
    family.update(descendants(proc.pid))
    ranks = [p for p in family if "training.cli" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")] \
        if family else []
    assert len(family) >= 3, family  # torchrun and its two ranks
    assert os.path.exists(os.path.join(out, ".glacier-lock"))
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, text[-2000:]
    assert _alive(family) == [], (ranks, text[-2000:])
    assert not os.path.exists(os.path.join(out, ".glacier-lock"))


def test_launcher_interrupt_stops_torchrun_and_ranks_that_outlive_it(tmp_path):
    """The stop logic on a stand-in tree: a parent that ignores SIGINT for a moment, and a
    child in its own session that ignores SIGINT and SIGTERM (as a stuck rank would)."""
    from training.engine.launch import descendants, stop_process_tree

    child = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n")
    parent = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    family = {}
    for _ in range(100):
        family = descendants(proc.pid)
        if family:
            break
        time.sleep(0.05)
    assert len(family) == 1
    t0 = time.time()
    stop_process_tree(proc, family)
    assert proc.poll() is not None and _alive(family) == []
    assert time.time() - t0 < 30


def test_pretrain_holds_a_lock_on_its_output(tmp_path):
    from training.engine.runlock import RunLock
    from training.data.hkh import write_fake_hkh

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 4, 2, 64, 0)
    out = str(tmp_path / "hkh.pt")
    with RunLock(out + ".work"):
        r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", HKH_QUICK, "--data", data,
                            "--out", out, "--device", "cpu", "--no-progress", *TINY_SETS],
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "in use by another training run" in r.stderr and "Traceback" not in r.stderr


# ---- 5. pre-training skips a finished run -----------------------------------------------------------
def test_pretrain_skips_a_finished_run_and_force_retrains(tmp_path):
    from training.data.hkh import write_fake_hkh
    from training.runs.pretrain import PretrainDone, check_finished, pretrain

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 4, 2, 64, 0)
    out = str(tmp_path / "pre" / "hkh.pt")
    res = pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False)
    first = os.path.getmtime(out)
    assert res["val_mcc"] is not None
    assert "val MCC" in check_finished(HKH_QUICK, data, out, overrides=dict(TINY))
    with pytest.raises(PretrainDone, match="finished pre-training of this config and data"):
        pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False)
    assert os.path.getmtime(out) == first
    with pytest.raises(ValueError, match="another config, data or seed.*--force"):
        check_finished(HKH_QUICK, data, out, overrides={**TINY, "train.epochs": 3})
    write_fake_hkh(data, 5, 2, 64, 1)  # the data changed
    with pytest.raises(ValueError, match="--force"):
        check_finished(HKH_QUICK, data, out, overrides=dict(TINY))
    assert check_finished(HKH_QUICK, data, out, overrides=dict(TINY), force=True) is None
    pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False, force=True)
    assert os.path.getmtime(out) > first


def test_pretrain_cli_says_it_kept_a_finished_run(tmp_path):
    from training.data.hkh import write_fake_hkh
    from training.runs.pretrain import pretrain

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 4, 2, 64, 0)
    out = str(tmp_path / "hkh.pt")
    pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False)
    r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", HKH_QUICK, "--data", data,
                        "--out", out, "--device", "cpu", "--gpus", "2", "--no-progress", *TINY_SETS],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "kept, nothing to do" in r.stdout and "torch.distributed.run" not in r.stdout


# ---- 6. out of memory inside the optimiser step under a gradient scaler ---------------------------------
def test_oom_between_unscale_and_step_is_redone_with_auto_batch(synth_data, tmp_path, monkeypatch):
    """With a live GradScaler (CPU's here), an OOM raised after ``unscale_`` used to make the
    redo fail with "unscale_() has already been called on this optimizer"."""
    t = _trainer(synth_data, tmp_path, **{"train.auto_batch": True, "train.epochs": 1})
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


# ---- 7. ONNX Runtime on CUDA ------------------------------------------------------------------------
class _FakeSession:
    used = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    made = []

    def __init__(self, blob, sess_options=None, providers=None):
        _FakeSession.made.append(providers)

    def get_providers(self):
        return list(_FakeSession.used)

    def get_inputs(self):
        class _In:
            name, type = "image", "tensor(float)"
        return [_In()]

    def run(self, _, feed):
        x = feed["image"]
        return [np.zeros((x.shape[0], 4) + x.shape[2:], np.float32)]


def _fake_ort(monkeypatch, used):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    _FakeSession.used, _FakeSession.made = used, []


def test_onnx_on_cuda_is_scheduled_as_cuda_on_the_asked_gpu(monkeypatch):
    from glacier_runtime.backends import OnnxRunner
    from glacier_runtime.predictor import Member, Predictor

    _fake_ort(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    runner = OnnxRunner(b"graph", "cuda:1")
    assert _FakeSession.made == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]]
    assert runner.device == torch.device("cuda", 1)
    pred = Predictor([Member(runner, {"mean": [0] * 5, "std": [1] * 5, "lo": [-9] * 5, "hi": [9] * 5})], {"tta": "d4"})
    assert pred._max_batch(pred.members[0]) == 8 and pred._workers(pred.members) == 1
    pred.predict_proba(np.zeros((5, 64, 64), np.float32))
    assert len(_FakeSession.made) == 1  # one session: no per-thread CPU sessions on the GPU


def test_onnx_silent_cpu_fallback_is_reported(monkeypatch, caplog):
    from glacier_runtime.backends import OnnxRunner

    _fake_ort(monkeypatch, ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="glacier.runtime"):
        runner = OnnxRunner(b"graph", "cuda")
    assert runner.device.type == "cpu"
    assert any("asked for CUDA but the session runs on" in r.getMessage() for r in caplog.records)


# ---- 8. evaluate runs the bundle on the CPU by default ------------------------------------------------
def test_evaluate_hides_the_gpus_from_the_bundle_by_default(tiny_members, synth_data, tmp_path, monkeypatch):
    import glacier_submit.evaluate as ev
    from glacier_submit.bundle import build

    build(tiny_members, str(tmp_path / "b"), bias="none", check_size=(64, 64))
    seen = []

    def fake_run_bundle(bundle, data, convention, out_dir, timeout, python, env=None):
        seen.append(env)
        raise SystemExit("stop here")

    monkeypatch.setattr(ev, "run_bundle", fake_run_bundle)
    for device, want in (("cpu", {"CUDA_VISIBLE_DEVICES": "", "GLACIER_DEVICE": "cpu"}), ("cuda", {})):
        with pytest.raises(SystemExit):
            ev.evaluate(str(tmp_path / "b"), os.path.join(synth_data, "unseen"), str(tmp_path / f"r{device}"),
                        device=device)
        assert seen[-1] == want


def test_device_cuda_without_a_gpu_is_an_error_before_any_process(synth_data, folds_path, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    cmd = [c if c != "cpu" else "cuda" for c in _cv_cmd(synth_data, folds_path, str(tmp_path / "w"), "--gpus", "2")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--device cuda, but torch sees no GPU" in r.stderr and "Traceback" not in r.stderr
    assert "torch.distributed.run" not in r.stdout


# ---- 9. (fold, seed) jobs from one queue ---------------------------------------------------------------
def test_two_workers_share_ten_jobs_five_and_five(tmp_path):
    """Five folds x two seeds on two equally fast workers: 5 + 5 (folds dealt by worker gave 6 + 4)."""
    from training.runs.jobqueue import JobQueue

    jobs = [(f, s) for f in range(5) for s in range(2)]
    q = JobQueue(str(tmp_path / "q"))
    q.fill(jobs)
    got = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(w):
        for job in q.jobs(w):
            got[w].append(job)
            q.done(w, job)
            barrier.wait()  # equal job times

    threads = [threading.Thread(target=worker, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(got[0] + got[1]) == sorted(jobs) and len(got[0]) == len(got[1]) == 5
    assert q.claimed() == [] and q.unclaimed() == []


def test_a_dead_workers_claim_names_its_unfinished_job(tmp_path):
    from training.runs.jobqueue import JobQueue

    q = JobQueue(str(tmp_path / "q"))
    q.fill([(0, 0), (1, 0), (2, 0)])
    assert q.claim(0) == (0, 0) and q.claim(1) == (1, 0)
    q.done(0, (0, 0))
    assert q.claimed() == [(1, (1, 0))] and q.unclaimed() == [(2, 0)]
    assert q.claim(0) == (2, 0) and q.claim(0) is None


@pytest.mark.slow
def test_fold_parallel_takes_jobs_from_the_queue(synth_data, folds_path, tmp_path):
    from training.engine.checkpoint import load_checkpoint

    out = str(tmp_path / "cv_par")
    r = subprocess.run(_cv_cmd(synth_data, folds_path, out, "--fold", "0", "--fold", "1", "--parallel-folds", "2"),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "worker 0 (CPU, jobs from the shared queue)" in r.stdout and "worker 1 (CPU" in r.stdout
    for f in (0, 1):
        assert load_checkpoint(os.path.join(out, f"fold{f}_seed0.pt"))["fold"] == f
    summary = json.load(open(os.path.join(out, "cv_summary.json")))
    assert sorted(m["fold"] for m in summary["members"]) == [0, 1]


@pytest.mark.slow
def test_killed_worker_leaves_a_summary_of_what_finished(synth_data, folds_path, tmp_path):
    """Worker 1 is killed once it holds a job: the other worker finishes the rest, the
    summary covers every finished member, and the error names exactly the unfinished job."""
    out = str(tmp_path / "w")
    cmd = _cv_cmd(synth_data, folds_path, out, "--fold", "0", "--fold", "1", "--seeds", "0", "--seeds", "1",
                  "--parallel-folds", "2", "--set", "train.epochs=3")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    queue = os.path.join(out, ".work", "queue")
    victim, deadline = None, time.time() + 300
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    lines = []
    reader.start()
    while victim is None and time.time() < deadline:
        claims = [n for n in (os.listdir(queue) if os.path.isdir(queue) else []) if n.startswith("claimed-1-")]
        pids = [int(line.split("pid ")[1].split(",")[0]) for line in list(lines) if line.startswith("worker 1 (")]
        if claims and pids:
            victim, job = pids[0], claims[0].split("-", 3)[3]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.05)
    proc.wait(timeout=900)
    reader.join(timeout=10)
    text = "".join(lines)
    assert victim is not None and proc.returncode != 0, text[-3000:]
    fold, seed = (int(x) for x in job.replace("fold", "").split("_seed"))
    assert f"not finished: fold {fold} seed {seed}" in text and "nothing was retrained" in text
    summary = json.load(open(os.path.join(out, "cv_summary.json")))
    done = sorted((m["fold"], m["seed"]) for m in summary["members"])
    assert done == sorted({(0, 0), (0, 1), (1, 0), (1, 1)} - {(fold, seed)})


# ---- 10. smaller ------------------------------------------------------------------------------------------
def test_last_checkpoint_is_time_based(synth_data, tmp_path):
    """last.pt after the first epoch, then only when train.checkpoint_every_s has passed."""
    seen = []

    class Watch:
        def on_epoch_end(self, trainer, epoch, row):
            seen.append(torch.load(trainer.last_path, weights_only=True)["epoch"])

    t = _trainer(synth_data, tmp_path, **{"train.epochs": 2, "train.checkpoint_every_s": 3600})
    t.callbacks = [Watch()]
    t.fit()
    assert seen == [0, 0]  # every epoch at 0: the resume tests of the trainer and cv cover it


def test_augmentation_differs_between_ranks():
    """Under DDP rank r's i-th patch must not get rank 0's i-th augmentation; rank 0 keeps the
    one-process augmentation."""
    from training.data.augment import build_augment
    from training.data.patches import PatchDataset

    cfg = load_config(QUICK).augment
    img = {"t": np.random.default_rng(0).standard_normal((5, 64, 64)).astype(np.float32)}
    lab = {"t": np.zeros((64, 64), np.uint8)}
    patches = [("t", 0, 0, 0)]

    def item(rank):
        return PatchDataset(img, lab, patches, 64, 4, build_augment(cfg), seed=3, epoch=1, rank=rank)[0][0]

    assert not torch.equal(item(0), item(1))
    aug = build_augment(cfg)
    aug.set_random_seed(int((3 * 1_000_003 + 1 * 10_007 + 0) % (2**31)))  # the one-process formula
    ref = aug(image=np.ascontiguousarray(img["t"].transpose(1, 2, 0)), mask=lab["t"])["image"]
    assert torch.equal(item(0), torch.from_numpy(np.ascontiguousarray(ref.transpose(2, 0, 1))))


def test_loader_workers_are_split_between_ranks(synth_data, tmp_path):
    from training.engine.distributed import DistContext
    from training.engine.launch import split_cpus
    from training.engine.trainer import Trainer

    ds = _dataset(synth_data)
    cfg = load_config(QUICK, {**TINY, "train.num_workers": 4})
    t = Trainer(cfg, ds, ["00_00"], [], 0, 0, str(tmp_path / "m.pt"), str(tmp_path / "w"),
                DistContext(rank=0, world=2), progress=False)
    assert t.num_workers == split_cpus(2, 4)["loader_workers"] <= 2


def test_notebook_builds_an_honest_held_out_bundle():
    """The notebook's held-out bundle does not fit anything on the members' OOF predictions."""
    nb = json.load(open(os.path.join(ROOT, "notebooks", "kaggle_dual_t4.ipynb")))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    flags = code.split('HELDOUT_BUILD_FLAGS = "')[1].split('"')[0].split()
    assert flags[flags.index("--bias") + 1] == "none" and "--tune" not in flags
    assert "{HELDOUT_BUILD_FLAGS}" in code


def test_held_out_bundle_with_a_fitted_bias_is_refused_and_the_fix_named(tmp_path, synth_data):
    """Members whose OOF predictions make --bias auto fit a non-zero bias: the default build's
    bundle is refused on the held-out fold and the message names --bias none; the notebook's
    flags give a bundle that evaluates."""
    from glacier_submit.bundle import build
    from glacier_submit.evaluate import LeakError, evaluate
    from tests.conftest import make_member
    from training.data.competition import CompetitionDataset
    from training.folds import data_provenance, dataset_files, save_folds

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = sorted(ds.keys)
    val, train = keys[:2], keys[2:]
    folds = {"folds": [{"fold": 0, "val": val, "train": train, "val_class_pixels": []}],
             "provenance": data_provenance(dataset_files(ds))}
    folds_path = str(tmp_path / "folds.json")
    save_folds(folds, folds_path)
    w = tmp_path / "weights"
    member = make_member(str(w / "fold0_seed0.pt"), train_tiles=train, val_tiles=val)
    rng = np.random.default_rng(0)
    for key in val:  # OOF that under-predicts the rare classes: --bias auto moves them
        lab = ds.label(key)
        p = np.full((4,) + lab.shape, 0.05, np.float32)
        p[0] += 0.5
        for c in (1, 2, 3):
            p[c][lab == c] += 0.42
        p += 0.01 * rng.random(p.shape).astype(np.float32)
        os.makedirs(w / "oof" / "fold0_seed0", exist_ok=True)
        os.makedirs(w / "oof" / "labels", exist_ok=True)
        np.save(w / "oof" / "fold0_seed0" / f"{key}.npy", (p / p.sum(0)).astype(np.float16))
        np.save(w / "oof" / "labels" / f"{key}.npy", lab)
    m = build([member], str(tmp_path / "auto"), check_size=(64, 64))
    assert any(v != 0 for v in m["bias"]["values"])
    with pytest.raises(LeakError, match="--bias none"):
        evaluate(str(tmp_path / "auto"), os.path.join(synth_data, "train"), str(tmp_path / "r1"), fold=0,
                 folds=folds_path, figures=False)
    nb = json.load(open(os.path.join(ROOT, "notebooks", "kaggle_dual_t4.ipynb")))
    code = "\n".join("".join(c["source"]) for c in nb["cells"])
    flags = code.split('HELDOUT_BUILD_FLAGS = "')[1].split('"')[0].split()
    kw = {"tta": flags[flags.index("--tta") + 1], "postprocess": flags[flags.index("--postprocess") + 1],
          "bias": flags[flags.index("--bias") + 1]}
    build([member], str(tmp_path / "honest"), check_size=(64, 64), **kw)
    r = evaluate(str(tmp_path / "honest"), os.path.join(synth_data, "train"), str(tmp_path / "r2"), fold=0,
                 folds=folds_path, figures=False)
    assert not r["leaky"] and "mcc" in r
