"""Archive extraction: members that would write outside the target (.., absolute paths, links,
devices) refused before anything is written; an interrupted extraction resumes; disk checked first."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from typing import List

import pytest

from training.data.extract import UnsafeArchiveError, safe_extract


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
