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
from tests.helpers import PY39, ROOT


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


@pytest.mark.parametrize("mode", ["tile_percentile", "tile_standard"])
def test_adapt_bn_and_per_tile_normalisation_under_py39_torch20(messy_test_data, tmp_path, mode):
    """build --adapt bn with a per-tile-normalised member: the same masks under the platform's
    Python 3.9 / torch 2.0.1 as in process."""
    from tests.helpers import make_member

    w = make_member(str(tmp_path / "m.pt"), normalization=mode)
    out = str(tmp_path / "adapt")
    build([w], out, adapt="bn", bias="none", check_size=(64, 64))
    res = run_bundle(out, messy_test_data, "imagepath", str(tmp_path / "m"), timeout=600, python=PY39)
    assert res.ok, res.tail()
    assert "re-estimated on" in res.stderr
    ref = predict_folder(Predictor.from_payload(load_payload(os.path.join(out, "model.pth")), device="cpu"),
                         messy_test_data, None, progress=False)
    for k, v in res.masks.items():
        assert np.array_equal(v, ref[k]), k


def test_fp16_bundle_loads_under_torch20(tiny_members, messy_test_data, tmp_path):
    out = str(tmp_path / "b16")
    build(tiny_members, out, precision="fp16")
    res = run_bundle(out, messy_test_data, "import-call", timeout=600, python=PY39)
    assert res.ok, res.tail()
    assert len(res.masks) == 8


def test_postprocessing_equal_under_py39_numpy1_opencv4(tmp_path):
    """Every rule, on noisy and smooth masks of odd sizes, gives the same mask under the
    platform's numpy 1.x / OpenCV 4 as here (OpenCV border and float64 box-sum behaviour)."""
    from glacier_runtime import postprocess as pp
    from tests.helpers import blobs, worst_case

    rules = [{"rule": "min_area", "class": 3, "min_area": 12},
             {"rule": "lake_shape", "class": 3, "min_area": 12, "min_width": 3},
             {"rule": "min_area", "class": 2, "min_area": 30},
             {"rule": "debris_needs_glacier", "class": 2, "glacier": 1, "to": 0},
             {"rule": "min_area", "class": 1, "min_area": 30},
             {"rule": "fill_holes", "class": 1, "max_area": 40},
             {"rule": "lake_shape", "class": 3, "min_width": 20}]
    cases = {}
    for i, shape in enumerate([(1, 1), (1, 57), (3, 2), (61, 47), (130, 97), (257, 255)]):
        cases[f"in_{2 * i}"] = worst_case(i, shape)
        if min(shape) > 8:
            cases[f"in_{2 * i + 1}"] = blobs(i, shape, sigma=3.0, cuts=(0.3, 0.5, 0.6))
    for k in list(cases):
        cases["out_" + k[3:]] = pp.apply(cases[k], rules)
    np.savez(tmp_path / "cases.npz", **cases)
    np.save(tmp_path / "rules.npy", np.array(repr(rules)))
    code = ("import sys, ast, numpy as np; sys.path.insert(0, sys.argv[1]);"
            "from glacier_runtime import postprocess as pp;"
            "d = np.load(sys.argv[2]); rules = ast.literal_eval(str(np.load(sys.argv[3])));"
            "bad = [k for k in d.files if k.startswith('in_') and not np.array_equal(pp.apply(d[k], rules), d['out_' + k[3:]])];"
            "print('BAD', bad)")
    out = subprocess.run([PY39, "-c", code, ROOT, str(tmp_path / "cases.npz"), str(tmp_path / "rules.npy")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BAD []" in out.stdout, out.stdout
