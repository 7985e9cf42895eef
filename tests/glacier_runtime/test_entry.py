"""The entry point of solution.py: a tile that cannot be read or written is one failure (or a
background fallback), never a crash; the bundle's own model.pth, or its embedded weights, is the
only model loaded, and a crafted one is refused."""
import os
import shutil
import subprocess
import sys

import numpy as np

from glacier_runtime.predictor import Predictor, load_payload
from glacier_submit.bundle import build
from glacier_submit.sandbox import run_bundle

from tests.helpers import BANDS, craft, huge_tiff, pointwise_predictor, write_test_folder


def test_huge_tile_is_one_failure_not_a_crash(tmp_path):
    from glacier_runtime.entry import predict_folder

    root = write_test_folder(str(tmp_path / "d"))
    for b in BANDS:
        huge_tiff(os.path.join(root, b, "img009.tif"))
    report = {}
    res = predict_folder(pointwise_predictor(), root, str(tmp_path / "o"), progress=False, report=report)
    assert sorted(res) == ["001", "002", "003"] and report["failed"] == ["img009"]
    assert sorted(os.listdir(tmp_path / "o")) == ["img001.tif", "img002.tif", "img003.tif"]


def test_unwritable_mask_is_a_per_tile_failure(tmp_path, caplog):
    from glacier_runtime.entry import predict_folder

    root = write_test_folder(str(tmp_path / "d"))
    out = tmp_path / "o"
    (out / "img002.tif").mkdir(parents=True)  # the mask path is taken by a folder: the write fails
    report = {}
    with caplog.at_level("WARNING"):
        predict_folder(pointwise_predictor(), root, str(out), progress=False, report=report)
    assert report["failed"] == ["img002"] and report["ok"] == 2
    assert os.path.isfile(out / "img001.tif") and os.path.isfile(out / "img003.tif")
    assert "cannot write its mask" in caplog.text and "3 tiles: 2 ok, 0 fell back, 1 failed" in caplog.text


def test_memory_error_reading_a_tile_is_a_per_tile_fallback(tmp_path, monkeypatch, caplog):
    import glacier_runtime.entry as entry

    root = write_test_folder(str(tmp_path / "d"))
    real = entry.read_tile

    def boom(paths, *a, **k):
        if "img002" in paths["Band1"]:
            raise MemoryError("cannot allocate")
        return real(paths, *a, **k)

    monkeypatch.setattr(entry, "read_tile", boom)
    report = {}
    with caplog.at_level("WARNING"):
        res = entry.predict_folder(pointwise_predictor(), root, str(tmp_path / "o"), progress=False, report=report)
    assert sorted(res) == ["001", "002", "003"] and not res["002"].any()  # background, right size
    assert res["002"].shape == (40, 44) and report["fallback"] == ["img002"] and report["failed"] == []
    assert "out of memory" in caplog.text


def test_payload_refused_inside_the_bundle(real_bundle, tmp_path):
    marker = str(tmp_path / "PWNED")
    bad = str(tmp_path / "bad")
    shutil.copytree(real_bundle, bad)
    craft(os.path.join(bad, "model.pth"), marker, load_payload(os.path.join(real_bundle, "model.pth")))
    from tests.helpers import make_tile

    make_tile(str(tmp_path / "data"), "001", naming="test")
    for conv in ("imagepath", "import-call"):
        res = run_bundle(bad, str(tmp_path / "data"), conv, timeout=300)
        assert not res.ok and "refused to load model payload" in res.stderr, res.tail()
        assert not os.path.exists(marker)


def test_model_in_cwd_is_never_loaded(real_bundle, tmp_path):
    """solution.py without model.pth beside it fails, even when the working directory has one."""
    from tests.helpers import make_tile

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(real_bundle, "solution.py"), alone / "solution.py")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.copy(os.path.join(real_bundle, "model.pth"), cwd / "model.pth")
    make_tile(str(tmp_path / "data"), "001", naming="test")
    r = subprocess.run([sys.executable, str(alone / "solution.py"), "--imagepath", str(tmp_path / "data"),
                        "--output", str(tmp_path / "o")], cwd=str(cwd), capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode != 0 and "not found beside solution.py" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o" / "img001.tif")


def test_single_file_prefers_its_embedded_weights(tiny_members, messy_test_data, tmp_path):
    """A stray model.pth beside a --single-file solution.py is ignored: the embedded weights are the bundle's."""
    single = str(tmp_path / "single")
    build(tiny_members[:1], single, single_file=True)
    other = str(tmp_path / "other")
    build(tiny_members[1:], other)
    shutil.copy(os.path.join(other, "model.pth"), os.path.join(single, "model.pth"))
    res = run_bundle(single, messy_test_data, "imagepath", str(tmp_path / "m"), timeout=300)
    assert res.ok, res.tail()
    from glacier_runtime.entry import predict_folder
    from glacier_submit.members import load_members, make_payload

    ref_pred = Predictor.from_payload(make_payload(load_members(tiny_members[:1]), {}), device="cpu")
    ref = predict_folder(ref_pred, messy_test_data, None, progress=False)
    assert sorted(res.masks) == sorted(ref)
    assert all(np.array_equal(res.masks[k], ref[k]) for k in ref)


def test_model_path_and_unknown_arguments(real_bundle, synth_data, tmp_path):
    """One team's harness runs `solution.py --imagepath DIR --model_path FILE`; unknown
    arguments are reported and ignored, never fatal."""
    import subprocess
    import sys

    out = tmp_path / "masks"
    sol = os.path.join(real_bundle, "solution.py")
    cmd = [sys.executable, sol, "--imagepath", os.path.join(synth_data, "unseen"), "--output", str(out),
           "--model_path", os.path.join(real_bundle, "model.pth"), "--team", "x", "--verbose"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ignoring arguments this solution.py does not know: --team x --verbose" in r.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(os.path.join(synth_data, "unseen", "Band1")))
