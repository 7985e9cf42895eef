"""Child processes of a training command: the one torchrun launcher (DDP), and
fold-parallel workers that fail loudly.

Children are started from parsed parameters (an argument list the caller builds), never
by re-reading ``sys.argv``. A fold-parallel worker that exits non-zero or is killed by a
signal (the OOM killer sends SIGKILL) is reported with the tail of its log; the other
workers finish; nobody retrains the dead worker's folds in its place.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, TextIO

TAIL_LINES = 40


@dataclass(frozen=True)
class Nodes:
    """Where this machine sits in a multi-node run: torchrun's ``--nnodes``, ``--node-rank``
    and rendezvous. One node (the default) is torchrun's ``--standalone``.

    With the ``c10d`` rendezvous (torchrun's recommendation: any node may start first)
    torchrun hands out the global ranks in the order the nodes join, so rank 0 (the rank
    that writes) may run on any node: ``--out`` must be a folder every node sees (shared
    storage). ``static`` puts rank 0 on node rank 0."""
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: Optional[str] = None
    rdzv_backend: str = "c10d"
    rdzv_id: str = "glacier-train"
    #: seconds a node waits for the others at the rendezvous; None: torchrun's default (600)
    rdzv_timeout: Optional[int] = None

    @property
    def multi(self) -> bool:
        return self.nnodes > 1

    @property
    def first(self) -> bool:
        """Node rank 0: its launcher holds the run lock and checks the finished members."""
        return self.node_rank == 0

    def check(self) -> "Nodes":
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is not in 0..{self.nnodes - 1} (--nnodes {self.nnodes}); "
                             "give each machine its own rank, 0 to nnodes-1")
        if self.rdzv_backend not in ("c10d", "static"):
            raise ValueError(f"--rdzv-backend {self.rdzv_backend!r}: use c10d (any node may start first) or static")
        if self.rdzv_timeout is not None and self.rdzv_timeout < 1:
            raise ValueError(f"--rdzv-timeout {self.rdzv_timeout}: give the seconds a node waits for the others (>= 1)")
        if self.multi:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node, "
                                 f"e.g. the first node's address and a free port such as node01:29400), got "
                                 f"{self.rdzv_endpoint!r}")
        return self

    def torchrun_args(self) -> List[str]:
        if not self.multi:
            return ["--standalone"]
        args = [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--rdzv-backend={self.rdzv_backend}",
                f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id}"]
        if self.rdzv_timeout is not None:  # torch's names: c10d's join_timeout, static's timeout
            key = "join_timeout" if self.rdzv_backend == "c10d" else "timeout"
            args.append(f"--rdzv-conf={key}={self.rdzv_timeout}")
        return args


def torchrun_command(nproc: int, cli_args: Sequence[str], nodes: Optional[Nodes] = None) -> List[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N -m training.cli ARGS``
    (or the rendezvous of ``nodes`` instead of ``--standalone``)."""
    return [sys.executable, "-m", "torch.distributed.run", *(nodes or Nodes()).torchrun_args(),
            f"--nproc_per_node={nproc}", "-m", "training.cli", *cli_args]


def run_torchrun(nproc: int, cli_args: Sequence[str], echo: Callable[[str], None] = print,
                 env: Optional[Dict[str, str]] = None, nodes: Optional[Nodes] = None) -> int:
    """Run ``glacier-train ARGS`` as ``nproc`` DDP ranks on this node; returns torchrun's exit status.

    On Ctrl-C the interrupt is forwarded to torchrun and this waits until torchrun and every
    rank it started are gone (ranks that outlive torchrun are stopped: SIGTERM, then
    SIGKILL), then re-raises: the caller's run lock is released only after that."""
    cmd = torchrun_command(nproc, cli_args, nodes)
    echo("launching: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    family: Dict[int, float] = {}
    try:
        while True:
            try:
                return proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                family.update(descendants(proc.pid))  # ranks, remembered while torchrun is their parent
    except KeyboardInterrupt:
        family.update(descendants(proc.pid))
        echo("interrupted: stopping the DDP ranks, waiting for them to exit ...")
        stop_process_tree(proc, family)
        raise


#: Seconds given to torchrun to stop its ranks after the interrupt, then to a surviving rank after SIGTERM.
STOP_GRACE_S = (60.0, 10.0)


def _start_time(pid: int) -> Optional[float]:
    """The process's start time in clock ticks (tells a pid apart from a reused one); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return float(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> Dict[int, float]:
    """{pid: start time} of every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: Dict[int, List[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out: Dict[int, float] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        start = _start_time(p)
        if start is not None:
            out[p] = start
            todo.extend(children.get(p, []))
    return out


def alive(family: Dict[int, float]) -> List[int]:
    """Those of ``family`` still running (same pid and start time)."""
    return [p for p, t in family.items() if _start_time(p) == t]


def stop_process_tree(proc: subprocess.Popen, family: Dict[int, float]) -> None:
    """Forward SIGINT to ``proc`` and wait for it; then SIGTERM and at last SIGKILL whatever of
    ``family`` (its descendants) still runs. Returns when all of them are gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S[0])
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S[1]), (signal.SIGKILL, 5.0)):
        left = alive(family)
        if not left:
            return
        for p in left:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while alive(family) and time.time() < deadline:
            time.sleep(0.2)


def visible_devices(env: Optional[Dict[str, str]] = None, device_count: Optional[int] = None) -> Optional[List[str]]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: the user's own
    setting when there is one (``"2,3"`` -> ``["2", "3"]``, UUIDs kept), else every GPU
    torch sees; ``None`` when there is no GPU (CPU workers)."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is not None:
        ids = [d.strip() for d in raw.split(",") if d.strip()]
        if ids and ids[0] == "-1":
            return None
        return ids or None
    if device_count is None:
        try:
            import torch

            device_count = torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            device_count = 0
    return [str(i) for i in range(device_count)] or None


def worker_devices(n: int, env: Optional[Dict[str, str]] = None, device_count: Optional[int] = None,
                   ) -> List[Optional[str]]:
    """One device per fold-parallel worker, taken from :func:`visible_devices` in order;
    ``[None] * n`` on a machine without GPUs. Fewer GPUs than workers is an error."""
    ids = visible_devices(env, device_count)
    if ids is None:
        return [None] * n
    if len(ids) < n:
        raise ValueError(f"--parallel-folds {n} needs {n} GPUs, but only {len(ids)} are visible "
                         f"(CUDA_VISIBLE_DEVICES={','.join(ids)}); lower --parallel-folds or expose more GPUs")
    return ids[:n]


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (a SLURM step's or a container's
    cpuset, ``taskset``), not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def split_cpus(n_workers: int, loader_workers: int, cpus: Optional[int] = None) -> Dict[str, int]:
    """Share the CPU cores between ``n_workers`` processes: torch threads per worker
    and data-loader workers per worker (the config's count divided, never above what the
    cores allow). Kaggle's 4 vCPUs and two workers give 2 threads and <= 1 loader worker each."""
    cpus = cpus or usable_cpus()
    per = max(1, cpus // max(1, n_workers))
    return {"threads": per, "loader_workers": max(0, min(loader_workers // max(1, n_workers), per - 1))}


def describe_rc(rc: int) -> str:
    """A return code in words: ``-9`` -> ``killed by SIGKILL (the OOM killer sends it)``."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (the out-of-memory killer sends it)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {rc}"


@dataclass
class Worker:
    """One child process: its command, environment, log file and the last lines it printed."""
    wid: int
    cmd: List[str]
    env: Dict[str, str]
    label: str
    log_path: str
    proc: Optional[subprocess.Popen] = None
    tail: Deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    rc: Optional[int] = None


def _pump(w: Worker, out: TextIO, lock: threading.Lock) -> None:
    """Copy a worker's output line by line to its log file and to ``out`` (whole lines,
    so two workers never garble each other's)."""
    assert w.proc is not None and w.proc.stdout is not None
    with open(w.log_path, "a", encoding="utf-8", errors="replace") as log:
        for raw in iter(w.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if "\r" in line:  # a progress bar redraw: keep the latest state only
                line = line.rsplit("\r", 1)[-1]
            w.tail.append(line)
            log.write(line + "\n")
            log.flush()
            with lock:
                out.write(line + "\n")
                out.flush()


def run_workers(workers: Sequence[Worker], out: Optional[TextIO] = None,
                echo: Callable[[str], None] = print) -> List[Worker]:
    """Start every worker, relay their output, wait for all of them. Returns the failed
    ones (non-zero or negative return code), each reported through ``echo`` with the tail
    of its log."""
    out = out or sys.stdout
    lock = threading.Lock()
    threads = []
    for w in workers:
        os.makedirs(os.path.dirname(os.path.abspath(w.log_path)), exist_ok=True)
        w.proc = subprocess.Popen(w.cmd, env=w.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        with lock:
            echo(f"worker {w.wid} ({w.label}): pid {w.proc.pid}, log {w.log_path}")
        t = threading.Thread(target=_pump, args=(w, out, lock), daemon=True)
        t.start()
        threads.append(t)
    try:
        for w, t in zip(workers, threads):
            w.rc = w.proc.wait()
            t.join()
    except KeyboardInterrupt:
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGINT)
        for w in workers:
            if w.proc is not None:
                w.proc.wait()
        raise
    failed = [w for w in workers if w.rc != 0]
    for w in failed:
        echo(f"worker {w.wid} ({w.label}) FAILED: {describe_rc(w.rc)}; last lines of {w.log_path}:")
        for line in w.tail:
            echo(f"    {line}")
    return failed
