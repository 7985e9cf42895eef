"""ONNX export: parity with torch (fp32 <= 1e-4), fp16 agreement, unsupported layers, ONNX bundles."""
import os

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from glacier_submit.bundle import build  # noqa: E402
from glacier_submit.export import ExportError, export_member, export_onnx  # noqa: E402
from glacier_submit.members import load_members  # noqa: E402
from glacier_runtime.predictor import Predictor, load_payload  # noqa: E402


def test_onnx_parity_fp32_and_fp16(tiny_members):
    e = load_members(tiny_members[:1])[0]
    res = export_member(e, fp16=True)
    assert res["parity"]["max_abs_diff"] <= 1e-4
    assert res["parity_fp16"]["class_agreement"] > 0.98


def test_dynamic_shapes(tiny_members):
    from glacier_runtime.backends import OnnxRunner
    from glacier_submit.export import torch_model_for

    e = load_members(tiny_members[:1])[0]
    model = torch_model_for(e)
    runner = OnnxRunner(export_onnx(model, 5), "cpu")
    for shape in [(1, 5, 32, 64), (3, 5, 96, 32)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert (runner(x) - model(x)).abs().max() < 1e-4


def test_unsupported_layer_message():
    class Weird(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft2(x).real  # no ONNX opset-17 form

    with pytest.raises(ExportError, match="no ONNX opset-17 form"):
        export_onnx(Weird(), 5)


@pytest.mark.slow
def test_onnx_bundle_matches_torch(tiny_members, messy_test_data, tmp_path):
    out = str(tmp_path / "onnx")
    m = build(tiny_members, out, backend="onnx")
    assert m["runtime"]["backend"] == "onnx"
    assert all(v["max_abs_diff"] <= 1e-4 for v in m["runtime"]["onnx_parity"].values())
    src = open(os.path.join(out, "solution.py")).read().splitlines()[:15]
    assert any(line.startswith("# pip install onnxruntime") for line in src)
    payload = load_payload(os.path.join(out, "model.pth"))
    img = np.random.default_rng(0).normal(size=(5, 64, 64)).astype(np.float32) * 0.1 + 0.15
    a = Predictor.from_payload(payload, device="cpu", backend="onnx").predict_proba(img)
    b = Predictor.from_payload(payload, device="cpu", backend="torch").predict_proba(img)
    assert np.abs(a - b).max() < 1e-4
