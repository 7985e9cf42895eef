"""Processes around training: fold-parallel workers that fail loudly, device mapping,
CPU split, the --out lock, member reuse, DDP on an uneven patch count."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cv import _env
from training.engine.launch import Worker, describe_rc, run_workers, split_cpus, visible_devices, worker_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "train.epochs=2", "--set", "train.patches_per_epoch=8", "--set", "train.batch_size=4",
        "--set", "train.patch_size=64", "--set", "model.decoder_channels=[16,16,16,8,8]",
        "--set", "train.warmup_epochs=0", "--no-progress"]


def _cmd(data, folds, out, *extra):
    return [sys.executable, "-m", "training.cli", "cv", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            "--data", data, "--folds", folds, "--out", out, "--device", "cpu", *TINY, *extra]


@pytest.fixture(scope="module")
def folds_file(synth_data, tmp_path_factory):
    from training.data.competition import CompetitionDataset
    from training.folds import make_folds, save_folds

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    f = make_folds({k: ds.class_pixels(k).tolist() for k in ds.keys}, k=3, block=1)
    path = str(tmp_path_factory.mktemp("folds") / "folds.json")
    save_folds(f, path)
    return path


# ---- devices and CPU split ------------------------------------------------------------------
def test_worker_devices_follow_the_users_cuda_visible_devices():
    assert worker_devices(2, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert worker_devices(2, {"CUDA_VISIBLE_DEVICES": "GPU-a1, GPU-b2, GPU-c3"}) == ["GPU-a1", "GPU-b2"]
    assert worker_devices(2, {}, device_count=2) == ["0", "1"]
    assert worker_devices(3, {}, device_count=0) == [None, None, None]  # CPU workers
    assert worker_devices(2, {"CUDA_VISIBLE_DEVICES": "-1"}, device_count=4) == [None, None]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}, device_count=4) is None
    with pytest.raises(ValueError, match="--parallel-folds 2 needs 2 GPUs.*CUDA_VISIBLE_DEVICES=3"):
        worker_devices(2, {"CUDA_VISIBLE_DEVICES": "3"})


def test_cpu_split_between_workers():
    assert split_cpus(2, 4, cpus=4) == {"threads": 2, "loader_workers": 1}  # Kaggle: 4 vCPUs, 2 workers
    assert split_cpus(2, 0, cpus=4) == {"threads": 2, "loader_workers": 0}
    assert split_cpus(4, 8, cpus=2) == {"threads": 1, "loader_workers": 0}
    assert split_cpus(1, 4, cpus=16) == {"threads": 16, "loader_workers": 4}


# ---- workers that fail loudly ---------------------------------------------------------------
def test_killed_worker_is_reported_with_its_log_tail(tmp_path):
    """rc -9 (SIGKILL, the OOM killer's signal) is a failure, never max()-ed into 0; the
    other worker still finishes; the report carries the dead worker's last lines."""
    dead = ("import os, signal, sys\nfor i in range(60): print('line', i, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    fine = "import time; time.sleep(0.5); print('worker one done', flush=True)"
    ws = [Worker(0, [sys.executable, "-c", dead], dict(os.environ), "CPU, folds [0]", str(tmp_path / "w0.log")),
          Worker(1, [sys.executable, "-c", fine], dict(os.environ), "CPU, folds [1]", str(tmp_path / "w1.log"))]
    said = []
    out = open(tmp_path / "relay.txt", "w")
    failed = run_workers(ws, out=out, echo=said.append)
    out.close()
    assert [w.wid for w in failed] == [0] and ws[0].rc == -signal.SIGKILL and ws[1].rc == 0
    report = "\n".join(said)
    assert "worker 0 (CPU, folds [0]) FAILED: killed by SIGKILL" in report
    assert "line 59" in report and "line 0\n" not in report  # the tail, not the whole log
    assert "worker one done" in open(tmp_path / "relay.txt").read()
    assert "line 59" in open(tmp_path / "w0.log").read()
    assert describe_rc(3) == "exited with status 3"


def test_gpus_with_parallel_folds_is_a_clear_error(synth_data, folds_file, tmp_path):
    r = subprocess.run(_cmd(os.path.join(synth_data, "train"), folds_file, str(tmp_path / "o"), "--gpus", "2",
                            "--parallel-folds", "2"), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--gpus and --parallel-folds cannot be combined" in r.stderr
    assert not os.path.exists(str(tmp_path / "o"))


def test_child_arguments_come_from_parsed_parameters():
    from training.runs.cv import CvRun

    run = CvRun(config=os.path.join(ROOT, "configs", "quickstart.yaml"), data=ROOT, folds_path=os.path.join(ROOT, "pyproject.toml"), out="o", seeds=(0, 1), only_folds=(2,),
                sets=("train.epochs=3",), verbose=True, worker=1, loader_workers=0, parent_lock=True)
    args = run.cli_args()
    assert args[:2] == ["-v", "cv"]  # -v reaches the children
    # round trip through the real command-line parser: the child sees the same run
    from training.cli import cv_command

    ctx = cv_command.make_context("cv", list(args[2:]))
    p = ctx.params
    assert (p["seeds"], p["only_folds"], p["sets"], p["worker_id"], p["loader_workers"], p["parent_lock"]) == \
        ((0, 1), (2,), ("train.epochs=3",), 1, 0, True)
    assert p["gpus"] == 1 and p["parallel_folds"] == 1 and p["folds_path"].endswith("pyproject.toml")


# ---- the --out lock -------------------------------------------------------------------------
def test_second_run_on_the_same_out_names_the_holder(synth_data, folds_file, tmp_path):
    out = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from training.engine.runlock import RunLock\n"
                               f"l = RunLock({str(out)!r}, 'glacier-train cv (test holder)').acquire()\n"
                               "print('locked', flush=True); time.sleep(60)"],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run(_cmd(os.path.join(synth_data, "train"), folds_file, str(out), "--fold", "0"),
                           env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert f"process {holder.pid}" in r.stderr and "test holder" in r.stderr
        assert not any(n.endswith(".pt") for n in os.listdir(out))
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    from training.engine.runlock import LOCK_NAME, RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "command": "old run"}))
    lock = RunLock(str(tmp_path)).acquire()
    try:
        assert lock.took_over["pid"] == dead.pid
        assert json.load(open(tmp_path / LOCK_NAME))["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


# ---- members reused only when they belong to this run -----------------------------------------
def test_member_from_other_folds_stops_the_run(synth_data, folds_file, tmp_path):
    """A finished member trained on other tiles is not "done already": the run stops and
    names the difference (the old code reused it and mixed it into the OOF score)."""
    from tests.conftest import make_member

    out = tmp_path / "w"
    out.mkdir()
    make_member(str(out / "fold0_seed0.pt"), fold=0, train_tiles=["00_00"], val_tiles=["00_01"])
    r = subprocess.run(_cmd(os.path.join(synth_data, "train"), folds_file, str(out), "--fold", "0"),
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "fold0_seed0.pt" in r.stderr and "training tiles differ" in r.stderr and "--force-retrain" in r.stderr
    assert "done already" not in r.stdout


def test_force_retrain_removes_stale_members_and_their_oof(tmp_path, folds_file):
    from tests.conftest import make_member
    from training.config import load_config
    from training.rundir import RunDir
    from training.runs.members import resolve_members, stale_members
    from training.runs.run import CvError

    folds = json.load(open(folds_file))
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml")).model_dump()
    f0 = folds["folds"][0]
    good = make_member(str(tmp_path / "fold0_seed0.pt"), fold=0, train_tiles=f0["train"], val_tiles=f0["val"])
    import torch

    ck = torch.load(good, weights_only=True)
    ck["config"] = cfg
    torch.save(ck, good)
    other = dict(ck, config={**cfg, "train": {**cfg["train"], "epochs": 99, "num_workers": 7}})
    torch.save(other, str(tmp_path / "fold0_seed1.pt"))
    torch.save(dict(ck, fold=9), str(tmp_path / "fold9_seed0.pt"))
    for name in ("fold0_seed0", "fold0_seed1", "fold9_seed0", "fold1_seed0"):
        os.makedirs(tmp_path / "oof" / name)
    problems = stale_members(str(tmp_path), folds, folds_file, cfg)
    assert set(problems) == {(0, 1), (9, 0)}
    assert problems[(0, 1)] == ["train.epochs: 99 in the member, 20 in this run"]  # num_workers ignored
    assert "fold 9 is not in" in problems[(9, 0)][0]
    with pytest.raises(CvError, match="train.epochs: 99"):
        resolve_members(str(tmp_path), folds, folds_file, cfg, force=False, echo=print)
    said = []
    resolve_members(str(tmp_path), folds, folds_file, cfg, force=True, echo=said.append)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt")) == ["fold0_seed0.pt"]
    RunDir(str(tmp_path)).prune_oof(k for f in folds["folds"] for k in f["val"])
    assert os.listdir(tmp_path / "oof") == ["fold0_seed0"]  # exactly the members present


# ---- slow: real training subprocesses ----------------------------------------------------------
@pytest.mark.slow
def test_fold_parallel_worker_killed_fails_the_run(synth_data, folds_file, tmp_path):
    out = str(tmp_path / "w")
    cmd = _cmd(os.path.join(synth_data, "train"), folds_file, out, "--fold", "0", "--fold", "1",
               "--parallel-folds", "2", "--set", "train.epochs=3")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    victim = None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("worker 1 (") and "pid " in line:
            victim = int(line.split("pid ")[1].split(",")[0])
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=600)
    text = "".join(lines)
    assert victim is not None, text
    assert proc.returncode != 0, text
    assert "worker 1 (CPU, folds [1]) FAILED: killed by SIGKILL" in text
    assert "folds [1] are not finished" in text and "nothing was retrained" in text
    assert os.path.exists(os.path.join(out, "fold0_seed0.pt"))       # the other worker finished
    assert not os.path.exists(os.path.join(out, "fold1_seed0.pt"))   # and nobody retrained fold 1
    assert "[worker 0] fold 0 seed 0 | epoch 3/3" in text            # worker lines carry their id


@pytest.mark.slow
def test_ddp_uneven_patch_count_does_not_hang(synth_data, folds_file, tmp_path):
    """7 patches, batch 2, two gloo ranks: the old shard gave 4 and 3 patches -> 2 and 1
    steps, and rank 0 waited forever in the all-reduce."""
    out = str(tmp_path / "ddp")
    cmd = _cmd(os.path.join(synth_data, "train"), folds_file, out, "--fold", "0", "--gpus", "2",
               "--set", "train.patches_per_epoch=7", "--set", "train.batch_size=2", "--set", "train.accumulate=2")
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    from training.engine.checkpoint import load_checkpoint

    assert len(load_checkpoint(os.path.join(out, "fold0_seed0.pt"))["history"]) == 2
