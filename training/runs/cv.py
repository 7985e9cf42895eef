"""Cross-validated training as library code: every fold x seed, resumable, with a summary
and out-of-fold arrays. No click here: errors are :class:`CvError` (a ``ValueError``)
and ``training/cli.py`` turns them into command-line errors.

One run owns its ``--out`` folder (a lock); finished members are reused only when their
fold's tiles and their config match this run; children (DDP ranks, fold-parallel
workers) are started from the parsed :class:`CvRun`, never from ``sys.argv``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("glacier.train")

Echo = Callable[[str], None]
MEMBER_RE = re.compile(r"^fold(-?\d+)_seed(-?\d+)\.pt$")
# settings that change how fast a run goes, not what it learns: ignored when deciding
# whether a finished member belongs to this run
RUNTIME_KEYS = ("train.num_workers",)


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
    extra: Dict[str, Any] = field(default_factory=dict)

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


def member_path(out: str, fold: int, seed: int) -> str:
    return os.path.join(out, f"fold{fold}_seed{seed}.pt")


# ---- which finished members belong to this run ------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def config_differences(old: Dict[str, Any], new: Dict[str, Any], ignore: Sequence[str] = RUNTIME_KEYS) -> List[str]:
    """``["train.epochs: 3 in the member, 2 in this run", ...]``."""
    a, b = _flatten(old or {}), _flatten(new or {})
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: {a.get(k, '<absent>')!r} in the member, {b.get(k, '<absent>')!r} in this run")
    return diffs


def _tile_difference(what: str, had: Sequence[str], want: Sequence[str]) -> Optional[str]:
    if list(had) == list(want):
        return None
    extra, missing = sorted(set(had) - set(want)), sorted(set(want) - set(had))
    if not extra and not missing:
        return f"{what} tiles are the same set in another order"
    return (f"{what} tiles differ: the member has {extra[:6]}{' ...' if len(extra) > 6 else ''} that this run's "
            f"fold does not, and lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def stale_members(out: str, folds: Dict[str, Any], folds_path: str, config: Dict[str, Any],
                  ) -> Dict[Tuple[int, int], List[str]]:
    """Every ``fold{k}_seed{s}.pt`` in ``out`` that does not belong to this run, with the
    reasons: a fold the folds file lacks, other training/validation tiles, another config,
    an unreadable file."""
    from training.engine.checkpoint import load_checkpoint

    by_fold = {f["fold"]: f for f in folds["folds"]}
    problems: Dict[Tuple[int, int], List[str]] = {}
    if not os.path.isdir(out):
        return problems
    for name in sorted(os.listdir(out)):
        m = MEMBER_RE.match(name)
        if not m:
            continue
        fold, seed = int(m.group(1)), int(m.group(2))
        path = os.path.join(out, name)
        try:
            ck = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001
            problems[(fold, seed)] = [f"unreadable ({exc})"]
            continue
        reasons = []
        if fold not in by_fold:
            reasons.append(f"fold {fold} is not in {folds_path} (folds {sorted(by_fold)})")
        else:
            for what, key in (("training", "train"), ("validation", "val")):
                d = _tile_difference(what, ck.get(f"{key}_tiles", []), by_fold[fold][key])
                if d:
                    reasons.append(d)
        reasons += config_differences(ck.get("config") or {}, config)
        if reasons:
            problems[(fold, seed)] = reasons
    return problems


def remove_member(out: str, fold: int, seed: int) -> None:
    """A member and everything derived from it: OOF arrays, cut-run state, CSV log."""
    for p in (member_path(out, fold, seed), os.path.join(out, "logs", f"fold{fold}_seed{seed}.csv")):
        if os.path.exists(p):
            os.unlink(p)
    for d in (os.path.join(out, "oof", f"fold{fold}_seed{seed}"), os.path.join(out, ".work", f"fold{fold}_seed{seed}")):
        shutil.rmtree(d, ignore_errors=True)


def resolve_members(out: str, folds: Dict[str, Any], folds_path: str, config: Dict[str, Any],
                    force: bool, echo: Echo, delete: bool = True) -> None:
    """Stop (or with ``force`` remove) every finished member that does not belong to this
    run; the message names each difference."""
    problems = stale_members(out, folds, folds_path, config)
    if not problems:
        return
    lines = []
    for (fold, seed), reasons in sorted(problems.items()):
        lines.append(f"  {member_path(out, fold, seed)}:")
        lines += [f"    - {r}" for r in reasons]
    if not force:
        raise CvError(f"{out} holds members that do not belong to this run:\n" + "\n".join(lines)
                      + "\nRe-run with --force-retrain to replace them, or use another --out "
                        "(reusing them would mix folds or settings into the OOF score and the ensemble).")
    if delete:
        echo("--force-retrain: removing members that do not belong to this run:\n" + "\n".join(lines))
        for fold, seed in problems:
            remove_member(out, fold, seed)


def prune_oof(out: str, folds: Dict[str, Any]) -> List[str]:
    """Keep in ``out/oof`` exactly the arrays of members present in ``out``."""
    removed = []
    oof = os.path.join(out, "oof")
    if not os.path.isdir(oof):
        return removed
    val_keys = {k for f in folds["folds"] for k in f["val"]}
    for name in os.listdir(oof):
        p = os.path.join(oof, name)
        if name == "labels":
            for f in os.listdir(p):
                if f.endswith(".npy") and f[:-4] not in val_keys:
                    os.unlink(os.path.join(p, f))
                    removed.append(os.path.join(p, f))
            continue
        if not os.path.exists(os.path.join(out, name + ".pt")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def clean_temps(out: str) -> List[str]:
    """Temporary files a killed writer left in the weights folder and its sub-folders."""
    from glacier_runtime.atomic import remove_stale_temps

    removed = []
    for root, dirs, _ in os.walk(out):
        removed += remove_stale_temps(root)
    return removed


# ---- summary ------------------------------------------------------------------------------
def oof_confusion(out: str, folds: Dict, dataset, seeds: Sequence[int]):
    """Pooled confusion of out-of-fold predictions over every training tile (mean over
    seeds' probabilities), or ``None`` when there are none. The saved probabilities
    already carry the masked-pixel rule (``Predictor.masked_to_background``)."""
    from training.metrics import ConfusionAccumulator

    acc = ConfusionAccumulator(len(dataset.class_names))
    seen = 0
    for f in folds["folds"]:
        for key in f["val"]:
            probs = []
            for s in seeds:
                p = os.path.join(out, "oof", f"fold{f['fold']}_seed{s}", f"{key}.npy")
                if os.path.exists(p):
                    probs.append(np.load(p).astype(np.float32))
            if probs:
                pred = np.mean(probs, 0).argmax(0)
                acc.update(dataset.label(key), pred)
                seen += 1
    return acc if seen else None


def oof_score(out: str, folds: Dict, dataset, seeds: Sequence[int]) -> Optional[float]:
    """MCC of out-of-fold predictions over every training tile (mean over seeds' probs)."""
    acc = oof_confusion(out, folds, dataset, seeds)
    return acc.mcc if acc is not None else None


def summarise(out: str, jobs: List[Tuple[int, int]], folds: Dict, dataset, seeds,
              targets: Optional[str] = None) -> Dict[str, Any]:
    """The run's table, the pooled OOF scores per class, and the grade against the targets."""
    from training.engine.checkpoint import load_checkpoint
    from training.reporting.grading import class_facts, grade, load_targets

    rows = []
    for fold, seed in jobs:
        p = member_path(out, fold, seed)
        if not os.path.exists(p):
            continue
        ck = load_checkpoint(p)
        rows.append({"fold": fold, "seed": seed, "val_mcc": ck.get("val_mcc"), "best_epoch": ck.get("best_epoch"),
                     "epochs_run": ck.get("epochs_run"), "seconds": ck.get("train_seconds"),
                     "per_class": ck.get("per_class"), "path": p, "arch": ck["spec"]["arch"],
                     "encoder": ck["spec"]["encoder"], "size_mb": round(os.path.getsize(p) / 2 ** 20, 1),
                     "class_warnings": ck.get("class_warnings") or [], "bad_steps": ck.get("bad_steps", 0)})
    mccs = [r["val_mcc"] for r in rows if r["val_mcc"] is not None]
    by_fold: Dict[int, List[float]] = {}
    for r in rows:
        if r["val_mcc"] is not None:
            by_fold.setdefault(r["fold"], []).append(r["val_mcc"])
    fold_means = {f: float(np.mean(v)) for f, v in by_fold.items()}
    acc = oof_confusion(out, folds, dataset, seeds)
    oof_pc = acc.per_class(dataset.class_names) if acc is not None else []
    facts: Dict[str, Any] = {"mean_fold_mcc": float(np.mean(list(fold_means.values()))) if fold_means else None,
                             "best_fold_mcc": max(fold_means.values()) if fold_means else None}
    facts.update(class_facts(oof_pc))
    return {
        "members": rows,
        "mean_val_mcc": float(np.mean(mccs)) if mccs else None,
        "std_val_mcc": float(np.std(mccs)) if mccs else None,
        "fold_mcc": {str(f): m for f, m in sorted(fold_means.items())},
        "oof_mcc": acc.mcc if acc is not None else None,
        "oof_per_class": oof_pc,
        "class_names": list(dataset.class_names),
        "grade": grade("cv", facts, load_targets(targets) if targets else None),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def render_training_log(summary: Dict[str, Any]) -> str:
    """The plain-text log users share: best epoch, per-fold MCC, mean, per-class IoU,
    training time, checkpoint size, and the grade with every criterion."""
    from training.reporting.grading import render_grade

    lines = [f"glacier-train cv, {summary['date']}", ""]
    lines.append(f"{'fold':>4} {'seed':>4} {'val MCC':>8} {'best epoch':>10} {'epochs':>6} {'minutes':>7} {'MB':>6}")
    for r in summary["members"]:
        lines.append(f"{r['fold']:>4} {r['seed']:>4} {r['val_mcc'] if r['val_mcc'] is not None else float('nan'):>8.4f} "
                     f"{r['best_epoch'] if r['best_epoch'] is not None else '-':>10} {r['epochs_run'] or 0:>6} "
                     f"{(r['seconds'] or 0) / 60:>7.1f} {r.get('size_mb', 0):>6.1f}")
    if summary.get("fold_mcc"):
        lines.append("per-fold MCC (mean over seeds): " + ", ".join(f"{f}: {m:.4f}" for f, m in summary["fold_mcc"].items()))
    if summary["mean_val_mcc"] is not None:
        lines.append(f"mean val MCC {summary['mean_val_mcc']:.4f} +- {summary['std_val_mcc']:.4f}")
    total = sum((r["seconds"] or 0) for r in summary["members"])
    lines.append(f"training time {total / 60:.1f} min in all")
    if summary.get("oof_per_class"):
        lines += ["", f"out-of-fold, pooled over all training tiles: MCC {summary['oof_mcc']:.4f}",
                  f"{'class':<12} {'IoU':>7} {'recall':>7} {'precision':>9} {'MCC 1-vs-rest':>13} {'pixels':>10}"]
        for c in summary["oof_per_class"]:
            lines.append(f"{c['class']:<12} {c['iou']:>7.3f} {c['recall']:>7.3f} {c['precision']:>9.3f} "
                         f"{c['mcc']:>13.3f} {c['support']:>10}")
    lines += ["", "targets (training/reporting/targets.yaml):", render_grade(summary["grade"])]
    return "\n".join(lines) + "\n"


def render_summary(summary: Dict[str, Any]) -> str:
    names = summary["class_names"]
    head = f"{'fold':>4} {'seed':>4} {'val MCC':>8} {'epoch':>6} {'time s':>7}  " + " ".join(f"{n[:9]:>9}" for n in names)
    lines = [head, "-" * len(head)]
    for r in summary["members"]:
        pc = {c["class"]: c["mcc"] for c in (r["per_class"] or [])}
        lines.append(f"{r['fold']:>4} {r['seed']:>4} {r['val_mcc']:>8.4f} {r['best_epoch']:>6} {r['seconds'] or 0:>7.0f}  "
                     + " ".join(f"{pc.get(n, float('nan')):>9.3f}" for n in names))
    if summary["mean_val_mcc"] is not None:
        lines.append(f"mean val MCC {summary['mean_val_mcc']:.4f} +- {summary['std_val_mcc']:.4f}")
    if summary["oof_mcc"] is not None:
        lines.append(f"out-of-fold MCC over all training tiles {summary['oof_mcc']:.4f}")
    if summary.get("grade"):
        lines.append(f"grade against the targets: {summary['grade']['grade']} (details: training_log.txt)")
    warned = [w for r in summary["members"] for w in r.get("class_warnings") or []]
    if warned:  # the class guard's warnings, repeated where the user reads the results
        lines.append("classes not learned:")
        lines.extend(f"  {w}" for w in warned)
    failed = summary.get("failed") or []
    if failed:
        lines.append(f"FAILED members ({len(failed)}): no member file written")
        lines.extend(f"  fold {f['fold']} seed {f['seed']} ({f['kind']}): {f['message']}" for f in failed)
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------
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
        clean_temps(run.out)
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
                                  f"{where}, folds {list(mine)}", os.path.join(run.out, "logs", f"worker{i}.log")))
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
            clean_temps(run.out)
    # every rank decides the same way which members to train; only rank 0 deletes
    resolve_members(run.out, folds, run.folds_path, cfg.model_dump(), run.force_retrain, echo,
                    delete=ctx.is_main)
    ctx.barrier()
    todo = [j for j in jobs if not os.path.exists(member_path(run.out, *j))]
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
        path = member_path(run.out, fold, seed)
        if (fold, seed) not in todo:
            if ctx.is_main and train:
                echo(f"{tag}[{i + 1}/{len(jobs)}] fold {fold} seed {seed}: done already ({path}), reused")
            continue
        train_keys, val_keys = fold_split(folds, fold)
        after = sum(1 for j in jobs[i + 1:] if j in todo)
        try:
            res = Trainer(cfg, dataset, train_keys, val_keys, fold, seed, path,
                          os.path.join(run.out, ".work", f"fold{fold}_seed{seed}"), ctx, init_state=init_state,
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

    folds = prep.folds
    prune_oof(run.out, folds)
    all_jobs = [(f["fold"], s) for f in folds["folds"] for s in run.seeds]
    summary = summarise(run.out, all_jobs, folds, prep.dataset, run.seeds)
    summary["failed"] = list(failed or [])
    atomic_write_text(os.path.join(run.out, "cv_summary.json"), json.dumps(summary, indent=2) + "\n")
    table = render_summary(summary)
    atomic_write_text(os.path.join(run.out, "cv_summary.txt"), table + "\n")
    atomic_write_text(os.path.join(run.out, "training_log.txt"), render_training_log(summary))
    from training.reporting.curves import plot_curves, read_histories

    plot_curves(read_histories(run.out), os.path.join(run.out, "curves.png"), title=f"glacier-train cv: {run.out}")
    echo(table)
    return summary
