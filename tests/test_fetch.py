"""``glacier-train fetch`` against a local HTTP server on 127.0.0.1 (never the internet):
dropped connections, 404 mirrors, servers ignoring Range, corrupted bodies, stalls,
changed remotes, and archives that try to write outside their target."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List

import numpy as np
import pytest
from click.testing import CliRunner

from training.data.download import Downloader, FetchError, Progress
from training.data.extract import UnsafeArchiveError, safe_extract
from training.data.fetch import fetch

BODY = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(BODY).hexdigest()


class Server:
    """Routes: path -> behaviour dict. Behaviours: body, drop_after (first N requests, bytes),
    status, ignore_range, corrupt, stall_after, etag. Records (path, Range) of every GET."""

    def __init__(self):
        self.routes: Dict[str, Dict] = {}
        self.log: List[tuple] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                r = server.routes.get(self.path)
                rng = self.headers.get("Range")
                server.log.append((self.path, rng, self.headers.get("If-Range")))
                if r is None or r.get("status", 200) >= 400:
                    code = 404 if r is None else r["status"]
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = r["body"]
                if r.get("corrupt"):
                    body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
                start = 0
                etag = r.get("etag", '"v1"')
                if_range = self.headers.get("If-Range")
                if rng and not r.get("ignore_range") and (if_range is None or if_range == etag):
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", etag)
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = body[start:]
                drops = r.get("drops", 0)
                if drops > 0:
                    r["drops"] = drops - 1
                    self.wfile.write(chunk[: r["drop_after"]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if r.get("trickle"):  # slow but steady: 10 kB every 20 ms
                    for i in range(0, len(chunk), 10_000):
                        self.wfile.write(chunk[i:i + 10_000])
                        self.wfile.flush()
                        time.sleep(0.02)
                    return
                if r.get("stall_after") is not None:
                    self.wfile.write(chunk[: r["stall_after"]])
                    self.wfile.flush()
                    server.release.wait(10)  # hold the socket open, send nothing more
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def quiet_fetch(*a, **k):
    msgs: List[str] = []
    k.setdefault("say", msgs.append)
    k.setdefault("tty", False)
    k.setdefault("backoff", 0.0)
    k.setdefault("read_timeout", 2.0)
    return fetch(*a, **k), msgs


def file_sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_drop_then_resume_with_range(server, tmp_path):
    server.routes["/a.bin"] = {"body": BODY, "drops": 1, "drop_after": 100_000}
    info, msgs = quiet_fetch(server.url("/a.bin"), str(tmp_path), sha256=SHA, extract=False)
    assert file_sha(tmp_path / "a.bin") == SHA
    assert [g[1] for g in server.log] == [None, "bytes=100000-"]  # the retry asked only for the rest
    assert [(s["start"], s["end"]) for s in info["segments"]] == [(0, 100_000), (100_000, len(BODY))]
    assert any("served bytes 0-100000" in m for m in msgs)
    assert not (tmp_path / "a.bin.part").exists() and not (tmp_path / "a.bin.part.json").exists()


def test_404_first_mirror_falls_back(server, tmp_path):
    server.routes["/good/a.bin"] = {"body": BODY}
    info, msgs = quiet_fetch(server.url("/missing/a.bin"), str(tmp_path), mirrors=[server.url("/good/a.bin")],
                             sha256=SHA, extract=False)
    assert file_sha(tmp_path / "a.bin") == SHA
    assert any("HTTP 404" in m and "/missing/a.bin" in m for m in msgs)
    assert {s["url"] for s in info["segments"]} == {server.url("/good/a.bin")}


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.routes["/a.bin"] = {"body": BODY, "drops": 1, "drop_after": 50_000, "ignore_range": True}
    info, msgs = quiet_fetch(server.url("/a.bin"), str(tmp_path), sha256=SHA, extract=False)
    assert file_sha(tmp_path / "a.bin") == SHA  # not 50 kB of duplicated prefix
    assert any("ignored the Range request" in m for m in msgs)
    assert [(s["start"], s["end"]) for s in info["segments"]][-1] == (0, len(BODY))


def test_changed_remote_restarts(server, tmp_path):
    server.routes["/a.bin"] = {"body": BODY, "drops": 1, "drop_after": 40_000, "etag": '"v1"'}
    with pytest.raises(FetchError, match="re-run the same command to resume"):
        quiet_fetch(server.url("/a.bin"), str(tmp_path), extract=False, rounds=1)
    new = BODY[::-1]
    server.routes["/a.bin"] = {"body": new, "etag": '"v2"'}
    info, msgs = quiet_fetch(server.url("/a.bin"), str(tmp_path), extract=False)
    assert file_sha(tmp_path / "a.bin") == hashlib.sha256(new).hexdigest()
    assert server.log[-1][2] == '"v1"'  # the resume was guarded with If-Range
    assert any("remote file changed (remote ETag changed from \"v1\" to \"v2\")" in m for m in msgs)


def test_changed_size_on_other_mirror_restarts(server, tmp_path):
    server.routes["/m1/a.bin"] = {"body": BODY, "drops": 1, "drop_after": 40_000}
    server.routes["/m2/a.bin"] = {"body": BODY + b"x"}
    info, msgs = quiet_fetch(server.url("/m1/a.bin"), str(tmp_path), mirrors=[server.url("/m2/a.bin")], extract=False)
    assert os.path.getsize(tmp_path / "a.bin") == len(BODY) + 1
    assert any("remote size changed" in m for m in msgs)


def test_corrupt_body_fails_checksum_naming_mirror(server, tmp_path):
    server.routes["/bad/a.bin"] = {"body": BODY, "corrupt": True}
    with pytest.raises(FetchError) as ei:
        quiet_fetch(server.url("/bad/a.bin"), str(tmp_path), sha256=SHA, extract=False)
    msg = str(ei.value)
    assert "SHA-256 mismatch" in msg and server.url("/bad/a.bin") in msg and f"bytes 0-{len(BODY)}" in msg
    assert not (tmp_path / "a.bin").exists()
    # the next run starts over (good mirror now) instead of trusting the bad bytes
    server.routes["/bad/a.bin"] = {"body": BODY}
    quiet_fetch(server.url("/bad/a.bin"), str(tmp_path), sha256=SHA, extract=False)
    assert file_sha(tmp_path / "a.bin") == SHA


def test_stall_moves_to_next_mirror(server, tmp_path):
    server.routes["/slow/a.bin"] = {"body": BODY, "stall_after": 70_000}
    server.routes["/fast/a.bin"] = {"body": BODY}
    t0 = time.monotonic()
    info, msgs = quiet_fetch(server.url("/slow/a.bin"), str(tmp_path), mirrors=[server.url("/fast/a.bin")],
                             sha256=SHA, extract=False, read_timeout=0.5)
    assert time.monotonic() - t0 < 8
    assert file_sha(tmp_path / "a.bin") == SHA
    assert any("stalled" in m and "/slow/" in m for m in msgs)
    segs = [(s["url"].rsplit("/", 2)[1], s["start"], s["end"]) for s in info["segments"]]
    assert segs == [("slow", 0, 70_000), ("fast", 70_000, len(BODY))]  # the second mirror resumed


def test_all_mirrors_fail_with_backoff_rounds(server, tmp_path):
    server.routes["/a.bin"] = {"body": BODY, "status": 503}
    with pytest.raises(FetchError, match="HTTP 503"):
        quiet_fetch(server.url("/a.bin"), str(tmp_path), extract=False, rounds=3)
    assert len(server.log) == 3  # 503 is retried each round; a 404 would not be


def test_interrupted_download_resumed_by_same_command(server, tmp_path):
    """Kill the first run (every mirror drops), re-run the same CLI command: same SHA-256."""
    from training.cli import cli

    server.routes["/a.tar"] = {"body": BODY, "drops": 2, "drop_after": 120_000}
    args = ["fetch", server.url("/a.tar"), "--out", str(tmp_path), "--no-extract", "--rounds", "1", "--backoff", "0",
            "--read-timeout", "2"]
    r1 = CliRunner().invoke(cli, args)
    assert r1.exit_code == 1 and "re-run the same command to resume" in r1.output, r1.output
    assert os.path.getsize(tmp_path / "a.tar.part") == 120_000
    # second run: the first request drops again after 120k more, the retry within it finishes
    server.routes["/a.tar"]["drops"] = 1
    r2 = CliRunner().invoke(cli, args + ["--rounds", "2"])
    assert r2.exit_code == 0, r2.output
    assert file_sha(tmp_path / "a.tar") == SHA
    assert [g[1] for g in server.log] == [None, "bytes=120000-", "bytes=240000-"]
    assert open(tmp_path / "a.tar.sha256").read().split()[0] == SHA  # recorded after the verified download
    r3 = CliRunner().invoke(cli, args)  # a third run trusts the record and downloads nothing
    assert r3.exit_code == 0 and len(server.log) == 3 and "already downloaded and verified" in r3.output


@pytest.mark.slow
def test_ctrl_c_then_same_command_resumes(server, tmp_path):
    """A real interruption: SIGINT to the console script mid-download, then the same command
    (slow only because two console-script starts import torch: ~25 s on a loaded 2-core box)."""
    import signal
    import subprocess
    import sys

    server.routes["/a.bin"] = {"body": BODY, "trickle": True}
    exe = os.path.join(os.path.dirname(sys.executable), "glacier-train")
    cmd = [exe, "fetch", server.url("/a.bin"), "--out", str(tmp_path), "--no-extract", "--sha256", SHA]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    part = tmp_path / "a.bin.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130 and "re-run the same command to resume" in out, out
    kept = part.stat().st_size
    assert 0 < kept < len(BODY)
    server.routes["/a.bin"] = {"body": BODY}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert file_sha(tmp_path / "a.bin") == SHA and server.log[-1][1] == f"bytes={kept}-"


def test_existing_file_with_wrong_sha_is_refused(server, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"something else")
    with pytest.raises(FetchError, match="exists but its SHA-256"):
        quiet_fetch(server.url("/a.bin"), str(tmp_path), sha256=SHA, extract=False)


def test_not_enough_disk(server, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    server.routes["/a.bin"] = {"body": BODY}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FetchError, match=r"not enough free disk .*need 293.0 KB.*1000 B free"):
        quiet_fetch(server.url("/a.bin"), str(tmp_path), extract=False)


def test_not_enough_disk_to_extract(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    arc = tmp_path / "big.zip"
    with zipfile.ZipFile(arc, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(5_000_000))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OSError, match=r"not enough free disk to extract .*need 4.8 MB, 976.6 KB free"):
        safe_extract(str(arc), str(tmp_path / "t"), lambda m: None, tty=False)
    assert not (tmp_path / "t" / "zeros.bin").exists()


def test_name_from_signed_url(tmp_path):
    d = Downloader(["https://h/x/my%20data.zip?X-Goog-Signature=abc"], str(tmp_path))
    assert d.name == "my data.zip" and d.part.endswith("my data.zip.part")


def test_progress_lines_without_tty():
    lines: List[str] = []
    p = Progress(1000, 0, "x", every_pct=25, say=lines.append, tty=False)
    for _ in range(10):
        p.update(100)
    assert len(lines) == 4 and "100.0%" in lines[-1] and "/s" in lines[0] and "left" in lines[0]


# -- archives -----------------------------------------------------------------


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data) if data is not None else None)


def _file(name, data=b"hello"):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _symlink(name, target):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti, None


def _outside_listing(root):
    return sorted(p for p in os.listdir(root) if p not in ("target", "evil.tar.gz", "evil.zip"))


@pytest.mark.parametrize("data_filter", [True, False], ids=["with-data-filter", "hand-checks-only"])
@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_etc", "symlink_then_write", "hardlink_out", "device"])
def test_unsafe_tar_refused(tmp_path, case, data_filter, monkeypatch):
    if not data_filter:  # what Python < 3.12 without the back-port has: the hand checks alone
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no data filter")
    target = tmp_path / "target"
    abs_evil = str(tmp_path / "abs_evil")
    members = {
        "dotdot": [_file("ok.txt"), _file("../evil")],
        "absolute": [_file(abs_evil)],
        "symlink_etc": [_symlink("etc", "/etc")],
        "symlink_then_write": [_symlink("up", ".."), _file("up/evil")],
        "hardlink_out": [],
        "device": [],
    }[case]
    if case == "hardlink_out":
        ti = tarfile.TarInfo("hl")
        ti.type = tarfile.LNKTYPE
        ti.linkname = "../../etc/passwd"
        members = [(ti, None)]
    if case == "device":
        ti = tarfile.TarInfo("dev")
        ti.type = tarfile.CHRTYPE
        ti.devmajor, ti.devminor = 1, 3
        members = [(ti, None)]
    arc = tmp_path / "evil.tar.gz"
    _tar(arc, members)
    with pytest.raises(UnsafeArchiveError, match=r"evil.tar.gz: refusing .*(absolute|'\.\.'|outside|device)"):
        safe_extract(str(arc), str(target), lambda m: None, tty=False)
    assert _outside_listing(tmp_path) == []  # nothing written outside the target
    assert not os.path.lexists(target / "etc") and not os.path.lexists(target / "up")
    assert not (target / ".extracted-evil.tar.gz.json").exists()


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_etc"])
def test_unsafe_zip_refused(tmp_path, case):
    target = tmp_path / "target"
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        if case == "dotdot":
            zf.writestr(zipfile.ZipInfo("../evil"), b"x")
        elif case == "absolute":
            zf.writestr(zipfile.ZipInfo(str(tmp_path / "abs_evil")), b"x")
        else:
            zi = zipfile.ZipInfo("etc")
            zi.external_attr = (0o120777 << 16)
            zf.writestr(zi, "/etc")
    with pytest.raises(UnsafeArchiveError, match=r"evil.zip: refusing .*(absolute|'\.\.')"):
        safe_extract(str(arc), str(target), lambda m: None, tty=False)
    assert _outside_listing(tmp_path) == []
    assert not os.path.lexists(target / "ok.txt")  # zip members are all checked before any write


def test_safe_tar_extract_resumes_and_marks(tmp_path):
    target = tmp_path / "t"
    arc = tmp_path / "good.tar.gz"
    _tar(arc, [_file("d/a.txt", b"a" * 10), _file("d/b.txt", b"b" * 20), _symlink("d/link", "a.txt")])
    # an earlier, interrupted run left a.txt complete and b.txt missing
    os.makedirs(target / "d")
    (target / "d" / "a.txt").write_bytes(b"a" * 10)
    msgs: List[str] = []
    info = safe_extract(str(arc), str(target), msgs.append, tty=False)
    assert info["files_written"] == 2 and info["files_skipped_already_complete"] == 1
    assert (target / "d" / "b.txt").read_bytes() == b"b" * 20 and os.readlink(target / "d" / "link") == "a.txt"
    assert (target / ".extracted-good.tar.gz.json").exists()
    safe_extract(str(arc), str(target), msgs.append, tty=False)
    assert "already extracted" in msgs[-1]


def _fake_competition_zip(path, tmp_path):
    from training.data.synth import generate_dataset

    src = tmp_path / "src"
    generate_dataset(str(src), n_tiles=4, size=(48, 48), seed=1)
    with zipfile.ZipFile(path, "w") as zf:
        for folder, _, files in os.walk(src / "train"):
            for f in files:
                full = os.path.join(folder, f)
                zf.write(full, os.path.join("glacierhack", os.path.relpath(full, src / "train")))


def test_fetch_competition_zip_extracts_and_inspects(server, tmp_path):
    arc = tmp_path / "comp.zip"
    _fake_competition_zip(arc, tmp_path)
    server.routes["/comp.zip"] = {"body": arc.read_bytes()}
    out = tmp_path / "dl"
    info, msgs = quiet_fetch(server.url("/comp.zip"), str(out), delete_archive=True)
    text = "\n".join(msgs)
    assert info["summary"]["layout"] == "competition" and info["summary"]["errors"] == 0
    assert "4 tiles" in text and "overall class share" in text  # inspect's summary
    assert not (out / "comp.zip").exists() and (out / "glacierhack" / "Band1").is_dir()
    info2, msgs2 = quiet_fetch(server.url("/comp.zip"), str(out), delete_archive=True)
    assert len(server.log) == 1 and "nothing to fetch" in msgs2[0]


def test_fetch_hkh_with_mirror_runs_hkh_reader(server, tmp_path):
    from training.data.hkh import write_fake_hkh

    src = tmp_path / "hkhsrc"
    write_fake_hkh(str(src / "patches"), n_train=2, n_val=1, size=32)
    arc = tmp_path / "hkh_patches.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(src / "patches", arcname="patches")
    server.routes["/hkh_patches.tar.gz"] = {"body": arc.read_bytes()}
    from training.cli import cli

    out = tmp_path / "hkh"
    r = CliRunner().invoke(cli, ["fetch", "hkh", "--out", str(out), "--mirror", server.url("/404/hkh_patches.tar.gz"),
                                 "--mirror", server.url("/hkh_patches.tar.gz"), "--backoff", "0"])
    assert r.exit_code == 0, r.output
    assert f"HKH patches in {out / 'patches'}: train 2, val 1" in r.output
    assert "(32, 32, 15)" in r.output and f"--data {out / 'patches'}" in r.output
    assert (out / "hkh_patches.tar.gz").exists()  # kept without --delete-archive


def test_fetch_rejects_non_url(tmp_path):
    with pytest.raises(FetchError, match="neither 'hkh' nor a URL"):
        fetch("data.zip", str(tmp_path), say=lambda m: None)
