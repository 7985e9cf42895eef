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
from typing import Any, Dict, List, Optional, Tuple

from training.rundir import RunDir, member_name
from training.runs.members import resolve_members
from training.runs.run import CvError, CvRun, Echo, echo_stdout, parse_sets  # noqa: F401 - the CLI's names
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
    if run.gpus > 1 and run.parallel_folds > 1:
        raise CvError("--gpus and --parallel-folds cannot be combined: --gpus N trains one fold at a time on N "
                      "GPUs (DDP), --parallel-folds N trains N folds at once on one GPU each; pick one")
    if (run.gpus > 1 and "WORLD_SIZE" not in os.environ) or run.parallel_folds > 1:
        return _launch(run, echo)
    return run_cv(run, echo=echo)


def _launch(run: CvRun, echo: Echo) -> Dict[str, Any]:
    """The parent of DDP ranks or fold-parallel workers: checks the inputs, holds the
    lock, starts the children, fails loudly when any of them fails."""
    from training.engine.launch import Worker, describe_rc, run_torchrun, run_workers, split_cpus, worker_devices
    from training.engine.runlock import LockedError, RunLock

    prep = prepare(run)
    devices = worker_devices(run.parallel_folds) if run.parallel_folds > 1 else []
    try:
        lock = RunLock(run.out).acquire()
    except LockedError as exc:
        raise CvError(str(exc)) from None
    try:
        if lock.took_over:
            echo(f"note: took over the lock on {run.out} left by process {lock.took_over.get('pid')} "
                 "(no longer running)")
        RunDir(run.out).clean_temps()
        resolve_members(run.out, prep.folds, run.folds_path, prep.cfg.model_dump(), run.force_retrain, echo)
        child = replace(run, force_retrain=False, parent_lock=True)
        if run.gpus > 1:
            rc = run_torchrun(run.gpus, replace(child, gpus=1).cli_args(), echo)
            if rc != 0:
                raise CvError(f"the DDP run {describe_rc(rc)}; finished members are kept, re-run the same "
                              "command to resume")
            return {}
        n = run.parallel_folds
        cpu = split_cpus(n, prep.cfg.train.num_workers)
        workers = []
        for i in range(n):
            mine = tuple(prep.fold_ids[i::n])
            if not mine:
                continue
            env = dict(os.environ)
            env.pop("WORLD_SIZE", None)
            env["OMP_NUM_THREADS"] = str(cpu["threads"])
            if devices[i] is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices[i]
            args = replace(child, parallel_folds=1, only_folds=mine, worker=i,
                           loader_workers=cpu["loader_workers"]).cli_args()
            where = f"GPU {devices[i]}" if devices[i] is not None else "CPU"
            workers.append(Worker(i, [sys.executable, "-m", "training.cli", *args], env,
                                  f"{where}, folds {list(mine)}", RunDir(run.out).worker_log(i)))
        failed = run_workers(workers, echo=echo)
        if failed:
            lost = sorted(f for w in failed for f in prep.fold_ids[w.wid::n])
            raise CvError(f"{len(failed)} of {len(workers)} fold-parallel workers failed (folds {lost} are not "
                          "finished; nothing was retrained in their place). Fix the cause above, then re-run "
                          "the same command: finished members are kept and cut ones resume.")
        return run_cv(replace(run, parallel_folds=1, parent_lock=True), echo=echo, train=False, prep=prep)
    finally:
        lock.release()


def run_cv(run: CvRun, echo: Echo = echo_stdout, train: bool = True, prep: Optional[_Prepared] = None,
           stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
    """Train (``train``) every fold x seed of ``run`` in this process (one DDP rank under
    torchrun), then write and print the summary. ``train=False`` only summarises and
    fails if a member is missing (nothing is retrained behind the user's back)."""
    from training.engine.distributed import cleanup, init_distributed
    from training.engine.runlock import LockedError, RunLock

    prep = prep or prepare(run)
    ctx = init_distributed(run.device)
    lock = None
    if ctx.is_main and not run.parent_lock:
        try:
            lock = RunLock(run.out).acquire()
        except LockedError as exc:
            cleanup(ctx)
            raise CvError(str(exc)) from None
        if lock.took_over:
            echo(f"note: took over the lock on {run.out} left by process {lock.took_over.get('pid')} "
                 "(no longer running)")
    try:
        try:
            failed = _train_jobs(run, prep, ctx, echo, train, stop_after_epoch, clean=lock is not None)
        finally:
            cleanup(ctx)
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


def _train_jobs(run: CvRun, prep: _Prepared, ctx, echo: Echo, train: bool, stop_after_epoch: Optional[int],
                clean: bool) -> List[Dict[str, Any]]:
    """Train the members still to do; returns the ones a guard stopped (diverged, out of
    memory): the others still train. Under DDP a stopped member ends the run."""
    from training.folds import fold_split
    from training.engine.guards import MemberFailed
    from training.engine.trainer import Trainer

    cfg, folds, dataset, jobs = prep.cfg, prep.folds, prep.dataset, prep.jobs
    if ctx.is_main:
        os.makedirs(run.out, exist_ok=True)
        if clean:
            RunDir(run.out).clean_temps()
    # every rank decides the same way which members to train; only rank 0 deletes
    resolve_members(run.out, folds, run.folds_path, cfg.model_dump(), run.force_retrain, echo,
                    delete=ctx.is_main)
    ctx.barrier()
    rd = RunDir(run.out)
    todo = [j for j in jobs if not os.path.exists(rd.member(*j))]
    if not train and todo:
        raise CvError(f"members {todo} are missing after training; re-run the same command")
    init_state = None
    if cfg.init_from and todo:
        from training.runs.transfer import load_init_state

        lines: List[str] = []
        init_state = load_init_state(cfg.init_from, cfg, lines)
        if ctx.is_main:
            for line in lines:
                echo(line)
    tag = f"[worker {run.worker}] " if run.worker is not None else ""
    failed: List[Dict[str, Any]] = []
    for i, (fold, seed) in enumerate(jobs):
        path = rd.member(fold, seed)
        if (fold, seed) not in todo:
            if ctx.is_main and train:
                echo(f"{tag}[{i + 1}/{len(jobs)}] fold {fold} seed {seed}: done already ({path}), reused")
            continue
        train_keys, val_keys = fold_split(folds, fold)
        after = sum(1 for j in jobs[i + 1:] if j in todo)
        try:
            res = Trainer(cfg, dataset, train_keys, val_keys, fold, seed, path,
                          rd.work_dir(member_name(fold, seed)), ctx, init_state=init_state,
                          progress=run.progress and run.worker is None, members_after=after, worker=run.worker,
                          loader_workers=run.loader_workers).fit(stop_after_epoch)
        except MemberFailed as exc:
            if ctx.enabled:
                raise CvError(str(exc)) from None
            failed.append({"fold": fold, "seed": seed, "kind": exc.kind, "message": str(exc)})
            echo(f"{tag}[{i + 1}/{len(jobs)}] fold {fold} seed {seed}: FAILED ({exc.kind}): {exc}")
            continue
        if ctx.is_main:
            echo(f"{tag}[{i + 1}/{len(jobs)}] fold {fold} seed {seed}: val MCC {res['val_mcc']:.4f} "
                 f"(best epoch {res['best_epoch']}, {res['seconds']:.0f} s)")
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
