"""The one atomic writer: every file the product writes (masks, checkpoints, OOF arrays,
ONNX models, bundles, reports, figures) goes through a temporary file in the target's
folder, is fsync'ed, then renamed over the target. A kill leaves either the old file or
the new one, never a torn one; the temporary files a kill leaves behind carry one
recognisable prefix and are removed by :func:`remove_stale_temps` at the next start.

Standard library only: this module ships inside the bundle.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Callable, Iterator, List

TEMP_PREFIX = ".tmp-glacier-"


def fsync_dir(folder: str) -> None:
    """Make the rename itself durable (POSIX); silently skipped where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed
    over ``path``; on any error (Ctrl-C included) it is removed and ``path`` is untouched.

    For writers that want a file name (``torch.save``, ``np.save``, ``savefig``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # the target's name ends the temporary one, so writers that pick a format by
    # extension (np.save, savefig, tifffile) see the right one
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def remove_stale_temps(folder: str, min_age_s: float = 0.0) -> List[str]:
    """Delete temporary files an earlier, killed writer left in ``folder`` (not recursive).

    ``min_age_s`` spares files younger than that (another live writer's). Returns the
    removed paths.
    """
    removed: List[str] = []
    if not os.path.isdir(folder):
        return removed
    now = time.time()
    for name in os.listdir(folder):
        if not name.startswith(TEMP_PREFIX):
            continue
        p = os.path.join(folder, name)
        try:
            if os.path.isfile(p) and now - os.path.getmtime(p) >= min_age_s:
                os.unlink(p)
                removed.append(p)
        except OSError:
            continue
    return removed
