"""``glacier-submit``: predict with members, export ONNX, build and evaluate bundles."""
from __future__ import annotations

import glob
import logging
import os
from typing import List, Optional

import click


def _floats(text: Optional[str], name: str) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError as exc:
        raise click.BadParameter(f"{name} expects numbers like 0.75,1,1.25 (got {text!r})") from exc


def _tta(text: str):
    from glacier_runtime.tta import PRESETS, resolve_views

    value = text if text in PRESETS else [t.strip() for t in text.split(",") if t.strip()]
    try:
        resolve_views(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


def _expand(models) -> List[str]:
    out: List[str] = []
    for m in models:
        hits = sorted(glob.glob(m)) if any(c in m for c in "*?[") else [m]
        out += hits
    paths = [p for p in out if p.endswith(".pt")]
    if not paths:
        raise click.BadParameter(f"no .pt member checkpoints among {list(models)} (e.g. --models weights/fold*_seed*.pt)")
    return paths


TTA_HELP = "TTA views: none | flips | d4, or a comma list of identity,rot90,rot180,rot270,hflip,hflip_rot90,vflip,hflip_rot270."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """Turn trained checkpoints into a platform-proof competition submission."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--models", multiple=True, required=True, help="Member checkpoints (globs allowed), e.g. 'weights/*.pt'.")
@click.option("--out", default="submission", show_default=True, type=click.Path(file_okay=False), help="Bundle folder.")
@click.option("--tta", default="none", show_default=True, help=TTA_HELP)
@click.option("--scales", default="1", show_default=True, help="Comma list of test scales, e.g. 0.75,1,1.25.")
@click.option("--merge", type=click.Choice(["mean", "weighted"]), default="mean", show_default=True,
    help="Ensemble merge: mean, or weighted by validation MCC (or --weights).")
@click.option("--weights", default=None, help="Comma list of member weights (implies --merge weighted).")
@click.option("--postprocess", default="none", show_default=True,
    help="Preset shipped in glacier_submit/presets (none, light, competition) or a YAML path.")
@click.option("--crf", is_flag=True,
    help="Refine the merged probabilities with a convolutional CRF on the tile's bands "
         "(glacier_runtime/crf.py). --tune oof with --tune-data tries it by itself and keeps it only when it "
         "helps.")
@click.option("--adapt", type=click.Choice(["none", "bn"]), default="none", show_default=True,
    help="Test-time adaptation in the bundle: bn = each member's batch-norm statistics re-estimated on the test "
         "tiles it is given, before predicting (glacier_runtime/adapt.py; torch backend). Its cost is in the time "
         "estimate; `evaluate --compare` shows its effect.")
@click.option("--bias", default="auto", show_default=True,
    help="auto (tune on out-of-fold predictions beside the members; left at 0 under --crf, whose output it "
         "would shift), none, or comma list per class.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
    help="auto: pure-torch runtime when every member has one, else ONNX.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default="auto", show_default=True,
    help="Weight storage; auto switches to fp16 only if fp32 exceeds --max-mb. int8: static int8 ONNX graphs "
         "(needs --calib-data; backend onnx, so onnxruntime where the bundle runs; docs/BUNDLE.md).")
@click.option("--calib-data", type=click.Path(exists=True, file_okay=False), default=None,
    help="--precision int8: the training folder the members were trained on; each member is calibrated on its "
         "own training tiles (default: --tune-data).")
@click.option("--allow-int8", is_flag=True,
    help="Let --time-budget switch to int8 (same calibration and agreement check) when fp32 is too slow, "
         "before any TTA, scale or member is dropped.")
@click.option("--int8-min-agreement", type=click.FloatRange(0.0, 100.0), default=99.5, show_default=True,
    help="--precision int8: refuse int8 when its class maps equal fp32's on fewer than this percent of pixels.")
@click.option("--max-mb", default=300.0, show_default=True, type=float,
    help="Size budget for the uploaded files (solution.py + model.pth), in MB of 10^6 bytes: the platform's "
         "\"300 MB\" read so that it can never be exceeded.")
@click.option("--time-budget", default=None, type=float,
    help="Seconds per tile allowed; TTA/scales are reduced to fit (extra scales first, then D4 -> flips -> "
         "none), then the weakest members.")
@click.option("--test-tiles", default=100, show_default=True, type=int, help="Number of test tiles for the total time estimate.")
@click.option("--check-data", type=click.Path(exists=True, file_okay=False),
    help="Take the timing check tile from this folder (default: a synthetic 512x512 tile).")
@click.option("--single-file", is_flag=True, help="Embed the weights in solution.py (for platforms that accept one file).")
@click.option("--device", default="cpu", show_default=True, help="Device for the timing check (cpu or cuda).")
@click.option("--max-members", type=click.IntRange(min=1), default=None,
    help="Keep at most N members (strongest by validation MCC, each fold's strongest first).")
@click.option("--tune", type=click.Choice(["none", "oof"]), default="none", show_default=True,
    help="oof: choose seeds per fold, TTA, scales, CRF, bias and post-processing from the members' out-of-fold"
         " predictions (bootstrap over tiles; docs/DECISIONS.md); --tta/--scales/--postprocess/--bias are then"
         " ignored.")
@click.option("--tune-data", type=click.Path(exists=True, file_okay=False), default=None,
    help="The training folder the members were trained on: lets --tune oof re-predict OOF tiles to judge TTA "
         "and scales.")
@click.option("--tune-confidence", type=click.FloatRange(0.5, 0.999), default=0.95, show_default=True,
    help="A setting is adopted when the bootstrap lower bound of its OOF gain at this confidence is above 0.")
def build(models, out, tta, scales, merge, weights, postprocess, crf, adapt, bias, backend, precision, calib_data,
          allow_int8, int8_min_agreement, max_mb, time_budget, test_tiles, check_data, single_file, device, max_members, tune,
          tune_data, tune_confidence):
    """Build solution.py + model.pth + manifest.json + submission.zip from member checkpoints."""
    from glacier_submit.bundle import BudgetError, build as do_build
    from glacier_submit.manifest import render_manifest
    from training.engine.checkpoint import CheckpointError

    b = bias if bias in ("auto", "none") else _floats(bias, "--bias")
    try:
        m = do_build(_expand(models), out, tta=_tta(tta), scales=_floats(scales, "--scales"), merge=merge,
                     weights=_floats(weights, "--weights"), postprocess=postprocess, backend=backend,
                     max_mb=max_mb, time_budget=time_budget, test_tiles=test_tiles, precision=precision, bias=b,
                     check_data=check_data, single_file=single_file, device=device, max_members=max_members,
                     tune=tune, tune_data=tune_data, tune_confidence=tune_confidence, calib_data=calib_data,
                     int8_min_agreement=int8_min_agreement, allow_int8=allow_int8, crf=crf,
                     adapt=None if adapt == "none" else adapt, echo=click.echo)
    except (BudgetError, CheckpointError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render_manifest(m))
    click.echo(f"\nwrote {out}/" + ", ".join(sorted(m["files"])) + ", manifest.json, submission.zip")


@cli.command()
@click.option("--models", multiple=True, required=True, help="Member checkpoints (globs allowed).")
@click.option("--out", default="onnx", show_default=True, type=click.Path(file_okay=False), help="Folder for NAME.onnx files.")
@click.option("--fp16", is_flag=True, help="Also write NAME.fp16.onnx and report its class agreement.")
def export(models, out, fp16):
    """Export members to ONNX (opset 17, dynamic batch/height/width) with a parity check."""
    from glacier_runtime.atomic import atomic_write_bytes
    from glacier_submit.export import ExportError, export_member
    from glacier_submit.members import load_members

    os.makedirs(out, exist_ok=True)
    for e in load_members(_expand(models)):
        try:
            res = export_member(e)
        except ExportError as exc:
            raise click.ClickException(str(exc)) from exc
        atomic_write_bytes(os.path.join(out, f"{e['name']}.onnx"), res["onnx"])
        line = f"{e['name']}: max |torch - onnx| {res['parity']['max_abs_diff']:.2e}"
        if fp16:
            r16 = export_member(e, fp16=True)
            atomic_write_bytes(os.path.join(out, f"{e['name']}.fp16.onnx"), r16["onnx"])
            line += f"; fp16 class agreement {r16['parity_fp16']['class_agreement'] * 100:.3f} %"
        click.echo(line)


@cli.command()
@click.option("--models", multiple=True, help="Member checkpoints (globs allowed).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="A built bundle folder instead of --models.")
@click.option("--input", "input_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Folder with Band1..Band5.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for masks (named as the Band1 files).")
@click.option("--tta", default=None, help=TTA_HELP + " Default: the bundle's, or none.")
@click.option("--scales", default=None, help="Comma list of test scales.")
@click.option("--merge", type=click.Choice(["mean", "weighted"]), default=None, help="Ensemble merge rule.")
@click.option("--postprocess", default=None, help="Post-processing preset or YAML path.")
@click.option("--bias", default=None, help="none or a comma list per class.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def predict(models, bundle, input_dir, output, tta, scales, merge, postprocess, bias, backend, device):
    """Predict masks with members or a bundle (the same runtime the bundle ships)."""
    from glacier_submit.postprocessing import load_postprocess
    from glacier_submit.members import payload_of
    from glacier_runtime.entry import predict_folder
    from glacier_runtime.predictor import Predictor

    if bool(models) == bool(bundle):
        raise click.UsageError("give either --models or --bundle")
    overrides = {}
    if tta is not None:
        overrides["tta"] = _tta(tta)
    if scales is not None:
        overrides["scales"] = _floats(scales, "--scales")
    if merge is not None:
        overrides["merge"] = merge
    if postprocess is not None:
        overrides["postprocess"] = load_postprocess(postprocess)
    if bias is not None:
        overrides["bias"] = None if bias == "none" else _floats(bias, "--bias")
    from glacier_runtime.safeload import UnsafeFileError
    from glacier_runtime.tiles import TileIdCollision
    from training.engine.checkpoint import CheckpointError

    try:
        payload = payload_of(bundle, _expand(models) if models else ())
    except (UnsafeFileError, CheckpointError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    dev = None if device == "auto" else device
    pred = Predictor.from_payload(payload, device=dev, backend=backend, overrides=overrides)
    summary: dict = {}
    try:
        predict_folder(pred, input_dir, output, progress=True, report=summary)
    except TileIdCollision as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {summary['tiles'] - len(summary['failed'])} masks to {output} ({summary['summary']})")
    if summary["failed"]:
        raise click.ClickException(f"{len(summary['failed'])} tiles failed: {', '.join(summary['failed'])} "
                                   "(see the log lines above)")


@cli.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False), help="Built bundle folder.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Competition-layout folder (labels optional).")
@click.option("--fold", type=int, default=None, help="Evaluate this fold's validation tiles (needs --folds).")
@click.option("--folds", type=click.Path(exists=True, dir_okay=False), help="folds.json.")
@click.option("--tiles", multiple=True, help="Evaluate only these tile ids (repeatable).")
@click.option("--convention", type=click.Choice(["imagepath", "data-dict", "import-call"]), default="imagepath", show_default=True,
    help="How the platform calls the bundle.")
@click.option("--timeout", type=float, default=None,
    help="Kill the bundle after this many seconds (default 600, the sandbox's stand-in for the platform's "
         "unpublished limit).")
@click.option("--allow-leak", is_flag=True, help="Evaluate even if members trained on these tiles (report stamped LEAKY).")
@click.option("--compare", is_flag=True, help="Ablations: TTA sets, single member vs ensemble, each post-processing rule, bias.")
@click.option("--out", default="report", show_default=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--python", "python_exe", default=None,
    help="Interpreter for the bundle (e.g. .venv39/bin/python for the platform's Python 3.9 + torch 2.0).")
@click.option("--label-mode", type=click.Choice(["multiclass", "binary"]), default="multiclass", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
    help="Where the bundle runs: cpu (the platform's masks and timings, even where a GPU exists) or cuda/auto "
         "(GPUs passed through); also the in-process ablations of --compare.")
def evaluate(bundle, data, fold, folds, tiles, convention, timeout, allow_leak, compare, out, python_exe, label_mode,
             device):
    """Run the bundle as the platform does on held-out tiles, score it and write a report."""
    from glacier_submit.evaluate import EvaluateError, evaluate as do_eval, render_report
    from training.data.competition import DataError

    try:
        r = do_eval(bundle, data, out, fold, folds, list(tiles) or None, convention, timeout, allow_leak, compare,
                    python_exe, label_mode, device=device)
    except (EvaluateError, DataError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render_report(r))
    click.echo(f"\nreport: {os.path.join(out, 'report.md')} (and report.html, report.json, figures/)")


@cli.command("map")
@click.argument("scene_folders", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--scenes", "scene_list", type=click.Path(exists=True, dir_okay=False),
    help="A text file of scene folders, one per line: mapped on Dask (see --workers, --scheduler).")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="Built bundle folder (its model.pth).")
@click.option("--models", multiple=True, help="Or member checkpoints (globs allowed), e.g. 'weights/*.pt'.")
@click.option("--out", default="maps", show_default=True, type=click.Path(file_okay=False),
    help="One folder per scene: classes.tif (COG), outlines.gpkg, quicklook.png, summary.json.")
@click.option("--block", default=1024, show_default=True, type=click.IntRange(128, 8192),
    help="Pixels a side predicted at once (the working memory; docs/MAPPING.md).")
@click.option("--simplify", type=click.FloatRange(0), default=None,
    help="Outline tolerance in metres [default: one pixel]: neighbouring bodies are simplified together and keep "
         "shared boundaries; 0 keeps the pixel edges.")
@click.option("--no-outlines", is_flag=True, help="Only the class raster, quick-look and summary.")
@click.option("--tta", default=None, help="Override the stored TTA views. " + TTA_HELP)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256),
    help="Local Dask workers for several scenes (one per GPU where there are GPUs).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
    help="An existing Dask scheduler (tcp://host:8786) instead of a local cluster.")
@click.option("--retries", default=1, show_default=True, type=click.IntRange(0, 10),
    help="Times a failed scene is tried again before it is reported.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Map again scenes that another model mapped into --out.")
def map_command(scene_folders, scene_list, bundle, models, out, block, simplify, no_outlines, tta, workers, scheduler,
                retries, device, backend, force):
    """Map whole scenes (Landsat Collection 2 folders, or band files named by role) into
    georeferenced class rasters, outlines, quick-looks and summaries."""
    from glacier_submit.mapping.job import missing_extras

    lacking = missing_extras(many=bool(scene_list or scheduler or len(scene_folders) > 1))
    if lacking:
        raise click.ClickException(lacking)
    from glacier_submit.mapping.job import MapOptions, ModelSource, map_scene, summary_line
    from glacier_submit.mapping.many import map_scenes, read_scene_list
    from glacier_submit.mapping.scene import SceneError
    from glacier_runtime.safeload import UnsafeFileError
    from training.engine.checkpoint import CheckpointError

    if bool(models) == bool(bundle):
        raise click.UsageError("give either --bundle or --models")
    try:
        scenes = list(scene_folders) + (read_scene_list(scene_list) if scene_list else [])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--scenes") from exc
    if not scenes:
        raise click.UsageError("give scene folders, or --scenes LIST")
    # absolute paths: Dask workers (on other machines too) need not share this working folder
    scenes, out = [os.path.abspath(p) for p in scenes], os.path.abspath(out)
    source = ModelSource(bundle=os.path.abspath(bundle) if bundle else None,
                         members=tuple(os.path.abspath(p) for p in _expand(models)) if models else (),
                         device=None if device == "auto" else device, backend=backend,
                         overrides={"tta": _tta(tta)} if tta else {})
    options = MapOptions(block=block, simplify=simplify, outlines=not no_outlines, force=force)
    if len(scenes) == 1 and not scheduler and not scene_list:
        import rasterio

        try:
            s = map_scene(scenes[0], out, source, options)
        except (SceneError, UnsafeFileError, CheckpointError, ValueError, OSError, rasterio.errors.RasterioError) as exc:
            raise click.ClickException(f"{scenes[0]}: {exc}" if scenes[0] not in str(exc) else str(exc)) from exc
        click.echo(summary_line(s))
        for w in s.get("warnings", []):
            click.echo(f"warning: {w}", err=True)
        click.echo(f"wrote {os.path.join(out, s['scene'])}")
        return
    try:
        report = map_scenes(scenes, out, source, options, workers=workers, scheduler=scheduler, retries=retries,
                            echo=click.echo)
    except SceneError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{len(report.done)} mapped, {len(report.skipped)} done already, {len(report.failed)} failed "
               f"(report: {os.path.join(out, 'map_report.json')})")
    if report.failed:
        raise click.ClickException(f"{len(report.failed)} of {len(scenes)} scene(s) failed after {retries} retr"
                                   f"{'y' if retries == 1 else 'ies'}: " + "; ".join(f["scene"] for f in report.failed)
                                   + ". Fix them and re-run the same command: finished scenes are skipped.")


def main(argv=None) -> None:
    """Console entry point; ``--models weights/*`` (shell-expanded) works unquoted."""
    import sys

    from glacier_cli.argv import expand_multi

    cli.main(args=expand_multi(list(sys.argv[1:] if argv is None else argv), ("--models",)),
             prog_name="glacier-submit")


if __name__ == "__main__":
    main()
