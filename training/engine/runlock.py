"""A lock on a run's output folder, so two training runs never share ``last.pt`` or
delete each other's files.

The lock is ``OUT/.glacier-lock``: an ``flock`` held for the life of the process (the
kernel drops it when the process dies, however it dies) plus the holder's pid, host and
command for the message the second run prints. A lock file left by a dead process is
taken over with a note.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

LOCK_NAME = ".glacier-lock"


class LockedError(RuntimeError):
    """Another live process holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(out): ...`` (or :meth:`acquire` / :meth:`release`)."""

    def __init__(self, folder: str, command: str = ""):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.command = command or " ".join(sys.argv)
        self.fd: Optional[int] = None
        self.took_over: Optional[Dict[str, Any]] = None

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held = self._read()
                os.close(fd)
                raise LockedError(self._message(held)) from None
        except ImportError:  # no flock (Windows): the pid in the file decides
            held = self._read()
            if held.get("pid") and held.get("pid") != os.getpid() and held.get("host") == socket.gethostname() \
                    and _alive(int(held["pid"])):
                os.close(fd)
                raise LockedError(self._message(held)) from None
        previous = self._read()
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.took_over = previous  # the holder died without releasing: a stale lock
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def _message(self, held: Dict[str, Any]) -> str:
        who = f"process {held.get('pid', '?')} on {held.get('host', '?')}"
        since = f", started {held['started']}" if held.get("started") else ""
        cmd = f" ({held['command']})" if held.get("command") else ""
        return (f"{self.folder} is in use by another training run: {who}{since}{cmd}. Two runs on one --out "
                f"would overwrite each other's checkpoints: wait for it to finish, stop it, or use another --out")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        try:
            os.unlink(self.path)  # while still held: nobody can lock the old file meanwhile
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
