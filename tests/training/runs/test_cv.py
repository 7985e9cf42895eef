"""glacier-train cv end to end on tiny synthetic data: outputs, skip-finished, kill-and-resume,
DDP (gloo), fold-parallel workers (a killed one fails the run), a diverged member that does not
stop the others, config errors before any tile is read."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml

from training.engine.checkpoint import REQUIRED, load_checkpoint
from training.engine.guards import nonfinite_tensors

from tests.helpers import (QUICK, ROOT, cv_cmd, cv_cmd_any_fold, encoder_file, kaggle_cv_cmd, kill_after_first_epoch, repo_env)
import threading


@pytest.fixture(scope="module")
def uninterrupted(synth_data, folds_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cv_a"))
    r = subprocess.run(cv_cmd(os.path.join(synth_data, "train"), folds_file, out), env=repo_env(),
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
    assert ck["fold_grouping"] == folds.get("grouping", {})  # what `build --tune oof` reads about its evidence
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
    r = subprocess.run(cv_cmd(os.path.join(synth_data, "train"), folds_file, out), env=repo_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done already" in r.stdout
    assert os.path.getmtime(os.path.join(out, "fold0_seed0.pt")) == before


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(uninterrupted, synth_data, folds_file, tmp_path):
    ref_out, _ = uninterrupted
    out = str(tmp_path / "cv_b")
    cmd = cv_cmd(os.path.join(synth_data, "train"), folds_file, out)
    kill_after_first_epoch(cmd, out)
    assert not os.path.exists(os.path.join(out, "fold0_seed0.pt"))
    r = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=300)
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
    r = subprocess.run(cv_cmd(os.path.join(synth_data, "train"), folds_file, out, "--gpus", "2"),
                       env=repo_env(), capture_output=True, text=True, timeout=400)
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
    r = subprocess.run(cv_cmd(os.path.join(synth_data, "train"), str(bad), str(tmp_path / "o")), env=repo_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "99_99" in r.stderr and "Traceback" not in r.stderr




def test_gpus_with_parallel_folds_is_a_clear_error(synth_data, folds_file, tmp_path):
    r = subprocess.run(cv_cmd_any_fold(os.path.join(synth_data, "train"), folds_file, str(tmp_path / "o"), "--gpus", "2",
                            "--parallel-folds", "2"), env=repo_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--gpus and --parallel-folds cannot be combined" in r.stderr
    assert not os.path.exists(str(tmp_path / "o"))




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
    """A diverging run as a user starts it: `--set train.lr=1e30` used to exit 0 with NaN members."""
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


def _cfg_file(tmp_path, model):
    raw = yaml.safe_load(open(QUICK))
    raw["model"].update(model)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


@pytest.mark.parametrize("kind", ["imagenet", "3-band file"])
def test_cv_refuses_before_reading_data(tmp_path, monkeypatch, kind):
    """`glacier-train cv` stops at config validation: no tile is opened."""
    from click.testing import CliRunner

    import training.data.competition as comp
    from training.cli import cv_command

    opened = []

    def _no_data(*a, **k):
        opened.append(a)
        raise AssertionError("data read before the config was validated")

    monkeypatch.setattr(comp, "CompetitionDataset", _no_data)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    weights = "imagenet" if kind == "imagenet" else encoder_file(tmp_path, 3)[0]
    cfg = _cfg_file(tmp_path, {"encoder_weights": weights})
    data = tmp_path / "data"
    data.mkdir()
    folds = tmp_path / "folds.json"
    folds.write_text('{"folds": []}')
    r = CliRunner().invoke(cv_command, ["--config", cfg, "--data", str(data), "--folds", str(folds),
                                        "--out", str(tmp_path / "w"), "--device", "cpu", "--no-progress"])
    assert r.exit_code != 0 and not opened
    # imagenet with an empty cache (HF_HUB_OFFLINE in the test): the cache files to fill, before any data
    assert ("not in the cache and cannot be downloaded" if kind == "imagenet" else "made for 3 input bands") in r.output, r.output
    assert not os.path.exists(tmp_path / "w")


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_ddp_cv_with_scse_trains_to_the_end(synth_data, folds_file, tmp_path):
    """Two gloo ranks, the shipped configs' attention: the second step used to fail with
    "Expected to have finished reduction in the prior iteration"."""
    from training.engine.checkpoint import load_checkpoint

    out = str(tmp_path / "w")
    r = subprocess.run(kaggle_cv_cmd(synth_data, folds_file, out, "--fold", "0", "--gpus", "2",
                               "--set", "model.decoder_attention_type=scse",
                               "--set", "model.decoder_channels=[32,32,16,16,16]"),
                       env=repo_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ck = load_checkpoint(os.path.join(out, "fold0_seed0.pt"))
    assert len(ck["history"]) == 2 and ck["spec"]["decoder_attention_type"] == "scse"


def test_device_cuda_without_a_gpu_is_an_error_before_any_process(synth_data, folds_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    cmd = [c if c != "cpu" else "cuda" for c in kaggle_cv_cmd(synth_data, folds_file, str(tmp_path / "w"), "--gpus", "2")]
    r = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--device cuda, but torch sees no GPU" in r.stderr and "Traceback" not in r.stderr
    assert "torch.distributed.run" not in r.stdout


@pytest.mark.slow
def test_fold_parallel_takes_jobs_from_the_queue(synth_data, folds_file, tmp_path):
    from training.engine.checkpoint import load_checkpoint

    out = str(tmp_path / "cv_par")
    r = subprocess.run(kaggle_cv_cmd(synth_data, folds_file, out, "--fold", "0", "--fold", "1", "--parallel-folds", "2"),
                       env=repo_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "worker 0 (CPU, jobs from the shared queue)" in r.stdout and "worker 1 (CPU" in r.stdout
    for f in (0, 1):
        assert load_checkpoint(os.path.join(out, f"fold{f}_seed0.pt"))["fold"] == f
    summary = json.load(open(os.path.join(out, "cv_summary.json")))
    assert sorted(m["fold"] for m in summary["members"]) == [0, 1]


@pytest.mark.slow
def test_killed_worker_leaves_a_summary_of_what_finished(synth_data, folds_file, tmp_path):
    """Worker 1 is killed once it holds a job: the other worker finishes the rest, the
    summary covers every finished member, and the error names exactly the unfinished job."""
    out = str(tmp_path / "w")
    cmd = kaggle_cv_cmd(synth_data, folds_file, out, "--fold", "0", "--fold", "1", "--seeds", "0", "--seeds", "1",
                  "--parallel-folds", "2", "--set", "train.epochs=3")
    proc = subprocess.Popen(cmd, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
