"""``glacier-train fetch``: download (resumable, mirrors, verified), extract safely, then
run the matching reader and print its summary.

``fetch hkh --out DIR`` takes the HKH Glacier Mapping patches (29.4 GB) from the public
mirrors below; ``fetch URL --out DIR`` any archive (the competition's zip). The moving
parts live in :mod:`training.data.download` and :mod:`training.data.extract`.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import click

from training.data.download import Downloader, FetchError, human
from training.data.extract import ArchiveError, UnsafeArchiveError, archive_kind, marker_path, safe_extract

HKH_MIRRORS = (
    "https://lilawildlife.blob.core.windows.net/lila-wildlife/icimod-glacier-mapping/hkh_patches.tar.gz",
    "https://storage.googleapis.com/public-datasets-lila/icimod-glacier-mapping/hkh_patches.tar.gz",
    "http://us-west-2.opendata.source.coop.s3.amazonaws.com/agentmorris/lila-wildlife/icimod-glacier-mapping/hkh_patches.tar.gz",
)
LAYOUTS = ("auto", "competition", "hkh", "none")
#: extracted size / archive size assumed for a compressed tar before its size can be read
EXTRACT_FACTOR = 1.6


def _find_dirs(root: str, accept: Callable[[str, List[str], List[str]], bool], depth: int = 4) -> List[str]:
    found = []
    base = root.rstrip(os.sep).count(os.sep)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folder.count(os.sep) - base > depth:
            dirs[:] = []
            continue
        if accept(folder, dirs, files):
            found.append(folder)
            dirs[:] = []
    return found


def competition_roots(root: str) -> List[str]:
    """Folders holding ``Band1`` .. ``Band5`` (the competition layout)."""
    need = {f"Band{i}" for i in range(1, 6)}
    return _find_dirs(root, lambda f, d, _: need <= set(d))


def hkh_root(root: str) -> Optional[str]:
    """The folder to pass to ``pretrain --data``: the shallowest one whose sub-tree holds
    every ``img_*.npy`` (descending through single-folder wrappers such as ``patches/``)."""
    cur = root
    while True:
        entries = [e for e in os.listdir(cur) if not e.startswith(".")]
        subdirs = [e for e in entries if os.path.isdir(os.path.join(cur, e))]
        npys = [e for e in entries if e.endswith(".npy")]
        if len(subdirs) == 1 and not npys and not set(subdirs) & {"train", "val", "test"}:
            cur = os.path.join(cur, subdirs[0])
            continue
        return cur


def summarise_hkh(root: str, say: Callable[[str], None]) -> Dict:
    """The HKH adapter's layout detection over ``root``: patches per split, shapes, axes."""
    import numpy as np

    from training.data.hkh import HKH_CHANNELS, HKHPatches, find_patches

    data = hkh_root(root)
    splits = find_patches(data)
    first = next(iter(splits.values()))
    hp = HKHPatches(first[:1], list(HKH_CHANNELS))
    img = np.load(first[0].image, mmap_mode="r")
    mask = np.load(first[0].mask, mmap_mode="r")
    say(f"HKH patches in {data}: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(splits.items())))
    say(f"  first patch {first[0].key}: image {tuple(img.shape)} {img.dtype} (channels on axis {hp.img_axis}), "
        f"mask {tuple(mask.shape)} {mask.dtype}")
    say(f"  ready: glacier-train pretrain --config configs/hkh_pretrain_t4x2.yaml --data {data} --out pretrained/hkh.pt --gpus 2")
    return {"layout": "hkh", "root": data, "patches": {k: len(v) for k, v in splits.items()}}


def summarise_competition(root: str, say: Callable[[str], None]) -> Dict:
    """``glacier-train inspect`` over each competition-layout folder found under ``root``."""
    from training.data.competition import CompetitionDataset, DataError
    from training.data.inspection import inspect_dataset, render_inspection

    out = {"layout": "competition", "roots": [], "errors": 0}
    for data in competition_roots(root):
        try:
            ds = CompetitionDataset(data, require_labels=False)
        except DataError as exc:
            say(f"{data}: {exc}")
            out["errors"] += 1
            continue
        rep = inspect_dataset(ds)
        say(render_inspection(rep))
        out["roots"].append(data)
        out["errors"] += len(rep["errors"])
    return out


def summarise(root: str, layout: str, say: Callable[[str], None]) -> Dict:
    """Run the reader that matches what was extracted (``auto``: whichever layout is found)."""
    from training.data.hkh import HKHLayoutError

    if layout == "none":
        return {"layout": "none"}
    if layout in ("auto", "competition") and competition_roots(root):
        return summarise_competition(root, say)
    if layout in ("auto", "hkh"):
        try:
            return summarise_hkh(root, say)
        except HKHLayoutError as exc:
            if layout == "hkh":
                raise FetchError(f"extracted, but the HKH reader found no patches: {exc}") from exc
    seen = sorted(e for e in os.listdir(root) if not e.startswith("."))[:10]
    msg = (f"no {'known' if layout == 'auto' else layout} layout under {root} (top level: {seen}): "
           "expected Band1..Band5 folders (competition) or img_*.npy/mask_*.npy pairs (HKH)")
    if layout == "auto":
        say("note: " + msg)
        return {"layout": None}
    raise FetchError(msg)


def fetch(source: str, out: str, mirrors: Sequence[str] = (), sha256: Optional[str] = None, name: Optional[str] = None,
          extract: bool = True, extract_to: Optional[str] = None, delete_archive: bool = False, layout: Optional[str] = None,
          rounds: int = 4, backoff: float = 2.0, read_timeout: float = 60.0, connect_timeout: float = 15.0,
          say: Callable[[str], None] = lambda m: click.echo(m, err=True), tty: Optional[bool] = None) -> Dict:
    """Download ``source`` (``hkh`` or a URL) into ``out``, extract it, summarise it."""
    if source.lower() == "hkh":
        urls = list(mirrors) or list(HKH_MIRRORS)
        layout = layout or "hkh"
    else:
        if "://" not in source:
            raise FetchError(f"{source!r} is neither 'hkh' nor a URL (http://... or https://...)")
        urls = [source] + [m for m in mirrors if m != source]
        layout = layout or "auto"
    target = extract_to or out
    factor = EXTRACT_FACTOR if extract else 0.0
    dl = Downloader(urls, out, name=name, sha256=sha256, rounds=rounds, backoff=backoff,
                    connect_timeout=connect_timeout, read_timeout=read_timeout,
                    reserve_bytes=lambda size: int((size or 0) * factor), say=say, tty=tty)
    archive = dl.path
    if extract and not os.path.exists(archive) and os.path.exists(marker_path(target, archive)):
        say(f"{os.path.basename(archive)} was extracted into {target} earlier and the archive deleted; nothing to fetch")
        return {"archive": None, "target": target, "summary": summarise(target, layout, say)}
    if len(urls) > 1:
        say("mirrors, in order: " + ", ".join(urls))
    res = dl.run()
    info: Dict = {"archive": res.path, "sha256": res.sha256, "size": res.size, "segments": res.segments}
    if not extract:
        return info
    try:
        archive_kind(res.path)
    except ArchiveError:
        say(f"{res.path} is not an archive: kept as downloaded")
        return info
    safe_extract(res.path, target, say, tty=tty, estimate_factor=EXTRACT_FACTOR)
    if delete_archive:
        os.unlink(res.path)
        say(f"deleted {res.path} (--delete-archive); its checksum stays in {dl.record}")
    info["target"] = target
    info["summary"] = summarise(target, layout, say)
    return info


@click.command("fetch")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the archive (and, by default, its contents).")
@click.option("--mirror", "mirrors", multiple=True,
    help="A URL to use (repeatable, tried in order). For hkh it replaces the built-in mirrors; for a URL it "
         "adds fall-backs.")
@click.option("--sha256", default=None,
    help="Expected SHA-256 of the archive (hex). Without it the digest of the size-checked download is "
         "recorded in NAME.sha256.")
@click.option("--name", default=None, help="File name for the archive (default: the URL's last path part).")
@click.option("--extract-to", type=click.Path(file_okay=False), default=None, help="Extract here instead of --out.")
@click.option("--no-extract", is_flag=True, help="Only download and verify.")
@click.option("--delete-archive", is_flag=True, help="Delete the archive after a complete extraction (kept by default).")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None, help="Reader to run afterwards; default hkh for hkh, auto for a URL.")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1, 100),
    help="Rounds over all mirrors before giving up (back-off doubles between rounds).")
@click.option("--backoff", default=2.0, show_default=True, type=click.FloatRange(0),
    help="Seconds before the second round; doubles each round.")
@click.option("--read-timeout", default=60.0, show_default=True, type=click.FloatRange(0.01),
    help="A mirror that sends no byte for this long has stalled: go to the next one.")
def fetch_command(source: str, out: str, mirrors, sha256, name, extract_to, no_extract, delete_archive, layout, rounds,
                  backoff, read_timeout) -> None:
    """Download SOURCE ('hkh' or a URL) with resume and mirror fall-back, verify it, extract it
    safely and print the matching reader's summary. Re-run the same command to resume."""
    try:
        info = fetch(source, out, mirrors, sha256, name, not no_extract, extract_to, delete_archive, layout, rounds,
                     backoff, read_timeout)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: what was downloaded or extracted is kept in {out}; re-run the same command to resume",
                   err=True)
        sys.exit(130)
    except (FetchError, UnsafeArchiveError, ArchiveError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    summary = info.get("summary") or {}
    if summary.get("errors"):
        sys.exit(1)
    if info.get("archive"):
        click.echo(f"archive: {info['archive']} ({human(info['size'])}, sha256 {info['sha256']})")
    if info.get("target"):
        click.echo(f"data: {summary.get('root') or ', '.join(summary.get('roots', [])) or info['target']}")
