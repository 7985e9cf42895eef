"""Packaging (issue 14 item 7): presets shipped as package data and found from a
non-editable install, declared dependency ranges that hold the tested versions, and a
version check where the runtime mirrors smp's U-Net layout."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_presets_are_package_data(tmp_path, monkeypatch):
    from glacier_submit.postprocessing import load_postprocess, preset_names

    monkeypatch.chdir(tmp_path)  # not the checkout
    assert preset_names() == ["competition", "light", "none"]
    assert len(load_postprocess("light")) == 3 and load_postprocess("none") == []
    with pytest.raises(ValueError, match="competition"):
        load_postprocess("heavy")
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert "presets/*.yaml" in data["glacier_submit"]


def test_declared_ranges_hold_the_tested_versions():
    """Every declared requirement is satisfied by the versions this suite runs on, and the
    extras a Kaggle user needs exist (export-gpu with onnxruntime-gpu)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    proj = _pyproject()["project"]
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


@pytest.mark.parametrize("attention", [None, "scse"])
def test_smp_layout_matches_runtime(attention):
    pytest.importorskip("segmentation_models_pytorch")
    from training.models import create_model

    spec = {"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4,
            "decoder_channels": [16, 16, 16, 8, 8], "decoder_attention_type": attention}
    create_model(spec)  # raises if the installed smp lays the U-Net out differently


def test_smp_layout_change_is_refused_with_version():
    pytest.importorskip("segmentation_models_pytorch")
    from glacier_runtime.models import build_model
    from training.models import check_runtime_layout

    spec = {"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4,
            "decoder_channels": [16, 16, 16, 8, 8], "decoder_attention_type": None}

    class Renamed(torch.nn.Module):  # a future smp that renames one layer
        def __init__(self):
            super().__init__()
            self.inner = build_model(spec)

        def state_dict(self, *a, **k):
            sd = self.inner.state_dict()
            sd["segmentation_head.conv.weight"] = sd.pop("segmentation_head.0.weight")
            return sd

    with pytest.raises(RuntimeError, match=r"segmentation-models-pytorch \S+ lays out.*segmentation_head"):
        check_runtime_layout(Renamed(), spec)


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
