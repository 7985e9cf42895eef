"""Processes around training: worker devices from CUDA_VISIBLE_DEVICES, the CPU split between
workers, a killed worker reported with its log tail."""
import os
import signal
import sys

import pytest

from training.engine.launch import Worker, describe_rc, run_workers, split_cpus, visible_devices, worker_devices


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
