"""The downloader against a local HTTP server on 127.0.0.1 (never the internet): dropped
connections resumed with Range, 404 mirrors, servers ignoring Range, corrupted bodies,
stalls, changed remotes, not enough disk, and the same command resuming an interrupted run."""
from __future__ import annotations

import hashlib
import os
import time
from typing import List

import numpy as np
import pytest
from click.testing import CliRunner

from training.data.download import Downloader, FetchError, Progress

from tests.helpers import ROOT, file_sha, quiet_fetch

BODY = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(BODY).hexdigest()


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
    env = dict(os.environ, PYTHONPATH=ROOT)
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


def test_name_from_signed_url(tmp_path):
    d = Downloader(["https://h/x/my%20data.zip?X-Goog-Signature=abc"], str(tmp_path))
    assert d.name == "my data.zip" and d.part.endswith("my data.zip.part")


def test_progress_lines_without_tty():
    lines: List[str] = []
    p = Progress(1000, 0, "x", every_pct=25, say=lines.append, tty=False)
    for _ in range(10):
        p.update(100)
    assert len(lines) == 4 and "100.0%" in lines[-1] and "/s" in lines[0] and "left" in lines[0]
