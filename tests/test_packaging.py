"""Packaging: declared dependency ranges that hold the tested versions, the extras a Kaggle
user needs, and presets shipped as package data found from a non-editable install."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, pyproject


def test_declared_ranges_hold_the_tested_versions():
    """Every declared requirement is satisfied by the versions this suite runs on, and the
    extras a Kaggle user needs exist (export-gpu with onnxruntime-gpu)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    proj = pyproject()["project"]
    reqs = list(proj["dependencies"]) + [r for k in ("train", "export") for r in proj["optional-dependencies"][k]]
    for text in reqs:
        req = Requirement(text)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            continue
        assert req.specifier.contains(have, prereleases=True), f"{req} does not admit the tested {req.name} {have}"
    gpu = [Requirement(r).name for r in proj["optional-dependencies"]["export-gpu"]]
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    smp = next(Requirement(r) for r in proj["optional-dependencies"]["train"]
               if Requirement(r).name == "segmentation-models-pytorch")
    assert any(s.operator == "<" for s in smp.specifier), "smp needs an upper bound (runtime mirrors its layout)"


@pytest.mark.slow
def test_non_editable_install_finds_presets(tmp_path, tiny_members):
    """pip install (not editable) into a separate folder, then `glacier-submit build
    --postprocess light` from another folder, importing only the installed copy."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), ROOT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (target / "glacier_submit" / "presets" / "light.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    code = ("import sys, glacier_submit; print('FROM', glacier_submit.__file__); "
            "from glacier_submit.cli import main; sys.argv = ['glacier-submit'] + sys.argv[1:]; main()")
    r = subprocess.run([sys.executable, "-c", code, "build", "--models", tiny_members[0], "--out", "bundle",
                        "--postprocess", "light"], cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"FROM {target}" in r.stdout
    man = json.load(open(work / "bundle" / "manifest.json"))
    assert man["postprocess_preset"] == "light" and len(man["postprocess"]) == 3
