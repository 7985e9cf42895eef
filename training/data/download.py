"""Resumable, verified HTTP download with mirror fall-back (``glacier-train fetch``).

Bytes go into ``NAME.part``; beside it ``NAME.part.json`` records which remote they came
from (URL, size, ETag, Last-Modified) and which mirror served which byte range. A
re-run continues with an HTTP ``Range`` request (``If-Range`` guarded), and starts over
cleanly when a server ignores ``Range`` or the remote changed. Errors and stalls (no
byte for ``read_timeout`` seconds) move on to the next mirror; every full round over
the mirrors is followed by an exponential back-off. The finished file is checked against
the announced size and a SHA-256 (given, or recorded after an earlier verified
download in ``NAME.sha256``), then renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import requests

from glacier_runtime.atomic import atomic_write_text

Say = Callable[[str], None]
CHUNK = 1 << 20


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class FetchError(RuntimeError):
    """A download that cannot complete; the message says why and what to do."""


class _MirrorFailed(Exception):
    def __init__(self, msg: str, permanent: bool = False):
        super().__init__(msg)
        self.permanent = permanent


class _Restart(Exception):
    """The bytes on disk cannot be continued from this response: start from 0."""


def human(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    s = int(max(s, 0))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """tqdm on a terminal; otherwise one line every ``every_pct`` percent (logs, notebooks)."""

    def __init__(self, total: Optional[int], initial: int = 0, desc: str = "", every_pct: float = 5.0,
                 say: Say = _stderr, tty: Optional[bool] = None):
        self.total, self.n, self.desc, self.say = total, initial, desc, say
        self.t0, self.n0 = time.monotonic(), initial
        self.step = (total * every_pct / 100.0) if total else 256 * CHUNK
        self.next_report = initial + self.step
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    def line(self) -> str:
        dt = time.monotonic() - self.t0
        rate = (self.n - self.n0) / dt if dt > 0 else 0.0
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            left = _duration(eta) if eta != float("inf") else "?"
            return (f"{self.desc}: {100.0 * self.n / self.total:5.1f}% {human(self.n)} / {human(self.total)} "
                    f"at {human(rate)}/s, {left} left")
        return f"{self.desc}: {human(self.n)} at {human(rate)}/s"

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.n >= self.next_report:
            self.say(self.line())
            while self.next_report <= self.n:
                self.next_report += self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Remote:
    url: str
    size: Optional[int]
    etag: Optional[str]
    last_modified: Optional[str]


@dataclass
class DownloadResult:
    path: str
    size: int
    sha256: str
    segments: List[Dict] = field(default_factory=list)  # {"url", "start", "end"} (end exclusive)
    reused: bool = False


def sha256_file(path: str, say: Optional[Say] = None, tty: Optional[bool] = None) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    prog = Progress(size, 0, f"sha256 {os.path.basename(path)}", 20.0, say, tty) if say and size > 64 * CHUNK else None
    with open(path, "rb") as fh:
        while True:
            b = fh.read(4 * CHUNK)
            if not b:
                break
            h.update(b)
            if prog:
                prog.update(len(b))
    if prog:
        prog.close()
    return h.hexdigest()


def read_checksum_file(path: str) -> Optional[str]:
    """The hex digest in a ``sha256sum``-style file (``HEX  NAME``), or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            m = re.match(r"\s*([0-9a-fA-F]{64})\b", fh.read())
    except OSError:
        return None
    return m.group(1).lower() if m else None


def _content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(start, total) from ``bytes START-END/TOTAL``."""
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


def _load_meta(path: str) -> Optional[Dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _fsync_replace(src: str, dst: str) -> None:
    with open(src, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(src, dst)


class Downloader:
    """Fetch one file from a list of mirrors into ``folder``; see the module docstring."""

    def __init__(self, urls: Sequence[str], folder: str, name: Optional[str] = None, sha256: Optional[str] = None,
                 rounds: int = 4, backoff: float = 2.0, connect_timeout: float = 15.0, read_timeout: float = 60.0,
                 reserve_bytes: Callable[[Optional[int]], int] = lambda size: 0, say: Say = _stderr,
                 tty: Optional[bool] = None, session: Optional[requests.Session] = None):
        if not urls:
            raise FetchError("no URL to download from")
        self.urls = list(urls)
        self.folder = folder
        self.name = name or os.path.basename(requests.utils.unquote(requests.utils.urlparse(self.urls[0]).path)) or "download"
        self.path = os.path.join(folder, self.name)
        self.part = self.path + ".part"
        self.meta_path = self.part + ".json"
        self.record = self.path + ".sha256"
        self.sha256 = sha256.lower() if sha256 else None
        if self.sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise FetchError(f"--sha256 {sha256!r} is not a SHA-256 hex digest (64 hex characters)")
        self.rounds, self.backoff = max(1, rounds), backoff
        self.timeout = (connect_timeout, read_timeout)
        self.reserve_bytes = reserve_bytes
        self.say, self.tty = say, tty
        self.session = session or requests.Session()
        self.meta: Dict = {}

    # -- state on disk ---------------------------------------------------------
    def _save_meta(self) -> None:
        atomic_write_text(self.meta_path, json.dumps(self.meta, indent=1))

    def _reset_part(self, why: str) -> None:
        have = os.path.getsize(self.part) if os.path.exists(self.part) else 0
        if have:
            self.say(f"restarting {self.name} from byte 0: {why} (discarding {human(have)} in {self.part})")
        with open(self.part, "wb"):
            pass
        self.meta = {"segments": []}
        self._save_meta()

    def _offset(self) -> int:
        if not os.path.exists(self.part):
            return 0
        if not self.meta:
            loaded = _load_meta(self.meta_path)
            if loaded is None:
                self._reset_part(f"{self.meta_path} is missing or unreadable, so the origin of the bytes is unknown")
                return 0
            self.meta = loaded
        return os.path.getsize(self.part)

    # -- one request -------------------------------------------------------------
    def _same_remote(self, remote: Remote) -> Optional[str]:
        """None when ``remote`` is the file the .part was started from, else the difference."""
        old = self.meta.get("remote")
        if not old:
            return None
        if old.get("size") is not None and remote.size is not None and old["size"] != remote.size:
            return f"remote size changed from {old['size']} to {remote.size} bytes"
        if old.get("url") == remote.url:  # ETag/Last-Modified are only comparable on one server
            for key, label in (("etag", "ETag"), ("last_modified", "Last-Modified")):
                if old.get(key) and getattr(remote, key) and old[key] != getattr(remote, key):
                    return f"remote {label} changed from {old[key]} to {getattr(remote, key)}"
        return None

    def _attempt(self, url: str) -> None:
        offset = self._offset()
        headers = {"Accept-Encoding": "identity"}
        old = self.meta.get("remote") or {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if old.get("url") == url and (old.get("etag") or old.get("last_modified")):
                headers["If-Range"] = old.get("etag") or old["last_modified"]
        try:
            resp = self.session.get(url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=True)
        except requests.RequestException as exc:
            raise _MirrorFailed(_describe(exc, self.timeout[1])) from exc
        with resp:
            if resp.status_code == 416 and offset:
                raise _Restart("the server refused the resume range (416)")
            if resp.status_code >= 400:
                raise _MirrorFailed(f"HTTP {resp.status_code} {resp.reason}", permanent=resp.status_code in (401, 403, 404, 410))
            etag, lm = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
            if resp.status_code == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    raise _Restart(f"asked for bytes from {offset}, the server sent from {start}")
            else:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if offset:  # the whole file is coming: take it from byte 0 on this same response
                    changed = self._same_remote(Remote(url, total, etag, lm))
                    self._reset_part(f"the remote file changed ({changed})" if changed else
                                     f"{url} ignored the Range request (answered {resp.status_code} with the whole file)")
                    offset = 0
            remote = Remote(url, total, etag, lm)
            changed = self._same_remote(remote) if offset else None
            if changed:
                raise _Restart(changed)
            self._check_disk(total, offset)
            self.meta["remote"] = {"url": url, "size": total, "etag": etag, "last_modified": lm}
            self.meta.setdefault("segments", [])
            self._save_meta()
            self._stream(resp, url, offset, total)

    def _check_disk(self, total: Optional[int], offset: int) -> None:
        need = max((total or 0) - offset, 0) + self.reserve_bytes(total)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise FetchError(
                f"not enough free disk in {self.folder}: need {human(need)} "
                f"({human(max((total or 0) - offset, 0))} still to download + {human(self.reserve_bytes(total))} "
                f"for extraction), {human(free)} free. Free space or choose another --out.")

    def _stream(self, resp: requests.Response, url: str, offset: int, total: Optional[int]) -> None:
        got = 0
        prog = Progress(total, offset, self.name, say=self.say, tty=self.tty)
        if offset:
            self.say(f"resuming {self.name} at {human(offset)} from {url}")
        try:
            with open(self.part, "ab") as fh:
                try:
                    for chunk in _chunks(resp):
                        if chunk:
                            fh.write(chunk)
                            got += len(chunk)
                            prog.update(len(chunk))
                except requests.RequestException as exc:
                    raise _MirrorFailed(_describe(exc, self.timeout[1])) from exc
        finally:
            prog.close()
            if got:
                self.meta["segments"].append({"url": url, "start": offset, "end": offset + got})
                self._save_meta()
                self.say(f"{url} served bytes {offset}-{offset + got} ({human(got)})")
        size = os.path.getsize(self.part)
        if total is not None and size < total:
            raise _MirrorFailed(f"connection closed at {size} of {total} bytes")
        if total is not None and size > total:
            raise _Restart(f"{self.part} holds {size} bytes, more than the {total} announced")

    # -- the whole job ----------------------------------------------------------
    def _reuse_existing(self) -> Optional[DownloadResult]:
        if not os.path.exists(self.path):
            return None
        recorded = read_checksum_file(self.record)
        if recorded and (self.sha256 is None or self.sha256 == recorded):
            self.say(f"{self.path} already downloaded and verified (sha256 {recorded[:12]}... in {self.record})")
            return DownloadResult(self.path, os.path.getsize(self.path), recorded, [], reused=True)
        digest = sha256_file(self.path, self.say, self.tty)
        if self.sha256 and digest != self.sha256:
            raise FetchError(f"{self.path} exists but its SHA-256 is {digest}, not the expected {self.sha256}. "
                             "Delete it to download again.")
        if self.sha256:
            self._write_record(digest)
            return DownloadResult(self.path, os.path.getsize(self.path), digest, [], reused=True)
        raise FetchError(f"{self.path} exists but was not recorded as a verified download ({self.record} missing). "
                         "Pass --sha256 to verify it, or delete it to download again.")

    def _write_record(self, digest: str) -> None:
        atomic_write_text(self.record, f"{digest}  {self.name}\n")

    def run(self) -> DownloadResult:
        os.makedirs(self.folder, exist_ok=True)
        reused = self._reuse_existing()
        if reused:
            return reused
        failures: List[str] = []
        dead = set()
        done = False
        for rnd in range(self.rounds):
            live = [u for u in self.urls if u not in dead]
            if not live:
                break
            if rnd:
                wait = self.backoff * 2 ** (rnd - 1)
                self.say(f"every mirror failed in round {rnd}; retrying in {wait:.0f}s (round {rnd + 1} of {self.rounds})")
                time.sleep(wait)
            for url in live:
                restarts = 0
                while True:
                    try:
                        self._attempt(url)
                        done = True
                    except _Restart as exc:
                        restarts += 1
                        self._reset_part(str(exc))
                        if restarts <= 1:
                            continue
                        failures.append(f"{url}: {exc}")
                    except _MirrorFailed as exc:
                        failures.append(f"{url}: {exc}")
                        self.say(f"mirror failed: {url}: {exc}")
                        if exc.permanent:
                            dead.add(url)
                    break
                if done:
                    break
            if done:
                break
        if not done:
            have = os.path.getsize(self.part) if os.path.exists(self.part) else 0
            raise FetchError("download failed on every mirror:\n  " + "\n  ".join(failures[-3 * len(self.urls):]) +
                             (f"\n{human(have)} kept in {self.part}; re-run the same command to resume." if have else ""))
        return self._finish()

    def _finish(self) -> DownloadResult:
        size = os.path.getsize(self.part)
        remote = self.meta.get("remote") or {}
        if remote.get("size") is not None and size != remote["size"]:
            raise FetchError(f"{self.part}: {size} bytes, Content-Length said {remote['size']}")
        segments = self.meta.get("segments", [])
        digest = sha256_file(self.part, self.say, self.tty)
        if self.sha256 and digest != self.sha256:
            served = "; ".join(f"{s['url']} bytes {s['start']}-{s['end']}" for s in segments) or "unknown"
            os.replace(self.part, self.part + ".bad")
            for p in (self.meta_path,):
                if os.path.exists(p):
                    os.unlink(p)
            raise FetchError(f"SHA-256 mismatch for {self.name}: expected {self.sha256}, got {digest}. "
                             f"Served by: {served}. The file was moved to {self.part}.bad; re-run to download again, "
                             "or pick another --mirror.")
        _fsync_replace(self.part, self.path)
        self._write_record(digest)
        atomic_write_text(self.path + ".fetch.json", json.dumps(
            {"name": self.name, "size": size, "sha256": digest, "sha256_given": bool(self.sha256),
             "remote": remote, "segments": segments}, indent=1))
        if os.path.exists(self.meta_path):
            os.unlink(self.meta_path)
        by_url: Dict[str, int] = {}
        for s in segments:
            by_url[s["url"]] = by_url.get(s["url"], 0) + s["end"] - s["start"]
        self.say(f"downloaded {self.path}: {human(size)}, size checked" +
                 (", SHA-256 matches" if self.sha256 else f", sha256 {digest} recorded in {self.record}"))
        for u, n in by_url.items():
            self.say(f"  {human(n)} from {u}")
        return DownloadResult(self.path, size, digest, segments)


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body exactly as sent (never content-decoded: Content-Length counts these bytes).

    ``read1`` hands over every byte received before a dropped connection (a plain 1 MB
    read discards a partial last block), so a resume loses nothing."""
    import urllib3.exceptions as u3

    raw = resp.raw
    try:
        if hasattr(raw, "read1"):
            while True:
                b = raw.read1(CHUNK, decode_content=False)
                if not b:
                    return
                yield b
        else:  # older urllib3
            yield from raw.stream(64 * 1024, decode_content=False)
    except u3.ReadTimeoutError as exc:  # urllib3's errors -> requests' (as iter_content does)
        raise requests.ConnectionError(exc) from exc
    except (u3.ProtocolError, u3.DecodeError) as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except (OSError, u3.HTTPError) as exc:
        raise requests.ConnectionError(exc) from exc


def _describe(exc: Exception, read_timeout: float) -> str:
    text = str(exc)
    if isinstance(exc, requests.ReadTimeout) or "Read timed out" in text:
        return f"stalled: no data for {read_timeout:g}s (read time-out)"
    if isinstance(exc, requests.ConnectTimeout):
        return "connect time-out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"connection dropped mid-transfer ({text[:160]})"
    return f"{type(exc).__name__}: {text[:200]}"
