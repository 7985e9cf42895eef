"""End-to-end CV on tiny synthetic data: outputs, skip-finished, kill-and-resume, DDP (gloo)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from training.engine.checkpoint import REQUIRED, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "train.epochs=3", "--set", "train.patches_per_epoch=8", "--set", "train.batch_size=4",
        "--set", "train.patch_size=64", "--set", "model.decoder_channels=[16,16,16,8,8]",
        "--set", "train.warmup_epochs=0", "--no-progress"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def _cmd(data, folds, out, *extra):
    return [sys.executable, "-m", "training.cli", "cv", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            "--data", data, "--folds", folds, "--out", out, "--fold", "0", "--device", "cpu", *TINY, *extra]


def kill_after_first_epoch(cmd, out) -> str:
    """Start a CV run, SIGKILL it as soon as fold 0's last.pt exists; returns that path."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(out, ".work", "fold0_seed0", "last.pt")
    deadline = time.time() + 240
    while not os.path.exists(last) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return last


@pytest.fixture(scope="module")
def folds_file(synth_data, tmp_path_factory):
    from training.data.competition import CompetitionDataset
    from training.folds import make_folds, save_folds

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    f = make_folds({k: ds.class_pixels(k).tolist() for k in ds.keys}, k=3, block=1)
    path = str(tmp_path_factory.mktemp("folds") / "folds.json")
    save_folds(f, path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(synth_data, folds_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cv_a"))
    r = subprocess.run(_cmd(os.path.join(synth_data, "train"), folds_file, out), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_cv_outputs(uninterrupted, folds_file, synth_data):
    out, stdout = uninterrupted
    ck = load_checkpoint(os.path.join(out, "fold0_seed0.pt"))
    assert all(k in ck for k in REQUIRED)
    folds = json.load(open(folds_file))
    assert ck["train_tiles"] == folds["folds"][0]["train"] and ck["val_tiles"] == folds["folds"][0]["val"]
    assert len(ck["history"]) == 3 and "val_mcc" in ck["history"][-1]
    assert ck["stats"]["bands"] == ["B2", "B3", "B4", "B6", "B10"] and len(ck["stats"]["mean"]) == 5
    assert ck["class_map"]["values"] == [0, 85, 170, 255]
    assert "optimizer" not in ck  # members are lean; optimiser state lives only in last.pt
    summary = json.load(open(os.path.join(out, "cv_summary.json")))
    assert summary["members"][0]["fold"] == 0 and summary["oof_mcc"] is not None
    for key in ck["val_tiles"]:
        arr = np.load(os.path.join(out, "oof", "fold0_seed0", f"{key}.npy"))
        assert arr.dtype == np.float16 and arr.shape[0] == 4
    assert os.path.exists(os.path.join(out, "logs", "fold0_seed0.csv"))
    # pooled OOF per-class recall/IoU against sklearn on the saved OOF arrays and labels
    from sklearn.metrics import jaccard_score, recall_score

    from training.data.competition import CompetitionDataset

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    t = np.concatenate([ds.label(k).ravel() for k in ck["val_tiles"]])
    p = np.concatenate([np.load(os.path.join(out, "oof", "fold0_seed0", f"{k}.npy")).astype(np.float32).argmax(0).ravel()
                        for k in ck["val_tiles"]])
    present = [c for c in range(4) if (t == c).any()]
    got = {c["class"]: c for c in summary["oof_per_class"]}
    names = summary["class_names"]
    for c, r in zip(present, recall_score(t, p, labels=present, average=None, zero_division=0)):
        assert got[names[c]]["recall"] == pytest.approx(r, abs=1e-9)
    for c, j in zip(present, jaccard_score(t, p, labels=present, average=None, zero_division=0)):
        assert got[names[c]]["iou"] == pytest.approx(j, abs=1e-9)
    assert summary["grade"]["grade"] in ("below pass", "pass", "good", "excellent")
    log = open(os.path.join(out, "training_log.txt")).read()
    assert "grade:" in log and "mean_fold_mcc" in log and "IoU" in log
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert not os.path.exists(os.path.join(out, ".work", "fold0_seed0", "last.pt"))
    assert "val MCC" in stdout


def test_finished_members_are_skipped(uninterrupted, synth_data, folds_file):
    out, _ = uninterrupted
    before = os.path.getmtime(os.path.join(out, "fold0_seed0.pt"))
    r = subprocess.run(_cmd(os.path.join(synth_data, "train"), folds_file, out), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done already" in r.stdout
    assert os.path.getmtime(os.path.join(out, "fold0_seed0.pt")) == before


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(uninterrupted, synth_data, folds_file, tmp_path):
    ref_out, _ = uninterrupted
    out = str(tmp_path / "cv_b")
    cmd = _cmd(os.path.join(synth_data, "train"), folds_file, out)
    kill_after_first_epoch(cmd, out)
    assert not os.path.exists(os.path.join(out, "fold0_seed0.pt"))
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after epoch" in r.stderr
    a = load_checkpoint(os.path.join(ref_out, "fold0_seed0.pt"))
    b = load_checkpoint(os.path.join(out, "fold0_seed0.pt"))
    assert [h["val_mcc"] for h in a["history"]] == [h["val_mcc"] for h in b["history"]]
    assert [h["loss_total"] for h in a["history"]] == [h["loss_total"] for h in b["history"]]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


@pytest.mark.slow
def test_ddp_two_gloo_processes(uninterrupted, synth_data, folds_file, tmp_path):
    """Two gloo ranks train one member: the saved member differs from the one-process run
    of the same seed (each rank sees half the patches: 8 / 2 ranks / batch 4 = one step per
    epoch instead of two), and the out-of-fold arrays rank 0 saved are that member's own
    predictions on every validation tile (masked pixels as background)."""
    from glacier_runtime.predictor import Predictor
    from glacier_submit.members import load_members, make_payload
    from training.data.competition import CompetitionDataset

    out = str(tmp_path / "cv_ddp")
    r = subprocess.run(_cmd(os.path.join(synth_data, "train"), folds_file, out, "--gpus", "2"),
                       env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "torch.distributed.run" in r.stdout and "--nproc_per_node=2" in r.stdout
    path = os.path.join(out, "fold0_seed0.pt")
    ck = load_checkpoint(path)
    assert len(ck["history"]) == 3
    single = load_checkpoint(os.path.join(uninterrupted[0], "fold0_seed0.pt"))
    assert any(not torch.equal(ck["state_dict"][k], single["state_dict"][k])
               for k in ck["state_dict"] if ck["state_dict"][k].is_floating_point())
    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    pred = Predictor.from_payload(make_payload(load_members([path]), {"tta": "none"}), device="cpu")
    assert sorted(os.listdir(os.path.join(out, "oof", "fold0_seed0"))) == sorted(f"{k}.npy" for k in ck["val_tiles"])
    for key in ck["val_tiles"]:
        img = ds.image(key)
        want = pred.masked_to_background(pred.predict_proba(img), pred.masked(img))
        saved = np.load(os.path.join(out, "oof", "fold0_seed0", f"{key}.npy")).astype(np.float32)
        assert np.abs(saved - want).max() < 2e-2, key


def test_cv_bad_folds_file(synth_data, tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text(json.dumps({"folds": [{"fold": 0, "train": ["99_99"], "val": ["00_00"]}]}))
    r = subprocess.run(_cmd(os.path.join(synth_data, "train"), str(bad), str(tmp_path / "o")), env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "99_99" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_fold_parallel_two_workers(synth_data, folds_file, tmp_path):
    out = str(tmp_path / "cv_par")
    cmd = [c for c in _cmd(os.path.join(synth_data, "train"), folds_file, out) if c not in ("--fold",)]
    cmd.remove("0")  # drop the "--fold 0" pair: train folds 0 and 1 in two processes
    cmd += ["--fold", "0", "--fold", "1", "--parallel-folds", "2"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "worker 0 (CPU, folds [0])" in r.stdout and "worker 1 (CPU, folds [1])" in r.stdout
    for f in (0, 1):
        assert load_checkpoint(os.path.join(out, f"fold{f}_seed0.pt"))["fold"] == f
    summary = json.load(open(os.path.join(out, "cv_summary.json")))
    assert sorted(m["fold"] for m in summary["members"]) == [0, 1]
