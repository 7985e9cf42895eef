"""The --out lock: a second run on the same folder names the holder; a dead holder's lock is taken
over."""
import json
import os
import subprocess
import sys

from tests.helpers import cv_cmd_any_fold, repo_env


def test_second_run_on_the_same_out_names_the_holder(synth_data, folds_file, tmp_path):
    out = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from training.engine.runlock import RunLock\n"
                               f"l = RunLock({str(out)!r}, 'glacier-train cv (test holder)').acquire()\n"
                               "print('locked', flush=True); time.sleep(60)"],
                              env=repo_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run(cv_cmd_any_fold(os.path.join(synth_data, "train"), folds_file, str(out), "--fold", "0"),
                           env=repo_env(), capture_output=True, text=True, timeout=120)
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
