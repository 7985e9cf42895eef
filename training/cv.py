"""``glacier-train cv``: every fold x seed, resumable, with a summary and OOF arrays."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click
import numpy as np

log = logging.getLogger("glacier.train")


def _parse_set(values: Sequence[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"--set expects key=value (e.g. train.epochs=3), got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def member_path(out: str, fold: int, seed: int) -> str:
    return os.path.join(out, f"fold{fold}_seed{seed}.pt")


def oof_score(out: str, folds: Dict, dataset, seeds: Sequence[int]) -> Optional[float]:
    """MCC of out-of-fold predictions over every training tile (mean over seeds' probs).
    The saved probabilities already carry the masked-pixel rule (``Predictor.masked_to_background``)."""
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
    return acc.mcc if seen else None


def summarise(out: str, jobs: List[Tuple[int, int]], folds: Dict, dataset, seeds) -> Dict[str, Any]:
    from training.checkpoint import load_checkpoint

    rows = []
    for fold, seed in jobs:
        p = member_path(out, fold, seed)
        if not os.path.exists(p):
            continue
        ck = load_checkpoint(p)
        rows.append({"fold": fold, "seed": seed, "val_mcc": ck.get("val_mcc"), "best_epoch": ck.get("best_epoch"),
                     "epochs_run": ck.get("epochs_run"), "seconds": ck.get("train_seconds"),
                     "per_class": ck.get("per_class"), "path": p, "arch": ck["spec"]["arch"],
                     "encoder": ck["spec"]["encoder"]})
    mccs = [r["val_mcc"] for r in rows if r["val_mcc"] is not None]
    summary = {
        "members": rows,
        "mean_val_mcc": float(np.mean(mccs)) if mccs else None,
        "std_val_mcc": float(np.std(mccs)) if mccs else None,
        "oof_mcc": oof_score(out, folds, dataset, seeds),
        "class_names": list(dataset.class_names),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return summary


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
    return "\n".join(lines)


def run_cv(config: str, data: str, folds_path: str, seeds: Sequence[int], out: str,
           only_folds: Optional[Sequence[int]] = None, device: str = "auto", overrides: Optional[Dict] = None,
           init_from: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    from training.checkpoint import load_checkpoint
    from training.config import load_config
    from training.data.competition import CompetitionDataset
    from training.distributed import cleanup, init_distributed
    from training.folds import fold_split, load_folds
    from training.loop import train_member

    cfg = load_config(config, overrides)
    if init_from:
        cfg.init_from = init_from
    folds = load_folds(folds_path)
    dataset = CompetitionDataset(data, label_mode=cfg.data.label_mode, cache_dir=cfg.data.cache_dir)
    missing = sorted({t for f in folds["folds"] for t in f["val"] + f["train"]} - set(dataset.keys))
    if missing:
        raise click.ClickException(f"{folds_path} names tiles not found in {data}: {missing[:8]}; "
                                   "re-create the folds for this data folder")
    fold_ids = [f["fold"] for f in folds["folds"]]
    if only_folds:
        bad = [f for f in only_folds if f not in fold_ids]
        if bad:
            raise click.ClickException(f"--fold {bad} not in {folds_path} (has {fold_ids})")
        fold_ids = list(only_folds)
    jobs = [(f, s) for f in fold_ids for s in seeds]
    init_state = None
    if cfg.init_from:
        from training.transfer import load_init_state

        lines: List[str] = []
        init_state = load_init_state(cfg.init_from, cfg, lines)
        for line in lines:
            click.echo(line)
    ctx = init_distributed(device)
    os.makedirs(out, exist_ok=True)
    try:
        for i, (fold, seed) in enumerate(jobs):
            path = member_path(out, fold, seed)
            if os.path.exists(path):
                try:
                    load_checkpoint(path)
                    if ctx.is_main:
                        click.echo(f"[{i + 1}/{len(jobs)}] fold {fold} seed {seed}: done already ({path}), skipped")
                    continue
                except Exception as exc:  # noqa: BLE001
                    log.warning("%s unreadable (%s); training it again", path, exc)
            train_keys, val_keys = fold_split(folds, fold)
            res = train_member(cfg, dataset, train_keys, val_keys, fold, seed, path,
                               os.path.join(out, ".work", f"fold{fold}_seed{seed}"), ctx, progress=progress,
                               init_state=init_state)
            if ctx.is_main:
                click.echo(f"[{i + 1}/{len(jobs)}] fold {fold} seed {seed}: val MCC {res['val_mcc']:.4f} "
                           f"(best epoch {res['best_epoch']}, {res['seconds']:.0f} s)")
    finally:
        cleanup(ctx)
    if not ctx.is_main:
        return {}
    summary = summarise(out, [(f, s) for f in [x["fold"] for x in folds["folds"]] for s in seeds], folds, dataset, seeds)
    from glacier_runtime.atomic import atomic_write_bytes

    atomic_write_bytes(os.path.join(out, "cv_summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    table = render_summary(summary)
    atomic_write_bytes(os.path.join(out, "cv_summary.txt"), (table + "\n").encode())
    click.echo(table)
    return summary


def _launch_ddp(gpus: int, argv: List[str]) -> int:
    """Re-run this command under torchrun with ``gpus`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "training.cli", "cv"] + argv
    click.echo("launching: " + " ".join(cmd))
    return subprocess.call(cmd)


def _launch_fold_parallel(n: int, argv: List[str], fold_ids: List[int]) -> int:
    """Run folds in ``n`` processes at once, one GPU each (round-robin over folds)."""
    procs = []
    for i in range(n):
        mine = fold_ids[i::n]
        if not mine:
            continue
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = str(i)
        cmd = [sys.executable, "-m", "training.cli", "cv"] + argv + [a for f in mine for a in ("--fold", str(f))]
        click.echo(f"worker {i} (GPU {i}): folds {mine}")
        procs.append(subprocess.Popen(cmd, env=env))
    return max(p.wait() for p in procs) if procs else 0


@click.command("cv")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False), help="YAML config (see configs/).")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Competition-layout training folder.")
@click.option("--folds", "folds_path", required=True, type=click.Path(exists=True, dir_okay=False), help="folds.json from `glacier-train folds`.")
@click.option("--seeds", "seeds", multiple=True, type=int, default=(0,), show_default=True, help="Seeds; repeat or space-separate after one flag: --seeds 0 --seeds 1.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for fold{k}_seed{s}.pt, oof/, cv_summary.json.")
@click.option("--fold", "only_folds", multiple=True, type=int, help="Train only these folds (repeatable).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(1, 16), help="DDP over this many processes (torchrun; NCCL on CUDA, gloo on CPU).")
@click.option("--parallel-folds", default=1, show_default=True, type=click.IntRange(1, 16), help="Train this many folds at once, one GPU each (usually the better use of two T4s).")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), help="Initialise from a pre-trained checkpoint (layers matched by name).")
@click.option("--set", "sets", multiple=True, help="Override a config value, e.g. --set train.epochs=3.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
def cv_command(config, data, folds_path, seeds, out, only_folds, device, gpus, parallel_folds, init_from, sets, no_progress):
    """Train every fold x seed; finished members are skipped, interrupted ones resume."""
    argv = _own_args("cv")
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        if argv is None:
            raise click.ClickException("--gpus > 1 must be used from the command line")
        clean = _strip_option(argv, "--gpus")
        sys.exit(_launch_ddp(gpus, clean))
    if parallel_folds > 1:
        if argv is None:
            raise click.ClickException("--parallel-folds must be used from the command line")
        from training.folds import load_folds

        ids = list(only_folds) or [f["fold"] for f in load_folds(folds_path)["folds"]]
        rc = _launch_fold_parallel(parallel_folds, _strip_option(_strip_option(argv, "--parallel-folds"), "--fold"), ids)
        if rc:
            sys.exit(rc)
        only_folds = tuple(ids)  # all finished by the workers: the run below only summarises
    try:
        run_cv(config, data, folds_path, seeds, out, only_folds, device, _parse_set(sets), init_from,
               progress=not no_progress)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("\ninterrupted: finished members are kept and the current one resumes from its last "
                   "epoch; re-run the same command to continue", err=True)
        sys.exit(130)


def _own_args(command: str) -> Optional[List[str]]:
    """The arguments after the sub-command on the real command line (None if not found)."""
    if command in sys.argv[1:]:
        return list(sys.argv[sys.argv.index(command, 1) + 1:])
    return None


def _strip_option(argv: List[str], name: str) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


@click.command("pretrain")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False), help="YAML config, e.g. configs/hkh_pretrain_t4x2.yaml.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Folder of extracted HKH patches (img_*.npy / mask_*.npy; train/ and val/ optional).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write, e.g. weights/hkh.pt.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--val-patches", default=64, show_default=True, type=int, help="Validation patches scored each epoch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(1, 16), help="DDP over this many processes (torchrun).")
@click.option("--set", "sets", multiple=True, help="Override a config value, e.g. --set train.epochs=3.")
@click.option("--no-progress", is_flag=True)
def pretrain_command(config, data, out, seed, val_patches, device, gpus, sets, no_progress):
    """Pre-train on HKH Glacier Mapping patches, bands matched to the competition's by role."""
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        argv = _strip_option(_own_args("pretrain") or [], "--gpus")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "training.cli", "pretrain"] + argv
        click.echo("launching: " + " ".join(cmd))
        sys.exit(subprocess.call(cmd))
    from training.pretrain import pretrain

    try:
        res = pretrain(config, data, out, seed, val_patches, device, _parse_set(sets), progress=not no_progress)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if res:
        click.echo(f"wrote {out}: val MCC {res['val_mcc']:.4f} on {res['val_patches']} HKH patches "
                   f"(best epoch {res['best_epoch']}, {res['seconds']:.0f} s)")
