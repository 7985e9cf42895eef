"""Safe, resumable extraction of tar (any compression) and zip archives.

Every member is checked before anything is written for it: no absolute path, no ``..``
component, no destination that resolves outside the target (through a link extracted
earlier, too), no device or FIFO, no symbolic or hard link whose target lies outside.
Where the running Python has it (3.12, and the 3.8.17/3.9.17/3.10.12/3.11.4 back-ports)
tarfile's ``data`` filter is applied on top of these hand checks. A refused member stops
the extraction with an error naming the archive, the member and the rule.

Files are written through a temporary name and renamed, so a file of the right size is a
complete one: an interrupted extraction re-run skips those and writes the rest. A marker
``.extracted-NAME.json`` in the target records a finished archive; the next run skips it.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
import zipfile
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Tuple

from glacier_runtime.atomic import atomic_path, atomic_write_text
from training.data.download import Progress, human

Say = Callable[[str], None]


class UnsafeArchiveError(ValueError):
    """A member that would write outside the target, or a kind of file we never write."""


class ArchiveError(ValueError):
    """Not an archive we can read."""


def marker_path(target: str, archive: str) -> str:
    return os.path.join(target, f".extracted-{os.path.basename(archive)}.json")


def archive_kind(path: str) -> str:
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ArchiveError(f"{path} is neither a zip nor a tar archive (gz, bz2 and xz tars are read); "
                       "pass --no-extract to keep it as downloaded")


def _inside(root_real: str, path: str) -> bool:
    return os.path.commonpath([root_real, path]) == root_real


def check_member_name(archive: str, name: str, target_real: str) -> str:
    """The resolved destination of member ``name``; raises UnsafeArchiveError when unsafe."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or os.path.isabs(name):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: absolute path")
    if ".." in norm.split("/"):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: '..' path component points outside the target")
    dest = os.path.realpath(os.path.join(target_real, *[p for p in norm.split("/") if p not in ("", ".")]))
    if not _inside(target_real, dest):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: resolves to {dest}, outside {target_real} "
                                 "(through a link)")
    return dest


def check_link(archive: str, name: str, link: str, dest: str, target_real: str, hard: bool) -> None:
    kind = "hard link" if hard else "symbolic link"
    if link.startswith("/") or os.path.isabs(link):
        raise UnsafeArchiveError(f"{archive}: refusing {kind} {name!r} -> {link!r}: absolute link target")
    base = target_real if hard else os.path.dirname(dest)
    resolved = os.path.realpath(os.path.join(base, link))
    if not _inside(target_real, resolved):
        raise UnsafeArchiveError(f"{archive}: refusing {kind} {name!r} -> {link!r}: points outside {target_real}")


def _copy_atomic(src: BinaryIO, dest: str, mode: Optional[int]) -> None:
    if os.path.lexists(dest) and not os.path.isfile(dest):
        raise UnsafeArchiveError(f"{dest} exists and is not a regular file")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if mode is not None:
            os.chmod(tmp, (mode & 0o777) | 0o600)


def _done(dest: str, size: int) -> bool:
    return os.path.isfile(dest) and not os.path.islink(dest) and os.path.getsize(dest) == size


def _tar_members(archive: str, raw: BinaryIO, target_real: str) -> Iterator[Tuple[tarfile.TarFile, tarfile.TarInfo, str]]:
    data_filter = getattr(tarfile, "data_filter", None)
    with tarfile.open(fileobj=raw, mode="r:*") as tf:
        for m in tf:
            dest = check_member_name(archive, m.name, target_real)
            if m.ischr() or m.isblk() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: device, FIFO or special file")
            if m.issym() or m.islnk():
                check_link(archive, m.name, m.linkname, dest, target_real, hard=m.islnk())
            if data_filter is not None:
                try:
                    m = data_filter(m, target_real)
                except tarfile.FilterError as exc:
                    raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: {exc} (tarfile data filter)") from exc
            yield tf, m, dest


def _extract_tar(archive: str, raw: BinaryIO, target_real: str, prog: Progress) -> Tuple[int, int]:
    written = skipped = 0
    for tf, m, dest in _tar_members(archive, raw, target_real):
        if m.isdir():
            os.makedirs(dest, exist_ok=True)
        elif m.issym() or m.islnk():
            if os.path.lexists(dest):
                skipped += 1
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if m.issym():
                os.symlink(m.linkname, dest)
            else:
                os.link(os.path.join(target_real, m.linkname), dest)
            written += 1
        elif _done(dest, m.size):
            skipped += 1
        else:
            src = tf.extractfile(m)
            assert src is not None
            with src:
                _copy_atomic(src, dest, m.mode)
            written += 1
        prog.update(max(raw.tell() - prog.n, 0))
    return written, skipped


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _extract_zip(archive: str, target_real: str, prog: Progress) -> Tuple[int, int]:
    written = skipped = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        plan = []
        for info in infos:  # check every member before writing any (the directory is cheap)
            dest = check_member_name(archive, info.filename, target_real)
            mode = info.external_attr >> 16
            if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise UnsafeArchiveError(f"{archive}: refusing member {info.filename!r}: device, FIFO or socket")
            if _zip_is_symlink(info):
                link = zf.read(info).decode("utf-8", "replace")
                check_link(archive, info.filename, link, dest, target_real, hard=False)
                plan.append((info, dest, link))
            else:
                plan.append((info, dest, None))
        for info, dest, link in plan:
            if info.is_dir():
                os.makedirs(dest, exist_ok=True)
            elif link is not None:
                if os.path.lexists(dest):
                    skipped += 1
                else:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    os.symlink(link, dest)
                    written += 1
            elif _done(dest, info.file_size):
                skipped += 1
            else:
                # re-check: a link written above could now redirect this path
                check_member_name(archive, info.filename, target_real)
                with zf.open(info) as src:
                    mode = (info.external_attr >> 16) or None
                    _copy_atomic(src, dest, mode)
                written += 1
            prog.update(info.compress_size)
    return written, skipped


def extracted_size(archive: str) -> Optional[int]:
    """Bytes the archive unpacks to when cheap to know (zip, uncompressed tar), else None."""
    kind = archive_kind(archive)
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            return sum(i.file_size for i in zf.infolist())
    with open(archive, "rb") as fh:
        magic = fh.read(6)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00":
        return None
    with tarfile.open(archive, "r:") as tf:
        return sum(m.size for m in tf.getmembers())


def safe_extract(archive: str, target: str, say: Callable[[str], None], tty: Optional[bool] = None,
                 estimate_factor: float = 1.6) -> Dict:
    """Extract ``archive`` into ``target`` safely and resumably; returns the marker's content."""
    os.makedirs(target, exist_ok=True)
    target_real = os.path.realpath(target)
    marker = marker_path(target, archive)
    size = os.path.getsize(archive)
    try:
        with open(marker, encoding="utf-8") as fh:
            done = json.load(fh)
        if done.get("archive_size") == size:
            say(f"{os.path.basename(archive)} already extracted into {target} ({marker})")
            return done
    except (OSError, ValueError):
        pass
    kind = archive_kind(archive)
    need = extracted_size(archive)
    exact = need is not None
    need = need if exact else int(size * estimate_factor)
    free = shutil.disk_usage(target).free
    if need > free:
        raise OSError(f"not enough free disk to extract {archive} into {target}: need "
                      f"{'' if exact else 'about '}{human(need)}, {human(free)} free. "
                      "Free space, or extract elsewhere with --extract-to.")
    say(f"extracting {os.path.basename(archive)} ({kind}, {human(size)}) into {target}")
    prog = Progress(size, 0, f"extract {os.path.basename(archive)}", 10.0, say, tty)
    try:
        if kind == "zip":
            written, skipped = _extract_zip(archive, target_real, prog)
        else:
            with open(archive, "rb") as raw:
                # tarfile reads through this handle, so its position is the compressed progress
                written, skipped = _extract_tar(archive, raw, target_real, prog)
    finally:
        prog.close()
    info = {"archive": os.path.basename(archive), "archive_size": size, "kind": kind,
            "files_written": written, "files_skipped_already_complete": skipped}
    atomic_write_text(marker, json.dumps(info, indent=1))
    say(f"extracted {written} entries" + (f" ({skipped} already complete from an earlier run)" if skipped else ""))
    return info
