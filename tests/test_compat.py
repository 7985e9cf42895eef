"""The runtime and a built bundle in the platform's environment: Python 3.9 + torch 2.0.1
(`make venv39` builds .venv39; `make test-compat` runs these)."""
import os
import subprocess

import numpy as np
import pytest

from glacier_submit.bundle import build
from glacier_submit.sandbox import CONVENTIONS, run_bundle
from glacier_runtime.entry import predict_folder
from glacier_runtime.predictor import Predictor, load_payload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY39 = os.environ.get("GLACIER_PY39", os.path.join(ROOT, ".venv39", "bin", "python"))

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(not os.path.exists(PY39), reason=f"no Python 3.9 + torch 2.0 venv at {PY39}: run `make venv39`"),
]


def test_environment_is_the_platforms():
    out = subprocess.run([PY39, "-c", "import sys, torch; print(sys.version_info[:2], torch.__version__)"],
                         capture_output=True, text=True, check=True).stdout
    assert "(3, 9)" in out and "2.0" in out


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_bundle_runs_under_py39_torch20(tiny_members, messy_test_data, tmp_path, convention):
    out = str(tmp_path / "bundle")
    build(tiny_members, out, tta="flips", postprocess="light", crf=True)  # CRF under torch 2.0 too
    res = run_bundle(out, messy_test_data, convention, str(tmp_path / "m"), timeout=600, python=PY39)
    assert res.ok, res.tail()
    ref = predict_folder(Predictor.from_payload(load_payload(os.path.join(out, "model.pth")), device="cpu"),
                         messy_test_data, None, progress=False)
    assert sorted(res.masks) == sorted(ref)
    for k, v in res.masks.items():
        assert np.array_equal(v, ref[k]), k


def test_fp16_bundle_loads_under_torch20(tiny_members, messy_test_data, tmp_path):
    out = str(tmp_path / "b16")
    build(tiny_members, out, precision="fp16")
    res = run_bundle(out, messy_test_data, "import-call", timeout=600, python=PY39)
    assert res.ok, res.tail()
    assert len(res.masks) == 8
