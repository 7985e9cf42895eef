"""The parameters of ``glacier-train cv`` (:class:`CvRun`), parsed once: children (DDP ranks,
fold-parallel workers) are started from it, never from ``sys.argv``. Errors the user can
fix are :class:`CvError` (a ``ValueError``); ``training/cli.py`` turns them into
command-line errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from training.engine.launch import Nodes

Echo = Callable[[str], None]


class CvError(ValueError):
    """A problem the user can fix (the message says how)."""


def echo_stdout(line: str) -> None:
    print(line, flush=True)


@dataclass
class CvRun:
    """The parsed parameters of ``glacier-train cv``."""
    config: str
    data: str
    folds_path: str
    out: str
    seeds: Tuple[int, ...] = (0,)
    only_folds: Tuple[int, ...] = ()
    device: str = "auto"
    sets: Tuple[str, ...] = ()
    init_from: Optional[str] = None
    progress: bool = True
    force_retrain: bool = False
    verbose: bool = False
    gpus: int = 1
    parallel_folds: int = 1
    worker: Optional[int] = None          # fold-parallel worker id (children only)
    loader_workers: Optional[int] = None  # data-loader workers per process (children only)
    parent_lock: bool = False             # the launching process holds the --out lock
    job_queue: Optional[str] = None       # fold-parallel workers take (fold, seed) jobs from here (children only)
    nodes: Optional[Nodes] = None         # multi-node torchrun (launchers only: ranks read torchrun's environment)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def world(self) -> int:
        """DDP ranks over all nodes (``gpus`` per node)."""
        return self.gpus * (self.nodes.nnodes if self.nodes else 1)

    def cli_args(self) -> List[str]:
        """``glacier-train`` arguments that reproduce this run in a child process."""
        args = (["-v"] if self.verbose else []) + [
            "cv", "--config", self.config, "--data", self.data, "--folds", self.folds_path, "--out", self.out,
            "--device", self.device]
        for s in self.seeds:
            args += ["--seeds", str(s)]
        for f in self.only_folds:
            args += ["--fold", str(f)]
        for s in self.sets:
            args += ["--set", s]
        if self.init_from:
            args += ["--init-from", self.init_from]
        if not self.progress:
            args.append("--no-progress")
        if self.force_retrain:
            args.append("--force-retrain")
        if self.gpus > 1:
            args += ["--gpus", str(self.gpus)]
        if self.parallel_folds > 1:
            args += ["--parallel-folds", str(self.parallel_folds)]
        if self.worker is not None:
            args += ["--worker-id", str(self.worker)]
        if self.loader_workers is not None:
            args += ["--loader-workers", str(self.loader_workers)]
        if self.parent_lock:
            args.append("--parent-lock")
        if self.job_queue:
            args += ["--job-queue", self.job_queue]
        return args


def parse_sets(values: Sequence[str]) -> Dict[str, Any]:
    """``["train.epochs=3"]`` -> ``{"train.epochs": 3}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for item in values:
        if "=" not in item:
            raise CvError(f"--set expects key=value (e.g. train.epochs=3), got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


