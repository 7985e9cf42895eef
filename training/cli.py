"""``glacier-train``: synthetic data, inspection, folds, cross-validated training."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Tuple

import click

from glacier_cli.argv import expand_multi


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """Train glacier segmentation models on 5-band tiles (competition layout)."""
    _setup_logging(verbose)


_REGION_NAMES = ("khumbu", "lahaul", "karakoram", "bhutan", "tienshan")  # training/data/scenes/regions.py
_EFFECTS = ("inventory_labels", "label_resampling", "misregistration", "label_omission", "psf", "topo_shading",
            "cast_shadows", "clouds", "snow", "lake_variants", "weak_debris_thermal", "calibration")  # Effects.names()


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write train/ (and unseen/) into.")
@click.option("--tiles", default=25, show_default=True, type=click.IntRange(1, 10_000),
    help="Number of training tiles (one scene cut into tiles that continue each other).")
@click.option("--size", nargs=2, type=click.IntRange(32, 8192), default=(512, 512), show_default=True,
    help="Tile height and width in pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed writes the same files.")
@click.option("--unseen-tiles", default=0, show_default=True, type=click.IntRange(0, 10_000),
    help="Also write OUT/unseen: tiles of another region (--unseen-region), as a hidden test region is.")
@click.option("--layout", type=click.Choice(["phase2", "grid"]), default="phase2", show_default=True,
    help="phase2: Band1..Band5/img001.tif and labels/img001.tif (one name in every folder, tiles numbered in a "
         "shuffled order); grid: the binary phase's per-folder names ending in the grid id (B2_B2_masked_02_07.tif).")
@click.option("--region", type=click.Choice(_REGION_NAMES), default="khumbu", show_default=True,
    help="The region of the training tiles.")
@click.option("--unseen-region", type=click.Choice(_REGION_NAMES), default="bhutan", show_default=True,
    help="The region of OUT/unseen.")
@click.option("--regions", "regions", multiple=True, type=click.Choice(_REGION_NAMES + ("all",)),
    help="Also write OUT/regions/NAME (--tiles tiles of each; 'all' for the five), for leave-one-region-out runs.")
@click.option("--without", "without", multiple=True, type=click.Choice(_EFFECTS),
    help="Switch a physical effect off (repeatable): the generator ablation of benchmarks/generator_ablation.py.")
@click.option("--force", is_flag=True, help="Write even into a folder holding files synth did not write (they may be overwritten).")
def synth(out: str, tiles: int, size: Tuple[int, int], seed: int, unseen_tiles: int, layout: str, region: str,
          unseen_region: str, regions: Tuple[str, ...], without: Tuple[str, ...], force: bool) -> None:
    """Write the synthetic benchmark in the competition's layout (Phase 2 by default)."""
    from training.data.synth import ALL_ON, REGIONS, ForeignFilesError, generate_dataset

    effects = ALL_ON
    for name in without:
        effects = effects.off(name)
    names = sorted(REGIONS) if "all" in regions else list(dict.fromkeys(regions))
    try:
        res = generate_dataset(out, tiles, tuple(size), seed, unseen_tiles, force=force, layout=layout, region=region,
                               unseen_region=unseen_region, regions=names, effects=effects)
    except ForeignFilesError as exc:
        raise click.ClickException(str(exc)) from exc
    for split, ids in res.items():
        click.echo(f"wrote {len(ids)} tiles of {size[0]}x{size[1]} to {os.path.join(out, split)}")


@cli.command("synth-hkh")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for train/ and val/ patch arrays.")
@click.option("--train", "n_train", default=64, show_default=True, type=click.IntRange(1, 100_000), help="Training patches.")
@click.option("--val", "n_val", default=16, show_default=True, type=click.IntRange(0, 100_000), help="Validation patches.")
@click.option("--size", default=128, show_default=True, type=click.IntRange(32, 2048), help="Patch size (HKH uses 512).")
@click.option("--seed", default=0, show_default=True, type=int)
def synth_hkh(out: str, n_train: int, n_val: int, size: int, seed: int) -> None:
    """Write a fake HKH set: the synthetic terrain in HKH's 15 channels and patch layout."""
    from training.data.hkh import write_fake_hkh

    counts = write_fake_hkh(out, n_train, n_val, size, seed)
    click.echo(f"wrote {counts} patches of {size}x{size}x15 to {out}")


@cli.command("synth-scene")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the scene folder into.")
@click.option("--size", nargs=2, type=int, default=(3072, 3072), show_default=True, help="Height and width in pixels.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--region", type=click.Choice(_REGION_NAMES), default="khumbu", show_default=True)
@click.option("--content", type=click.Choice(["synthetic", "noise"]), default="synthetic", show_default=True,
    help="synthetic: the generator's glaciers (as the tiles of `synth`); noise: random DNs (fast; memory tests).")
@click.option("--date", default="20211015", show_default=True, help="Acquisition date in the scene id (YYYYMMDD).")
def synth_scene(out: str, size: Tuple[int, int], seed: int, region: str, content: str, date: str) -> None:
    """Write a synthetic Landsat 8 Collection 2 Level-1 scene folder (georeferenced band
    GeoTIFFs, QA_PIXEL, MTL) for `glacier-submit map`."""
    from training.data.landsat import scene_id, write_landsat_scene
    from training.data.synth import REGIONS

    if not (len(date) == 8 and date.isdigit()):
        raise click.BadParameter(f"{date!r}: give the date as YYYYMMDD", param_hint="--date")
    s = write_landsat_scene(out, size[0], size[1], seed, content, REGIONS[region], name=scene_id(date=date))
    click.echo(f"wrote {s.folder} ({size[0]}x{size[1]} px, EPSG:32645, 30 m)")


def _open(data: str, label_mode: str, require_labels: bool = True):
    from training.data.competition import CompetitionDataset, DataError

    try:
        return CompetitionDataset(data, label_mode=label_mode, require_labels=require_labels)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc


LABEL_MODE = click.option("--label-mode", type=click.Choice(["multiclass", "binary"]), default="multiclass", show_default=True,
                          help="multiclass: labels {0,85,170,255}; binary: the earlier phase's {0,1} or {0,255}.")


@cli.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@LABEL_MODE
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the inspection as JSON.")
def inspect(data: str, label_mode: str, json_out: Optional[str]) -> None:
    """Print tiles, sizes, dtypes, band statistics, class shares and every problem found."""
    from training.data.inspection import inspect_dataset, render_inspection

    ds = _open(data, label_mode, require_labels=False)
    report = inspect_dataset(ds)
    click.echo(render_inspection(report))
    if json_out:
        from glacier_runtime.atomic import atomic_write_bytes

        atomic_write_bytes(json_out, json.dumps(report, indent=2).encode())
    if report["errors"]:
        sys.exit(1)


@cli.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--k", default=5, show_default=True, type=click.IntRange(2, 100), help="Number of folds.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for tie-breaking; same seed, same folds.")
@click.option("--block", default=2, show_default=True, type=click.IntRange(1, 1000),
    help="Spatial block size in tiles: tiles in one block x block cell of the scene share a fold.")
@click.option("--grouping", type=click.Choice(["auto", "grid", "georeferencing", "file", "edges", "none"]),
    default="auto", show_default=True,
    help="How neighbours are found: auto = grid ids in the names, else the files' georeferencing, else --groups, "
         "else the mosaic rebuilt from edge continuity.")
@click.option("--groups", "groups_file", type=click.Path(exists=True, dir_okay=False),
    help="A file giving each tile its group (JSON {tile: group} or CSV tile,group): tiles of one group share a fold.")
@click.option("--out", default="folds.json", show_default=True, type=click.Path(dir_okay=False), help="Where to write the folds.")
@LABEL_MODE
def folds(data: str, k: int, seed: int, block: int, grouping: str, groups_file: Optional[str], out: str,
          label_mode: str) -> None:
    """Write k folds over tiles, stratified on rare classes and grouped spatially."""
    from training.folds import data_provenance, dataset_files, make_folds, save_folds
    from training.grouping import group_tiles

    ds = _open(data, label_mode)
    counts = {key: ds.class_pixels(key).tolist() for key in ds.keys}
    try:
        g = group_tiles(ds, block, grouping, groups_file)
        result = make_folds(counts, k=k, seed=seed, block=block, class_names=ds.class_names, groups=g.groups)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    result["grouping"] = {"method": g.method, "detail": g.detail}
    result["data"] = os.path.abspath(data)
    result["provenance"] = data_provenance(dataset_files(ds))  # evaluate --folds checks it is the same data
    save_folds(result, out)
    names = ds.class_names
    click.echo(f"grouping: {g.detail}")
    if g.alone and len(ds.keys) > 1:
        click.echo("warning: no tile has a known neighbour, so every tile is its own group: neighbouring tiles can "
                   "sit on both sides of a fold and CV flatters. Give --groups FILE, or check that the tiles were cut "
                   "from one scene.", err=True)
    click.echo(f"{'fold':>4}  {'tiles':>5}  " + "  ".join(f"{n:>12}" for n in names))
    for f in result["folds"]:
        click.echo(f"{f['fold']:>4}  {len(f['val']):>5}  " + "  ".join(f"{v:>12d}" for v in f["val_class_pixels"]))
    click.echo(f"wrote {out}")


def _fail(exc: BaseException) -> "click.ClickException":
    return click.ClickException(str(exc))


def node_options(fn):
    """torchrun's multi-node options, the same on ``cv`` and ``pretrain`` (docs/CLUSTER.md)."""
    opts = [
        click.option("--nnodes", default=1, show_default=True, type=click.IntRange(1, 1024),
                     help="Machines in the DDP run; start the same command on each (with its --node-rank)."),
        click.option("--node-rank", default=0, show_default=True, type=click.IntRange(0, 1023),
                     help="This machine's rank, 0..nnodes-1 (node 0 holds the --out lock)."),
        click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                     help="Rendezvous address, the same on every node (e.g. node 0's host and port 29400)."),
        click.option("--rdzv-backend", default="c10d", show_default=True, type=click.Choice(["c10d", "static"]),
                     help="c10d: nodes may start in any order, rank 0 lands on any node (--out must be shared); "
                          "static: rank 0 on node rank 0."),
        click.option("--rdzv-id", default="glacier-train", show_default=True,
                     help="Run id, the same on every node; differ it for runs that share an endpoint."),
        click.option("--rdzv-timeout", default=None, type=click.IntRange(1), metavar="SECONDS",
                     help="How long a node waits for the others before it gives up (e.g. when node 0 refused "
                          "to start) [default: torchrun's 600].")
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _nodes(nnodes, node_rank, rdzv_endpoint, rdzv_backend, rdzv_id, rdzv_timeout):
    """The parsed node options (None on one node); a mistake is a command-line error."""
    from training.engine.launch import Nodes

    if nnodes == 1 and node_rank == 0:
        return None
    try:
        return Nodes(nnodes, node_rank, rdzv_endpoint, rdzv_backend, rdzv_id, rdzv_timeout).check()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--nnodes/--node-rank/--rdzv-endpoint") from exc


@click.command("cv")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False), help="YAML config (see configs/).")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Competition-layout training folder.")
@click.option("--folds", "folds_path", required=True, type=click.Path(exists=True, dir_okay=False),
    help="folds.json from `glacier-train folds`.")
@click.option("--seeds", "seeds", multiple=True, type=int, default=(0,), show_default=True,
    help="Seeds: --seeds 0 1 2 (or repeat the flag).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
    help="Output folder for fold{k}_seed{s}.pt, oof/, logs/, cv_summary.json (locked while a run uses it).")
@click.option("--fold", "only_folds", multiple=True, type=int, help="Train only these folds (repeatable).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(1, 16),
    help="DDP over this many processes (torchrun; NCCL on CUDA, gloo on CPU): one fold at a time.")
@click.option("--parallel-folds", default=1, show_default=True, type=click.IntRange(1, 16),
    help="Train this many folds at once, one GPU each (usually the better use of two T4s). Not with --gpus.")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False),
    help="Initialise from a pre-trained checkpoint (layers matched by name).")
@click.option("--set", "sets", multiple=True, help="Override a config value, e.g. --set train.epochs=3.")
@click.option("--force-retrain", is_flag=True,
    help="Replace finished members whose fold tiles or config differ from this run's (otherwise the run stops "
         "and names the difference).")
@click.option("--no-progress", is_flag=True, help="No progress bars: one line per epoch even on a terminal.")
@click.option("--worker-id", type=int, hidden=True)
@click.option("--loader-workers", type=int, hidden=True)
@click.option("--parent-lock", is_flag=True, hidden=True)
@click.option("--job-queue", type=click.Path(file_okay=False), hidden=True)
@node_options
@click.pass_context
def cv_command(ctx, config, data, folds_path, seeds, out, only_folds, device, gpus, parallel_folds, init_from, sets,
               force_retrain, no_progress, worker_id, loader_workers, parent_lock, job_queue, nnodes, node_rank,
               rdzv_endpoint, rdzv_backend, rdzv_id, rdzv_timeout):
    """Train every fold x seed; finished members are reused, interrupted ones resume."""
    from training.config import ConfigError
    from training.runs.cv import CvError, CvRun, cv

    verbose = bool(ctx.find_root().params.get("verbose"))
    run = CvRun(config=config, data=data, folds_path=folds_path, out=out, seeds=tuple(seeds),
                only_folds=tuple(only_folds), device=device, sets=tuple(sets), init_from=init_from,
                progress=not no_progress, force_retrain=force_retrain, verbose=verbose, gpus=gpus,
                parallel_folds=parallel_folds, worker=worker_id, loader_workers=loader_workers,
                parent_lock=parent_lock, job_queue=job_queue,
                nodes=_nodes(nnodes, node_rank, rdzv_endpoint, rdzv_backend, rdzv_id, rdzv_timeout))
    try:
        cv(run, echo=lambda line: click.echo(line))
    except (CvError, ConfigError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        click.echo("\ninterrupted: finished members are kept and the current one resumes from its last "
                   "epoch; re-run the same command to continue", err=True)
        sys.exit(130)


def _pretrain_rank_args(verbose, config, data, out, seed, val_patches, device, sets, no_progress, force):
    """The command line each torchrun rank runs: this command again, under the parent's lock."""
    args = (["-v"] if verbose else []) + [
        "pretrain", "--config", config, "--data", data, "--out", out, "--seed", str(seed),
        "--val-patches", str(val_patches), "--device", device, "--parent-lock"]
    for s in sets:
        args += ["--set", s]
    return args + (["--no-progress"] if no_progress else []) + (["--force"] if force else [])


@click.command("pretrain")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False),
    help="YAML config, e.g. configs/hkh_pretrain_t4x2.yaml.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
    help="Folder of extracted HKH patches (img_*.npy / mask_*.npy; train/ and val/ optional).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
    help="Checkpoint to write, e.g. pretrained/hkh.pt (keep it out of the members' folder).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--val-patches", default=64, show_default=True, type=int, help="Validation patches scored each epoch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(1, 16), help="DDP over this many processes (torchrun).")
@click.option("--set", "sets", multiple=True, help="Override a config value, e.g. --set train.epochs=3.")
@click.option("--no-progress", is_flag=True, help="No progress bars: one line per epoch even on a terminal.")
@click.option("--force", is_flag=True,
    help="Train again even when --out is a finished pre-training of this config, data and seed (it is kept "
         "and the run skipped otherwise).")
@click.option("--parent-lock", is_flag=True, hidden=True)
@node_options
@click.pass_context
def pretrain_command(ctx, config, data, out, seed, val_patches, device, gpus, sets, no_progress, force, parent_lock,
                     nnodes, node_rank, rdzv_endpoint, rdzv_backend, rdzv_id, rdzv_timeout):
    """Pre-train on HKH Glacier Mapping patches, bands matched to the competition's by role."""
    from training.config import ConfigError
    from training.runs.pretrain import PretrainDone, check_finished, pretrain
    from training.runs.run import CvError, parse_sets

    nodes = _nodes(nnodes, node_rank, rdzv_endpoint, rdzv_backend, rdzv_id, rdzv_timeout)
    try:
        overrides = parse_sets(sets)
        done = check_finished(config, data, out, seed, val_patches, overrides, force)  # config errors too
    except (CvError, ConfigError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    if done:
        click.echo(f"{out} is a finished pre-training of this config and data ({done}): kept, nothing to do "
                   "(--force trains it again)")
        return
    if (gpus > 1 or nodes is not None) and "WORLD_SIZE" not in os.environ:
        verbose = bool(ctx.find_root().params.get("verbose"))
        _pretrain_ddp(gpus, _pretrain_rank_args(verbose, config, data, out, seed, val_patches, device, sets,
                                                no_progress, force), out, device, nodes)
        return
    try:
        res = pretrain(config, data, out, seed, val_patches, device, overrides, progress=not no_progress, force=force,
                       parent_lock=parent_lock)
    except PretrainDone as exc:
        click.echo(str(exc))
        return
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    if res:
        click.echo(f"wrote {out}: val MCC {res['val_mcc']:.4f} on {res['val_patches']} HKH patches "
                   f"(best epoch {res['best_epoch']}, {res['seconds']:.0f} s)")
        if res.get("grade"):
            click.echo(f"grade against the pre-training targets: {res['grade']['grade']} "
                       f"(every criterion: {res['log_path']})")


def _pretrain_ddp(gpus: int, args, out: str, device: str, nodes=None) -> None:
    """The parent of the pre-training ranks: holds the run lock until every rank is gone
    (on node rank 0 of a multi-node run; the other nodes' parents only launch)."""
    from training.engine.distributed import DeviceError, check_device
    from training.engine.launch import describe_rc, run_torchrun, split_cpus
    from training.engine.runlock import LockedError, RunLock

    try:
        check_device(device)
        lock = RunLock(out + ".work").acquire() if nodes is None or nodes.first else None
    except (DeviceError, LockedError) as exc:
        raise _fail(exc) from exc
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(split_cpus(gpus, 0)["threads"]))
        rc = run_torchrun(gpus, args, echo=lambda line: click.echo(line), env=env, nodes=nodes)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: every rank has stopped; re-run the same command to resume from the last epoch",
                   err=True)
        sys.exit(130)
    finally:
        if lock is not None:
            lock.release()
    if rc:
        raise click.ClickException(f"the DDP pre-training run {describe_rc(rc)} (the failing rank's message is "
                                   "above); re-run the same command to resume")


cli.add_command(cv_command)
cli.add_command(pretrain_command)

from training.data.fetch import fetch_command  # noqa: E402  (download + safe extraction)

cli.add_command(fetch_command)

#: Options that take several space-separated values (``--seeds 0 1 2``).
MULTI_VALUE_OPTIONS = ("--seeds",)


def main(argv=None) -> None:
    """Console entry point."""
    cli.main(args=expand_multi(list(sys.argv[1:] if argv is None else argv), MULTI_VALUE_OPTIONS),
             prog_name="glacier-train")


if __name__ == "__main__":
    main()
