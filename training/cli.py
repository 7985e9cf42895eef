"""``glacier-train``: synthetic data, inspection, folds, cross-validated training."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Tuple

import click


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """Train glacier segmentation models on 5-band tiles (competition layout)."""
    _setup_logging(verbose)


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write train/ (and unseen/) into.")
@click.option("--tiles", default=25, show_default=True, type=click.IntRange(1, 10_000), help="Number of training tiles (a scene grid cut into row_col tiles).")
@click.option("--size", nargs=2, type=click.IntRange(32, 8192), default=(512, 512), show_default=True, help="Tile height and width in pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed writes the same files.")
@click.option("--unseen-tiles", default=0, show_default=True, type=click.IntRange(0, 10_000), help="Also write an 'unseen region' split (shifted illumination, elevation, class mix) to OUT/unseen with test-style names img001.tif.")
def synth(out: str, tiles: int, size: Tuple[int, int], seed: int, unseen_tiles: int) -> None:
    """Write the synthetic benchmark in the exact competition layout."""
    from training.data.synth import generate_dataset

    res = generate_dataset(out, tiles, tuple(size), seed, unseen_tiles)
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
    from training.inspection import inspect_dataset, render_inspection

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
@click.option("--block", default=2, show_default=True, type=click.IntRange(1, 1000), help="Spatial block size in grid cells: tiles in one block x block cell share a fold.")
@click.option("--out", default="folds.json", show_default=True, type=click.Path(dir_okay=False), help="Where to write the folds.")
@LABEL_MODE
def folds(data: str, k: int, seed: int, block: int, out: str, label_mode: str) -> None:
    """Write k folds over tiles, stratified on rare classes and grouped spatially."""
    from training.folds import make_folds, save_folds

    ds = _open(data, label_mode)
    counts = {key: ds.class_pixels(key).tolist() for key in ds.keys}
    try:
        result = make_folds(counts, k=k, seed=seed, block=block, class_names=ds.class_names)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    result["data"] = os.path.abspath(data)
    save_folds(result, out)
    names = ds.class_names
    click.echo(f"{'fold':>4}  {'tiles':>5}  " + "  ".join(f"{n:>12}" for n in names))
    for f in result["folds"]:
        click.echo(f"{f['fold']:>4}  {len(f['val']):>5}  " + "  ".join(f"{v:>12d}" for v in f["val_class_pixels"]))
    click.echo(f"wrote {out}")


from training.fetch import fetch_command  # noqa: E402  (download + safe extraction: issue 17)

cli.add_command(fetch_command)


# Registered here so `glacier-train --help` lists them; implemented in training.cv.
try:  # pragma: no cover - import guard for environments without the training extra
    from training.cv import cv_command, pretrain_command  # noqa: E402

    cli.add_command(cv_command)
    if pretrain_command is not None:
        cli.add_command(pretrain_command)
except ImportError as _exc:  # noqa: F841
    pass


MULTI_VALUE_OPTIONS = ("--seeds",)


def expand_multi(argv, names=MULTI_VALUE_OPTIONS):
    from training.argv import expand_multi as _expand

    return _expand(argv, names)


def main(argv=None) -> None:
    """Console entry point."""
    cli.main(args=expand_multi(list(sys.argv[1:] if argv is None else argv)), prog_name="glacier-train")


if __name__ == "__main__":
    main()
