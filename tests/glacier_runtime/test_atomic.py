"""The one atomic writer: a failed or interrupted write never tears or replaces the target."""
import os

import numpy as np
import pytest

from glacier_runtime.atomic import TEMP_PREFIX, atomic_path, atomic_write_bytes, atomic_write_with, remove_stale_temps


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")

    def boom(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(str(target), boom)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pth"]


def test_writers_that_choose_format_by_extension(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    atomic_write_with(str(tmp_path / "a.npy"), lambda tmp: np.save(tmp, arr))
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)


def test_bytes_and_stale_temps(tmp_path):
    atomic_write_bytes(str(tmp_path / "sub" / "x.bin"), b"new")
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"new"
    # a killed writer leaves its temporary file; the next start removes it, nothing else
    with atomic_path(str(tmp_path / "y.pt")) as tmp:
        stale = tmp + ".copy"
        with open(stale, "wb") as fh:
            fh.write(b"x" * 10)
    assert os.path.basename(stale).startswith(TEMP_PREFIX)
    (tmp_path / "keep.txt").write_text("k")
    removed = remove_stale_temps(str(tmp_path))
    assert removed == [stale]
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "sub", "y.pt"]
