"""A build replaces the bundle folder as one set: a failed build leaves the previous bundle
byte-identical, a single-file build leaves no stale model.pth, foreign files are refused."""
import hashlib
import io
import os
import zipfile

import pytest

from glacier_runtime.atomic import TEMP_PREFIX
from glacier_submit.bundle import BudgetError, build
from glacier_submit.publish import prepare_out, publish_bundle, sha256, zip_bundle

from tests.helpers import SMALL, member_mb


def _snapshot(out: str):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}


def test_failed_size_budget_leaves_previous_bundle_identical(tiny_members, tmp_path):
    out = str(tmp_path / "b")
    build(tiny_members, out, check_size=SMALL)
    before = _snapshot(out)
    assert set(before) == {"solution.py", "model.pth", "manifest.json", "submission.zip"}
    # fits as model.pth (fp16) but not base64-embedded: the old build wrote solution.py,
    # deleted model.pth, then raised
    with pytest.raises(BudgetError):
        build(tiny_members[:1], out, check_size=SMALL, single_file=True, max_mb=1.2 * member_mb(tiny_members[0]))
    assert _snapshot(out) == before
    with pytest.raises(BudgetError):
        build(tiny_members, out, check_size=SMALL, max_mb=0.4 * member_mb(tiny_members[0]))
    assert _snapshot(out) == before
    assert not [f for f in os.listdir(tmp_path) if f != "b"]  # no staging folder left behind


def test_single_file_after_normal_build_replaces_the_whole_set(tiny_members, tmp_path):
    out = str(tmp_path / "b")
    build(tiny_members, out, check_size=SMALL)
    open(os.path.join(out, ".tmp-glacier-abc-model.pth"), "wb").write(b"x" * 100)  # a killed writer's temp
    m = build(tiny_members, out, check_size=SMALL, single_file=True)
    assert sorted(os.listdir(out)) == ["manifest.json", "solution.py", "submission.zip"]
    import hashlib
    import zipfile

    src = open(os.path.join(out, "solution.py"), "rb").read()
    assert m["files"]["solution.py"]["sha256"] == hashlib.sha256(src).hexdigest()
    with zipfile.ZipFile(os.path.join(out, "submission.zip")) as z:
        assert z.namelist() == ["solution.py"] and z.read("solution.py") == src


def test_out_with_foreign_files_is_refused_untouched(tiny_members, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        build(tiny_members, str(out), check_size=SMALL)
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_publish_writes_exactly_the_given_files(tmp_path):
    out = tmp_path / "b"
    publish_bundle(str(out), {"solution.py": b"print(1)\n", "model.pth": b"\x00" * 10, "manifest.json": b"{}"})
    assert sorted(os.listdir(out)) == ["manifest.json", "model.pth", "solution.py"]
    assert (out / "model.pth").read_bytes() == b"\x00" * 10
    publish_bundle(str(out), {"solution.py": b"print(2)\n", "manifest.json": b"{}"})  # no stale model.pth beside it
    assert sorted(os.listdir(out)) == ["manifest.json", "solution.py"] and (out / "solution.py").read_bytes() == b"print(2)\n"
    assert os.listdir(tmp_path) == ["b"]  # no staging folder left
    with pytest.raises(ValueError, match=r"not bundle files: \['notes.txt'\]"):
        publish_bundle(str(out), {"solution.py": b"", "notes.txt": b""})
    assert (out / "solution.py").read_bytes() == b"print(2)\n"


def test_prepare_out_repairs_a_swap_cut_between_its_two_renames(tmp_path):
    """A kill after ``out`` -> backup and before staging -> ``out`` leaves only the backup:
    the next build's start puts the previous bundle back, and removes what killed builds left."""
    backup = tmp_path / f"{TEMP_PREFIX}b-old-abc123"
    backup.mkdir()
    (backup / "solution.py").write_bytes(b"previous")
    stage = tmp_path / f"{TEMP_PREFIX}b-new-def456"
    stage.mkdir()
    (stage / "model.pth").write_bytes(b"half")
    prepare_out(str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path)) == ["b"] and (tmp_path / "b" / "solution.py").read_bytes() == b"previous"
    (tmp_path / "c.txt").write_text("a file")
    with pytest.raises(ValueError, match="is a file"):
        prepare_out(str(tmp_path / "c.txt"))


def test_zip_holds_solution_and_weights_uncompressed():
    with zipfile.ZipFile(io.BytesIO(zip_bundle(b"src", b"blob"))) as z:
        assert z.namelist() == ["solution.py", "model.pth"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert z.read("solution.py") == b"src" and z.read("model.pth") == b"blob"
    with zipfile.ZipFile(io.BytesIO(zip_bundle(b"src", None))) as z:
        assert z.namelist() == ["solution.py"]
    assert sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()
