"""Processes around training: worker devices from CUDA_VISIBLE_DEVICES, the CPU split between
workers, a killed worker reported with its log tail."""
import os
import shutil
import signal
import sys

import pytest

from training.engine.launch import Worker, describe_rc, run_workers, split_cpus, visible_devices, worker_devices
import subprocess
import time
from tests.helpers import kaggle_cv_cmd, repo_env


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


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def _alive(pids):
    from training.engine.launch import alive

    return alive(pids)


@pytest.mark.slow
def test_ctrl_c_on_the_launcher_leaves_no_rank_alive(synth_data, folds_file, tmp_path):
    """SIGINT to `cv --gpus 2`: the launcher forwards it and waits; when it has exited no
    rank process is left, and the lock on --out was held until then (it is gone now)."""
    from training.engine.launch import descendants

    out = str(tmp_path / "w")
    cmd = kaggle_cv_cmd(synth_data, folds_file, out, "--fold", "0", "--gpus", "2", "--set", "train.epochs=50")
    proc = subprocess.Popen(cmd, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def test_launcher_interrupt_stops_torchrun_and_ranks_that_outlive_it(tmp_path, monkeypatch):
    """The stop logic on a stand-in tree: a parent that ignores SIGINT for a moment, and a
    child in its own session that ignores SIGINT and SIGTERM (as a stuck rank would)."""
    import training.engine.launch as launch
    from training.engine.launch import descendants, stop_process_tree

    monkeypatch.setattr(launch, "STOP_GRACE_S", (5.0, 1.0))  # the stuck child ignores SIGTERM: do not wait 10 s

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


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_cores_are_counted_from_the_affinity_not_the_machine():
    """A SLURM step or a container's cpuset gives a process fewer cores than the machine has."""
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                        "from training.engine.launch import split_cpus, usable_cpus; print(usable_cpus(), split_cpus(1, 4))"],
                       env=repo_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "1" and "'threads': 1" in r.stdout
