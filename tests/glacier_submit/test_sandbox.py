"""The platform sandbox: a minimal environment (no secrets, no PYTHONPATH, imagecodecs and the
repository blocked), a default timeout and clean-up, an empty output folder, file names without
digits."""
import json
import os

import pytest

from glacier_submit import sandbox
from glacier_submit.evaluate import evaluate
from glacier_submit.sandbox import run_bundle

from tests.helpers import ROOT, copy_tiles_as, fake_bundle


def test_run_bundle_refuses_a_non_empty_output_folder(setup, tmp_path):
    bundle, data, _, _ = setup
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "img001.tif").write_bytes(b"old")
    with pytest.raises(ValueError, match="not empty"):
        run_bundle(bundle, os.path.join(data, "unseen"), "imagepath", str(tmp_path / "o"))


def test_name_without_digits_works_on_the_import_call_path(setup, tmp_path):
    bundle, data, _, _ = setup
    d = str(tmp_path / "nodigits")
    copy_tiles_as(os.path.join(data, "unseen"), d, [("img001.tif", "file.tif"), ("img002.tif", "allow_pickle.tif")])
    res = run_bundle(bundle, d, "import-call", timeout=300)
    assert res.ok, res.tail()
    assert sorted(res.masks) == ["allow_pickle", "file"]  # the id of a name without digits is its stem
    r = evaluate(bundle, d, str(tmp_path / "r"), convention="import-call", figures=False)
    assert r["missing"] == [] and r["mask_count"] == 2


_SPY = '''
import json, os, sys
out = sys.argv[sys.argv.index("--output") + 1]
try:
    import imagecodecs
    ic = "imported"
except ImportError as exc:
    ic = str(exc)
json.dump({"env": dict(os.environ), "imagecodecs": ic, "cwd": os.getcwd()}, open(os.path.join(out, "spy.json"), "w"))
'''


def test_sandbox_environment_is_minimal(setup, tmp_path, monkeypatch):
    bundle, data, _, _ = setup
    monkeypatch.setenv("GITHUB_TOKEN", "secret-token-value")
    monkeypatch.setenv("LD_PRELOAD", "libdoesnotexist.so")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spy = fake_bundle(tmp_path, bundle, _SPY)
    res = run_bundle(spy, os.path.join(data, "unseen"), "imagepath", str(tmp_path / "o"), timeout=120)
    assert res.ok, res.tail()
    seen = json.load(open(tmp_path / "o" / "spy.json"))
    env = seen["env"]
    for gone in ("GITHUB_TOKEN", "LD_PRELOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "PYTHONPATH"):
        assert gone not in env, gone
    assert "secret-token-value" not in json.dumps(env)
    assert env["OMP_NUM_THREADS"] == "1" and "PATH" in env
    assert env["HOME"] != os.environ.get("HOME") and env["TMPDIR"].startswith(os.path.dirname(env["HOME"]))
    assert "blocked in the platform sandbox: imagecodecs" in seen["imagecodecs"]


def test_sandbox_default_timeout_and_cleanup(setup, tmp_path, monkeypatch):
    import tempfile

    bundle, data, _, _ = setup
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(sandbox, "DEFAULT_TIMEOUT_S", 3.0)
    hang = fake_bundle(tmp_path, bundle, "import time\ntime.sleep(120)\n")
    res = run_bundle(hang, os.path.join(data, "unseen"), "imagepath")  # no timeout given: the default applies
    assert res.timed_out and not res.ok and "3 s timeout" in res.stderr
    assert os.listdir(scratch) == []  # cwd, HOME, TMPDIR and output of the run are gone
    res = run_bundle(bundle, os.path.join(data, "unseen"), "import-call", timeout=300)
    assert res.ok and len(res.masks) == 4 and os.listdir(scratch) == []
    assert sandbox.DEFAULT_TIMEOUT_S == 3.0 and "DEFAULT_TIMEOUT_S = 600.0" in open(sandbox.__file__).read()


def test_sandbox_blocks_repo_and_training_packages(bundle, messy_test_data, tmp_path):
    out, _ = bundle
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "solution.py").write_text("import scipy\n")
    (evil / "model.pth").write_bytes(b"")
    res = run_bundle(str(evil), messy_test_data, "imagepath", timeout=120)
    assert not res.ok and "blocked in the platform sandbox: scipy" in res.stderr
    (evil / "solution.py").write_text("import training\n")
    assert "blocked" in run_bundle(str(evil), messy_test_data, "imagepath", timeout=120).stderr
