"""Replace a bundle folder as one set.

A build writes its four files (solution.py, model.pth, manifest.json, submission.zip)
into a staging folder beside ``out`` and only then swaps the staging folder with ``out``:
one ``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames (``out`` -> a backup name,
staging -> ``out``). A failed or interrupted build leaves the previous bundle as it was
(a kill between the two fallback renames is repaired at the next build's start), and no
file of an earlier bundle survives beside the new set (e.g. a stale model.pth beside a
single-file solution.py).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from typing import Dict, List, Optional

from glacier_runtime.atomic import TEMP_PREFIX, atomic_write_bytes, fsync_dir, remove_stale_temps

BUNDLE_FILES = ("solution.py", "model.pth", "manifest.json", "submission.zip")
#: What running a bundle leaves beside it (importing solution.py); replaced with the rest.
REGENERATED = ("__pycache__",)


def _siblings(out: str, tag: str) -> List[str]:
    parent, base = os.path.split(os.path.abspath(out))
    prefix = f"{TEMP_PREFIX}{base}-{tag}-"
    if not os.path.isdir(parent):
        return []
    return [os.path.join(parent, n) for n in sorted(os.listdir(parent)) if n.startswith(prefix)]


def prepare_out(out: str) -> None:
    """Start of a build: undo a swap a kill interrupted, remove what killed builds left,
    and refuse an ``out`` that holds files no bundle has (the swap would drop them)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a folder for the bundle")
    backups = _siblings(out, "old")
    if not os.path.exists(out) and backups:
        os.rename(backups[-1], out)  # killed between the two renames: the previous bundle comes back
        backups = backups[:-1]
    for folder in backups + _siblings(out, "new"):
        shutil.rmtree(folder, ignore_errors=True)
    remove_stale_temps(out)
    if os.path.isdir(out):
        foreign = sorted(n for n in os.listdir(out) if n not in BUNDLE_FILES and n not in REGENERATED)
        if foreign:
            raise ValueError(
                f"--out {out} holds files that are not part of a bundle: {foreign}. A build replaces the whole "
                "folder as one set: build into a new or bundle-only folder (e.g. --out submission/), or move them.")


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except Exception:  # noqa: BLE001 - no libc / no renameat2 / filesystem refuses: use the fallback
        return False


def publish_bundle(out: str, files: Dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes, names from BUNDLE_FILES) as the whole content of ``out``."""
    unknown = sorted(set(files) - set(BUNDLE_FILES))
    if unknown:
        raise ValueError(f"not bundle files: {unknown}")
    out = os.path.abspath(out)
    parent, base = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{base}-new-", dir=parent)
    try:
        for name, data in files.items():
            atomic_write_bytes(os.path.join(stage, name), data)
        os.chmod(stage, 0o777 & ~_umask())
        if not os.path.exists(out):
            os.rename(stage, out)
        elif _exchange(stage, out):
            shutil.rmtree(stage, ignore_errors=True)  # now holds the previous bundle
        else:
            old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{base}-old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
            try:
                os.rename(stage, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(parent)
    finally:
        if os.path.isdir(stage):
            shutil.rmtree(stage, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_bundle(src_bytes: bytes, blob: Optional[bytes]) -> bytes:
    """submission.zip: solution.py (and model.pth unless it is embedded), stored uncompressed."""
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("solution.py", src_bytes)
        if blob is not None:
            z.writestr("model.pth", blob)
    return zbuf.getvalue()
