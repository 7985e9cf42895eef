"""The work-item parallel predictor path against an independent naive loop (every member,
every view, batch 1, softmax, inverse, mean), to 1e-5, for every worker count."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from glacier_runtime.backends import OnnxRunner, TorchRunner, onnxruntime_available
from glacier_runtime.models import build_model
from glacier_runtime.normalize import normalize
from glacier_runtime.predictor import Member, Predictor, _view_forward_np
from glacier_runtime.tta import D4, resolve_views

SPEC = {"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4,
        "decoder_channels": [16, 16, 16, 8, 8], "decoder_attention_type": None}


def _models(n):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        m = build_model(SPEC).eval()
        g = torch.Generator().manual_seed(i)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
        out.append(m)
    return out


def _stats(i):
    return {"mean": [0.1 * i] * 5, "std": [1.0 + 0.1 * i] * 5, "lo": [-5.0] * 5, "hi": [5.0] * 5}


def naive(models, image, views, weights, scales=(1.0,)):
    """The textbook loop, written independently of the runtime (numpy padding, torch ops)."""
    _, h, w = image.shape
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    acc = torch.zeros(4, h, w, dtype=torch.float64)
    with torch.no_grad():
        for i, (m, wt) in enumerate(zip(models, weights)):
            x = normalize(image, _stats(i))
            x = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w)), mode="reflect")
            x = torch.from_numpy(x)[None]
            for s in scales:
                size = (max(32, round(hp * s / 32) * 32), max(32, round(wp * s / 32) * 32)) if s != 1.0 else (hp, wp)
                xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if size != (hp, wp) else x
                for v in views:
                    y = xs
                    if v.flip:
                        y = torch.flip(y, dims=(3,))
                    y = torch.rot90(y, v.k, dims=(2, 3))
                    p = torch.softmax(m(y), 1)
                    p = torch.rot90(p, -v.k, dims=(2, 3))
                    if v.flip:
                        p = torch.flip(p, dims=(3,))
                    if size != (hp, wp):
                        p = F.interpolate(p, size=(hp, wp), mode="bilinear", align_corners=False)
                    acc += wt * p[0, :, :h, :w].double() / (len(views) * len(scales))
    return (acc / sum(weights)).numpy()


def _predictor(models, workers, tta="d4", runner="torch", **cfg):
    members = []
    for i, m in enumerate(models):
        if runner == "torch":
            r = TorchRunner(copy.deepcopy(m), "cpu")
        else:
            from glacier_submit.export import export_onnx

            r = OnnxRunner(export_onnx(m, 5), "cpu")
        members.append(Member(r, _stats(i), weight=1.0 + i))
    return Predictor(members, {"tta": tta, "workers": workers, "merge": "weighted", **cfg})


@pytest.mark.parametrize("workers,shape", [(1, (37, 45)), (2, (37, 45)), (3, (33, 70))])
def test_parallel_items_equal_naive_loop(workers, shape):
    models = _models(2)
    img = np.random.default_rng(sum(shape)).normal(size=(5, *shape)).astype(np.float32)
    ref = naive(models, img, resolve_views("d4"), [1.0, 2.0])
    got = _predictor(models, workers).predict_proba(img)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5


def test_scales_and_flips_equal_naive_loop():
    models = _models(2)
    img = np.random.default_rng(3).normal(size=(5, 50, 61)).astype(np.float32)
    ref = naive(models, img, resolve_views("flips"), [1.0, 2.0], scales=(0.75, 1.0))
    for workers in (1, 2):
        got = _predictor(models, workers, tta="flips", scales=[0.75, 1.0]).predict_proba(img)
        assert np.abs(got - ref).max() < 1e-5


def test_windowed_parallel_equals_serial_and_is_deterministic():
    models = _models(2)
    img = np.random.default_rng(4).normal(size=(5, 100, 90)).astype(np.float32)
    serial = _predictor(models, 1, tta="flips", window=64, overlap=0.5).predict_proba(img)
    par = _predictor(models, 2, tta="flips", window=64, overlap=0.5)
    a, b = par.predict_proba(img), par.predict_proba(img)
    assert np.abs(a - serial).max() < 1e-5 and np.array_equal(a, b)


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime not installed")
def test_onnx_workers_equal_naive_loop():
    models = _models(2)
    img = np.random.default_rng(5).normal(size=(5, 40, 40)).astype(np.float32)
    ref = naive(models, img, resolve_views("d4"), [1.0, 2.0])
    pr = _predictor(models, 2, runner="onnx")
    assert np.abs(pr.predict_proba(img) - ref).max() < 1e-5
    # each worker thread got its own single-thread session
    assert 1 in pr.members[0].runner._sessions


@pytest.mark.parametrize("name", list(D4))
def test_numpy_view_of_accumulator_is_the_inverse(name):
    v = D4[name]
    p = torch.randn(1, 4, 6, 9)
    y = v.forward(p)  # what the model sees / returns in the view frame
    acc = np.zeros((4, 6, 9), np.float32)
    target = _view_forward_np(v, acc)
    target += y[0].numpy()
    assert np.array_equal(acc, v.inverse(y)[0].numpy())


def test_worker_threads_do_not_change_the_callers_thread_count():
    before = torch.get_num_threads()
    _predictor(_models(1), 2, tta="flips").predict_proba(np.zeros((5, 32, 32), np.float32))
    assert torch.get_num_threads() == before
