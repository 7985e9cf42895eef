"""Cross-validated training as library code: every fold x seed, resumable, with a summary
and out-of-fold arrays (``glacier-train cv``).

One run owns its ``--out`` folder (a lock); finished members are reused only when their
fold's tiles and their config match this run (training/runs/members.py); children (DDP
ranks, fold-parallel workers) are started from the parsed :class:`CvRun`
(training/runs/run.py), never from ``sys.argv``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from training.rundir import RunDir, member_name
from training.runs.jobqueue import JobQueue
from training.runs.members import resolve_members
from training.runs.run import CvError, CvRun, Echo, echo_stdout, parse_sets
from training.runs.summary import render_summary, render_training_log, summarise

log = logging.getLogger("glacier.train")



@dataclass
class _Prepared:
    cfg: Any
    folds: Dict[str, Any]
    dataset: Any
    fold_ids: List[int]
    jobs: List[Tuple[int, int]]


def prepare(run: CvRun) -> _Prepared:
    """Everything that can be wrong with the inputs, found before any process starts or
    any epoch runs: the config (``--set`` included), the folds file against the data, the
    requested folds, the config against the data's classes."""
    from training.config import check_against_classes, load_config
    from training.data.competition import CompetitionDataset
    from training.folds import load_folds

    cfg = load_config(run.config, parse_sets(run.sets))
    if run.init_from:
        cfg.init_from = run.init_from
    folds = load_folds(run.folds_path)
    dataset = CompetitionDataset(run.data, label_mode=cfg.data.label_mode, cache_dir=cfg.data.cache_dir)
    check_against_classes(cfg, dataset.class_names, run.config)
    missing = sorted({t for f in folds["folds"] for t in f["val"] + f["train"]} - set(dataset.keys))
    if missing:
        raise CvError(f"{run.folds_path} names tiles not found in {run.data}: {missing[:8]}; "
                      "re-create the folds for this data folder")
    fold_ids = [f["fold"] for f in folds["folds"]]
    if run.only_folds:
        bad = [f for f in run.only_folds if f not in fold_ids]
        if bad:
            raise CvError(f"--fold {bad} not in {run.folds_path} (has {fold_ids})")
        fold_ids = list(run.only_folds)
    return _Prepared(cfg, folds, dataset, fold_ids, [(f, s) for f in fold_ids for s in run.seeds])


def cv(run: CvRun, echo: Echo = echo_stdout) -> Dict[str, Any]:
    """``glacier-train cv``: in this process, as DDP ranks (``gpus``), or as fold-parallel
    workers (``parallel_folds``). Raises :class:`CvError` on anything the user must fix."""
    if run.world > 1 and run.parallel_folds > 1:
        raise CvError("--gpus and --parallel-folds cannot be combined (nor --nnodes and --parallel-folds): --gpus N "
                      "trains one fold at a time on N GPUs (DDP), --parallel-folds N trains N folds at once on one GPU "
                      "each; pick one")
    if (run.world > 1 and "WORLD_SIZE" not in os.environ) or run.parallel_folds > 1:
        return _launch(run, echo)
    return run_cv(run, echo=echo)


def _take_lock(run: CvRun, echo: Echo):
    """The run lock on ``--out``; a lock left by a dead process is taken over with a note."""
    from training.engine.runlock import LockedError, RunLock

    try:
        lock = RunLock(run.out).acquire()
    except LockedError as exc:
        raise CvError(str(exc)) from None
    if lock.took_over:
        echo(f"note: took over the lock on {run.out} left by process {lock.took_over.get('pid')} "
             "(no longer running)")
    return lock


def _launch(run: CvRun, echo: Echo) -> Dict[str, Any]:
    """The parent of DDP ranks or fold-parallel workers: checks the inputs, holds the
    lock until every child is gone, starts the children, fails loudly when any fails."""
    from training.engine.distributed import check_device
    from training.engine.launch import worker_devices

    prep = prepare(run)
    check_device(run.device)
    devices = worker_devices(run.parallel_folds) if run.parallel_folds > 1 else []
    if run.nodes is not None and not run.nodes.first:
        # another node's launcher holds the lock and checks the members; the ranks re-check
        # (node 0's launcher resolves --force-retrain before its ranks can join the rendezvous)
        return _launch_ddp(replace(run, force_retrain=False, parent_lock=True), prep, echo)
    lock = _take_lock(run, echo)
    try:
        RunDir(run.out).clean_temps()
        resolve_members(run.out, prep.folds, run.folds_path, prep.cfg.model_dump(), run.force_retrain, echo)
        child = replace(run, force_retrain=False, parent_lock=True)
        if run.world > 1:
            return _launch_ddp(child, prep, echo)
        return _launch_folds(child, prep, devices, echo)
    finally:
        lock.release()


def _child_env(threads: int, device: Optional[str] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = str(threads)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def _launch_ddp(child: CvRun, prep: _Prepared, echo: Echo) -> Dict[str, Any]:
    """torchrun with ``gpus`` ranks; the CPU cores and loader workers are split between them."""
    from training.engine.launch import describe_rc, run_torchrun, split_cpus

    cpu = split_cpus(child.gpus, prep.cfg.train.num_workers)
    args = replace(child, gpus=1, nodes=None, loader_workers=cpu["loader_workers"]).cli_args()
    rc = run_torchrun(child.gpus, args, echo, env=_child_env(cpu["threads"]), nodes=child.nodes)
    if rc != 0:
        raise CvError(f"the DDP run {describe_rc(rc)} (the failing rank's message is above); finished members are "
                      "kept: fix the cause and re-run the same command to resume")
    return {}


def _launch_folds(child: CvRun, prep: _Prepared, devices: List[Optional[str]], echo: Echo) -> Dict[str, Any]:
    """One worker per GPU (or CPU share); each takes the next (fold, seed) job from a shared
    queue until none is left. Then the summary of every member there is, and an error naming
    exactly the jobs a failed worker left unfinished."""
    from training.engine.launch import Worker, run_workers, split_cpus
    from training.runs.jobqueue import JobQueue

    rd = RunDir(child.out)
    todo = [j for j in prep.jobs if not os.path.exists(rd.member(*j))]
    queue = JobQueue(os.path.join(rd.root, ".work", "queue"))
    queue.fill(todo)
    n = min(child.parallel_folds, max(1, len(todo)))
    cpu = split_cpus(n, prep.cfg.train.num_workers)
    workers = []
    for i in range(n):
        args = replace(child, parallel_folds=1, worker=i, job_queue=queue.folder,
                       loader_workers=cpu["loader_workers"]).cli_args()
        where = f"GPU {devices[i]}" if devices[i] is not None else "CPU"
        workers.append(Worker(i, [sys.executable, "-m", "training.cli", *args], _child_env(cpu["threads"], devices[i]),
                              f"{where}, jobs from the shared queue", rd.worker_log(i)))
    failed = run_workers(workers, echo=echo)
    unfinished = sorted({job for _, job in queue.claimed() if not os.path.exists(rd.member(*job))}
                        | set(queue.unclaimed()))
    summary = run_cv(replace(child, parallel_folds=1, job_queue=None), echo=echo, train=False, prep=prep,
                     allow_missing=bool(failed))
    if failed:
        names = ", ".join(f"fold {f} seed {s}" for f, s in unfinished) or "none"
        raise CvError(f"{len(failed)} of {len(workers)} fold-parallel workers failed; not finished: {names} (nothing "
                      "was retrained in their place; the summary above covers the members that finished). Fix the "
                      "cause above, then re-run the same command: finished members are kept and cut ones resume.")
    return summary


def run_cv(run: CvRun, echo: Echo = echo_stdout, train: bool = True, prep: Optional[_Prepared] = None,
           callbacks: Sequence[Any] = (), allow_missing: bool = False) -> Dict[str, Any]:
    """Train (``train``) every fold x seed of ``run`` in this process (one DDP rank under
    torchrun), then write and print the summary. ``train=False`` only summarises and
    fails if a member is missing (nothing is retrained behind the user's back), unless
    ``allow_missing`` (the summary of what there is, after a worker failed).
    ``callbacks`` (training/engine/callbacks.py) go to every member's trainer."""
    from training.engine.distributed import cleanup, init_distributed, ranks_end_together

    prep = prep or prepare(run)
    ctx = init_distributed(run.device)
    lock = None
    if ctx.is_main and not run.parent_lock:
        try:
            lock = _take_lock(run, echo)
        except CvError:
            cleanup(ctx)
            raise
    try:
        with ranks_end_together(ctx):
            failed = _train_jobs(run, prep, ctx, echo, train, callbacks, clean=lock is not None,
                                 allow_missing=allow_missing)
        if not ctx.is_main:
            return {}
        summary = {} if run.worker is not None else _write_summary(run, prep, echo, failed)
        if failed:  # the other members trained; the run still ends in an error naming what failed
            raise CvError(f"{len(failed)} member(s) failed: "
                          + "; ".join(f"fold {f['fold']} seed {f['seed']} ({f['kind']})" for f in failed)
                          + ". Fix the cause named above and re-run the same command: finished members are kept.")
        return summary
    finally:
        if lock is not None:
            lock.release()


def _todo(run: CvRun, prep: _Prepared, ctx, echo: Echo, train: bool, clean: bool,
          allow_missing: bool = False) -> List[Tuple[int, int]]:
    """The members still to train, after the finished ones were checked against this run
    (every rank decides alike; only rank 0 deletes)."""
    if ctx.is_main:
        os.makedirs(run.out, exist_ok=True)
        if clean:
            RunDir(run.out).clean_temps()
    resolve_members(run.out, prep.folds, run.folds_path, prep.cfg.model_dump(), run.force_retrain, echo,
                    delete=ctx.is_main)
    ctx.barrier()
    todo = [j for j in prep.jobs if not os.path.exists(RunDir(run.out).member(*j))]
    if not train and todo and not allow_missing:
        raise CvError(f"members {todo} are missing after training; re-run the same command")
    return todo


def _init_state(prep: _Prepared, ctx, echo: Echo):
    """``--init-from``: the pre-trained tensors that fit this run's model (None without)."""
    from training.runs.transfer import load_init_state

    lines: List[str] = []
    state = load_init_state(prep.cfg.init_from, prep.cfg, lines)
    if ctx.is_main:
        for line in lines:
            echo(line)
    return state


def _fit_member(run: CvRun, prep: _Prepared, ctx, fold: int, seed: int, init_state, members_after: int,
                callbacks: Sequence[Any]) -> Dict[str, Any]:
    """Train one member of the run (``Trainer.fit``); raises ``MemberFailed`` when a guard stops it."""
    from training.engine.trainer import Trainer
    from training.folds import fold_split

    rd = RunDir(run.out)
    train_keys, val_keys = fold_split(prep.folds, fold)
    return Trainer(prep.cfg, prep.dataset, train_keys, val_keys, fold, seed, rd.member(fold, seed),
                   rd.work_dir(member_name(fold, seed)), ctx, init_state=init_state,
                   progress=run.progress and run.worker is None, members_after=members_after, worker=run.worker,
                   loader_workers=run.loader_workers, callbacks=callbacks,
                   extra_meta={"fold_grouping": dict(prep.folds.get("grouping") or {})}).fit()


def _train_jobs(run: CvRun, prep: _Prepared, ctx, echo: Echo, train: bool, callbacks: Sequence[Any],
                clean: bool, allow_missing: bool = False) -> List[Dict[str, Any]]:
    """Train the members still to do; returns the ones a guard stopped (diverged, out of
    memory): the others still train. Under DDP a stopped member ends the run."""
    from training.engine.guards import MemberFailed

    jobs, rd = prep.jobs, RunDir(run.out)
    todo = _todo(run, prep, ctx, echo, train, clean, allow_missing)
    if not train:
        return []
    init_state = _init_state(prep, ctx, echo) if prep.cfg.init_from and todo else None
    tag = f"[worker {run.worker}] " if run.worker is not None else ""
    failed: List[Dict[str, Any]] = []
    queue = JobQueue(run.job_queue) if run.job_queue else None
    for i, (fold, seed) in enumerate(queue.jobs(run.worker or 0) if queue else jobs):
        head, path = f"{tag}[{jobs.index((fold, seed)) + 1}/{len(jobs)}] fold {fold} seed {seed}", rd.member(fold, seed)
        if (fold, seed) not in todo:
            if ctx.is_main and train:
                echo(f"{head}: done already ({path}), reused")
            continue
        after = len(queue.unclaimed()) if queue else sum(1 for j in jobs[i + 1:] if j in todo)
        try:
            res = _fit_member(run, prep, ctx, fold, seed, init_state, after, callbacks)
        except MemberFailed as exc:
            if ctx.enabled:
                raise CvError(str(exc)) from None
            failed.append({"fold": fold, "seed": seed, "kind": exc.kind, "message": str(exc)})
            echo(f"{head}: FAILED ({exc.kind}): {exc}")
            continue
        finally:
            if queue is not None and os.path.exists(path):
                queue.done(run.worker or 0, (fold, seed))
        if ctx.is_main:
            echo(f"{head}: val MCC {res['val_mcc']:.4f} (best epoch {res['best_epoch']}, {res['seconds']:.0f} s)")
    return failed


def _write_summary(run: CvRun, prep: _Prepared, echo: Echo,
                   failed: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    from glacier_runtime.atomic import atomic_write_text
    from training.reporting.curves import plot_curves, read_histories

    folds, rd = prep.folds, RunDir(run.out)
    rd.prune_oof(k for f in folds["folds"] for k in f["val"])
    all_jobs = [(f["fold"], s) for f in folds["folds"] for s in run.seeds]
    summary = summarise(run.out, all_jobs, folds, prep.dataset, run.seeds)
    summary["failed"] = list(failed or [])
    atomic_write_text(rd.cv_summary_json, json.dumps(summary, indent=2) + "\n")
    table = render_summary(summary)
    atomic_write_text(rd.cv_summary_txt, table + "\n")
    atomic_write_text(rd.training_log, render_training_log(summary))
    plot_curves(read_histories(run.out), rd.curves_png, title=f"glacier-train cv: {run.out}")
    echo(table)
    return summary
