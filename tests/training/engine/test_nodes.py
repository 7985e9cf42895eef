"""Multi-node torchrun: the options reach torchrun, mistakes are command-line errors, and
two "nodes" on this machine (two launches, gloo, a c10d rendezvous on localhost) train the
member that one node with two ranks trains."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from training.engine.checkpoint import load_checkpoint
from training.engine.launch import Nodes, torchrun_command

from tests.helpers import ROOT, cv_cmd, repo_env


def test_one_node_is_standalone():
    cmd = torchrun_command(2, ["cv", "--out", "o"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-3:] == ["cv", "--out", "o"]


def test_nodes_reach_torchrun():
    cmd = torchrun_command(1, ["cv"], Nodes(3, 2, "node01:29400", "static", "run7").check())
    assert "--standalone" not in cmd
    for arg in ("--nnodes=3", "--node-rank=2", "--rdzv-backend=static", "--rdzv-endpoint=node01:29400",
                "--rdzv-id=run7", "--nproc_per_node=1"):
        assert arg in cmd
    assert cmd.index("--nproc_per_node=1") < cmd.index("training.cli")


@pytest.mark.parametrize("backend, key", [("c10d", "join_timeout"), ("static", "timeout")])
def test_rendezvous_timeout_reaches_torchrun_under_each_backends_key(backend, key):
    """torchrun reads c10d's wait as ``join_timeout`` and static's as ``timeout`` (torch's
    dynamic_rendezvous / static_tcp_rendezvous); no option keeps torchrun's own default."""
    cmd = torchrun_command(1, ["cv"], Nodes(2, 0, "h:1", backend, rdzv_timeout=45).check())
    assert f"--rdzv-conf={key}=45" in cmd
    assert not any(a.startswith("--rdzv-conf") for a in torchrun_command(1, ["cv"], Nodes(2, 0, "h:1").check()))


def test_a_node_alone_gives_up_after_the_rendezvous_timeout():
    """Node 0 of two, the other never comes: with --rdzv-timeout 5 torchrun fails within
    seconds, not after its default 600 s (the subprocess limit would end this test)."""
    port = _free_port()
    cmd = torchrun_command(1, ["--help"], Nodes(2, 0, f"127.0.0.1:{port}", "c10d", "alone", rdzv_timeout=5).check())
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Rendezvous" in r.stderr + r.stdout, r.stderr[-2000:]
    assert time.monotonic() - t0 < 90


@pytest.mark.parametrize("nodes, words", [
    (Nodes(2, 0, None), "--rdzv-endpoint HOST:PORT"),
    (Nodes(2, 0, "node01"), "got 'node01'"),
    (Nodes(2, 2, "h:1"), "--node-rank 2 is not in 0..1"),
    (Nodes(2, 0, "h:1", "etcd"), "--rdzv-backend 'etcd'"),
    (Nodes(2, 0, "h:1", rdzv_timeout=0), "--rdzv-timeout 0"),
])
def test_node_mistakes_are_named(nodes, words):
    with pytest.raises(ValueError, match=words.replace("..", r"\.\.").replace("(", r"\(")):
        nodes.check()


@pytest.mark.parametrize("command", ["cv", "pretrain"])
def test_refuses_nodes_without_endpoint(command, tmp_path):
    cfg = os.path.join(ROOT, "configs", "quickstart.yaml")
    args = (["--folds", cfg] if command == "cv" else []) + ["--out", str(tmp_path / "o"), "--nnodes", "2"]
    r = subprocess.run([sys.executable, "-m", "training.cli", command, "--config", cfg, "--data", str(tmp_path), *args],
                       env=repo_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--rdzv-endpoint HOST:PORT" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin one node on each")
def test_two_nodes_train_the_member_of_one_node_with_two_ranks(synth_data, folds_file, tmp_path):
    data = os.path.join(synth_data, "train")
    one = str(tmp_path / "one_node")
    r = subprocess.run(cv_cmd(data, folds_file, one, "--gpus", "2"), env=repo_env(), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out, port = str(tmp_path / "two_nodes"), _free_port()
    # one core each, as the one-node run's two ranks have (the launcher splits the cores it may use)
    node = [["taskset", "-c", str(k), *cv_cmd(data, folds_file, out, "--nnodes", "2", "--node-rank", str(k), "--rdzv-endpoint",
                   f"127.0.0.1:{port}", "--rdzv-id", "t")] for k in (0, 1)]
    logs = [open(tmp_path / f"node{k}.log", "w") for k in (0, 1)]
    first = subprocess.Popen(node[0], env=repo_env(), stdout=logs[0], stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not _listening(port) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # node 0 joins the rendezvous first, so it gets rank 0 (c10d ranks by arrival)
    second = subprocess.Popen(node[1], env=repo_env(), stdout=logs[1], stderr=subprocess.STDOUT)
    rcs = [p.wait(timeout=400) for p in (first, second)]
    for f in logs:
        f.close()
    text = [open(tmp_path / f"node{k}.log").read() for k in (0, 1)]
    assert rcs == [0, 0], (text[0][-2000:], text[1][-2000:])
    assert "--nnodes=2" in text[0] and "--node-rank=1" in text[1] and "--rdzv-backend=c10d" in text[1]
    a, b = load_checkpoint(os.path.join(one, "fold0_seed0.pt")), load_checkpoint(os.path.join(out, "fold0_seed0.pt"))
    assert [h["val_mcc"] for h in a["history"]] == [h["val_mcc"] for h in b["history"]]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert os.path.exists(os.path.join(out, "cv_summary.json"))
