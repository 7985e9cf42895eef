"""TorchRunner folds BatchNorm into the convolutions without changing the outputs."""
import torch
import torch.nn as nn

from glacier_runtime.backends import fold_batchnorm
from glacier_runtime.models import build_model

from tests.helpers import randomise_bn
import logging
import numpy as np


def test_batchnorm_folding_keeps_outputs():
    torch.manual_seed(1)
    m = randomise_bn(build_model({"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4})).eval()
    x = torch.randn(2, 5, 64, 64)
    with torch.no_grad():
        ref = m(x)
        import copy

        fused = fold_batchnorm(copy.deepcopy(m))
        assert not any(isinstance(k, nn.BatchNorm2d) for k in fused.modules())
        assert (fused(x) - ref).abs().max().item() < 1e-4


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
class _FakeSession:
    used = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    made = []

    def __init__(self, blob, sess_options=None, providers=None):
        _FakeSession.made.append(providers)

    def get_providers(self):
        return list(_FakeSession.used)

    def get_inputs(self):
        class _In:
            name, type = "image", "tensor(float)"
        return [_In()]

    def run(self, _, feed):
        x = feed["image"]
        return [np.zeros((x.shape[0], 4) + x.shape[2:], np.float32)]


def _fake_ort(monkeypatch, used):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    _FakeSession.used, _FakeSession.made = used, []


def test_onnx_on_cuda_is_scheduled_as_cuda_on_the_asked_gpu(monkeypatch):
    from glacier_runtime.backends import OnnxRunner
    from glacier_runtime.predictor import Member, Predictor

    _fake_ort(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    runner = OnnxRunner(b"graph", "cuda:1")
    assert _FakeSession.made == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]]
    assert runner.device == torch.device("cuda", 1)
    pred = Predictor([Member(runner, {"mean": [0] * 5, "std": [1] * 5, "lo": [-9] * 5, "hi": [9] * 5})], {"tta": "d4"})
    assert pred._max_batch(pred.members[0]) == 8 and pred._workers(pred.members) == 1
    pred.predict_proba(np.zeros((5, 64, 64), np.float32))
    assert len(_FakeSession.made) == 1  # one session: no per-thread CPU sessions on the GPU


def test_onnx_silent_cpu_fallback_is_reported(monkeypatch, caplog):
    from glacier_runtime.backends import OnnxRunner

    _fake_ort(monkeypatch, ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="glacier.runtime"):
        runner = OnnxRunner(b"graph", "cuda")
    assert runner.device.type == "cpu"
    assert any("asked for CUDA but the session runs on" in r.getMessage() for r in caplog.records)
