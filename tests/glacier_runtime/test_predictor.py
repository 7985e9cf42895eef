"""The predictor: members and views merged, odd sizes, NaN input, windows and blocks (equal to the
whole tile, bounded memory), the decision with bias and masked pixels, the CRF step between
merging and deciding, and the work-item parallel path against an independent naive loop
(every member, every view, batch 1, softmax, inverse, mean), to 1e-5, for every worker count."""
from __future__ import annotations

import copy
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from glacier_runtime.backends import OnnxRunner, TorchRunner, onnxruntime_available
from glacier_runtime.models import build_model
from glacier_runtime.normalize import identity_stats, masked_pixels, normalize
from glacier_runtime.predictor import Member, Predictor, _view_forward_np
from glacier_runtime.tta import D4, resolve_views

from tests.helpers import PointwiseNet, naive_crf, pointwise_predictor


def test_equivariant_model_identical_under_every_view():
    img = np.random.default_rng(0).normal(size=(5, 37, 41)).astype(np.float32)
    base = pointwise_predictor(tta="none").predict_proba(img)
    d4 = pointwise_predictor(tta="d4").predict_proba(img)
    assert np.abs(base - d4).max() < 1e-5
    for name in D4:
        one = pointwise_predictor(tta=[name]).predict_proba(img)
        assert np.abs(base - one).max() < 1e-5


@pytest.mark.parametrize("shape", [(37, 41), (500, 517), (1, 1), (5, 64)])
def test_odd_sizes_keep_height_and_width(shape):
    img = np.random.default_rng(1).normal(size=(5,) + shape).astype(np.float32)
    p = pointwise_predictor(tta="flips", scales=[0.75, 1.0]).predict_proba(img)
    assert p.shape == (4,) + shape
    assert np.allclose(p.sum(0), 1.0, atol=1e-4)


def test_nan_tile_is_finite_and_equals_mean_fill():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(5, 33, 35)).astype(np.float32)
    bad = img.copy()
    bad[:, :5, :5] = np.nan
    bad[2, 10, 10] = np.inf
    filled = img.copy()
    filled[:, :5, :5] = 0.0  # identity stats: the training mean is 0
    filled[2, 10, 10] = 0.0
    pr = pointwise_predictor()
    a, b = pr.predict_proba(bad), pr.predict_proba(filled)
    assert np.isfinite(a).all() and np.abs(a - b).max() < 1e-6


def test_windowed_equals_whole_for_pointwise_model():
    img = np.random.default_rng(3).normal(size=(5, 150, 130)).astype(np.float32)
    whole = pointwise_predictor(window=1024).predict_proba(img)
    windowed = pointwise_predictor(window=64, overlap=0.5).predict_proba(img)
    assert np.abs(whole - windowed).max() < 1e-5


def test_bias_shifts_decision():
    pr = pointwise_predictor(bias=[0.0, 0.0, 0.0, 50.0])
    ids = pr.predict_ids(np.ones((5, 8, 8), np.float32))
    assert (ids == 3).all()
    with pytest.raises(ValueError, match="bias needs 4"):
        pointwise_predictor(bias=[1.0])


def test_weighted_merge_uses_member_weights():
    a = Member(TorchRunner(PointwiseNet(), "cpu", fold_bn=False), identity_stats(5), weight=1.0)
    torch.manual_seed(5)
    other = nn.Sequential(nn.Conv2d(5, 4, 1))
    b = Member(TorchRunner(other, "cpu", fold_bn=False), identity_stats(5), weight=0.0)
    img = np.random.default_rng(4).normal(size=(5, 16, 16)).astype(np.float32)
    only_a = Predictor([a]).predict_proba(img)
    weighted = Predictor([a, b], {"merge": "weighted"}).predict_proba(img)
    assert np.abs(only_a - weighted).max() < 1e-6


def test_safe_prediction_falls_back():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("out of memory")

    pr = Predictor([Member(TorchRunner(Boom(), "cpu", fold_bn=False), identity_stats(5))])
    mask, note = pr.predict_pixels_safe(np.ones((5, 9, 11), np.float32))
    assert mask.shape == (9, 11) and mask.dtype == np.uint8 and note == "fallback: background"
    mask, note = pointwise_predictor(tta="d4").predict_pixels_safe(np.ones((5, 9, 11), np.float32))
    assert note == "" and set(np.unique(mask)) <= {0, 85, 170, 255}


def test_masked_pixels_become_background():
    img = np.random.default_rng(7).normal(size=(5, 20, 20)).astype(np.float32)
    img[:, :, :4] = 0.0  # masked strip: zero in every band
    pr = pointwise_predictor(bias=[0.0, 50.0, 0.0, 0.0])  # would say glacier everywhere
    ids = pr.predict_ids(img)
    assert (ids[:, :4] == 0).all() and (ids[:, 4:] == 1).all()
    off = pointwise_predictor(bias=[0.0, 50.0, 0.0, 0.0], masked_background=False).predict_ids(img)
    assert (off == 1).all()
    img[0, 0, 0] = 0.5  # one band non-zero: not masked
    assert pr.predict_ids(img)[0, 0] == 1


def test_block_prediction_equals_whole_and_bounds_memory():
    img = np.random.default_rng(0).normal(size=(5, 700, 600)).astype(np.float32)
    peaks, ids = {}, {}
    for block in (0, 192):
        pred = pointwise_predictor(block=block, window=128)
        tracemalloc.start()
        try:
            ids[block] = pred.predict_ids(img)
            peaks[block] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert np.array_equal(ids[0], ids[192])
    per_px = {k: v / (700 * 600) for k, v in peaks.items()}
    # whole tile: ~85 B/px of working memory; by blocks: the uint8 result plus one block's working set
    assert per_px[0] > 50 and peaks[192] < 700 * 600 * 1.5 + 100 * (192 + 2 * 32) ** 2, per_px


def test_block_prediction_with_receptive_field_matches_whole():
    """A 3x3-conv net (receptive field 7): the 32-pixel block margin gives every core pixel its
    context; the crops (96 + 2 x 32) are much smaller than the 300 x 260 tile."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1))
    img = np.random.default_rng(1).normal(size=(5, 300, 260)).astype(np.float32)

    def run(block):
        m = Member(TorchRunner(net, "cpu", fold_bn=False), identity_stats(5), n_classes=4)
        return Predictor([m], {"block": block, "window": 256}).predict_ids(img)

    whole, blocks = run(0), run(96)
    assert (whole == blocks).mean() > 0.995, (whole == blocks).mean()  # window-edge blending differs slightly


def test_saved_probabilities_carry_the_masked_rule():
    """What validation saves decides as the runtime does: argmax of the saved array equals
    Predictor.decide (bias 0, no post-processing), masked pixels included."""
    rng = np.random.default_rng(1)
    image = rng.random((5, 16, 16)).astype(np.float32) + 0.1
    image[:, :4] = 0.0  # a masked scene edge
    probs = rng.random((4, 16, 16)).astype(np.float32)
    probs[1, :4] += 5.0  # the model says glacier on the masked edge
    probs /= probs.sum(0, keepdims=True)

    class _Stub:
        n_classes = 4
        runner = None

    pred = Predictor([_Stub()])
    masked = pred.masked(image)
    assert masked is not None and np.array_equal(masked, masked_pixels(image))
    saved = pred.masked_to_background(probs, masked).astype(np.float16)
    assert np.array_equal(saved.astype(np.float32).argmax(0), pred.decide(probs, masked))
    assert (saved.argmax(0)[:4] == 0).all() and np.allclose(saved[:, 4:], probs[:, 4:], atol=1e-3)
    assert pred.masked_to_background(probs, None) is probs


def test_predictor_applies_the_crf_between_merging_and_deciding():
    """Predictor with ``crf`` configured: class ids == argmax of the naive mean-field loop run
    on the predictor's own merged probabilities (masked pixels certain background first),
    with the bands normalised by hand as the appearance term; masked pixels stay background."""
    import torch

    from glacier_runtime.backends import TorchRunner
    from glacier_runtime.predictor import Member, Predictor

    torch.manual_seed(0)
    net = torch.nn.Conv2d(5, 4, 3, padding=1)
    rng = np.random.default_rng(1)
    img = rng.normal(100, 20, (5, 11, 13)).astype(np.float32)
    img[:, :2, :3] = 0                                       # a masked corner
    stats = {"mean": [100.0] * 5, "std": [20.0] * 5, "lo": [0.0] * 5, "hi": [1e4] * 5}
    member = Member(TorchRunner(net, "cpu", fold_bn=False), stats, n_classes=4)
    cfg = dict(iterations=2, window=3, theta_pos=2.0, theta_app=0.8, w_app=1.0, theta_smooth=1.2, w_smooth=0.7)
    plain = Predictor([member], {"stride": 1})
    with_crf = Predictor([member], {"stride": 1, "crf": cfg})
    probs = plain.predict_proba(img)
    masked = (img == 0).all(0)
    probs_m = probs.copy()
    probs_m[:, masked] = 0
    probs_m[0, masked] = 1
    feats = (np.clip(img, 0, 1e4) - 100.0) / 20.0
    ref = naive_crf(probs_m.astype(np.float64), feats.astype(np.float64), cfg["window"], cfg["iterations"],
                    cfg["theta_pos"], cfg["theta_app"], cfg["w_app"], cfg["theta_smooth"], cfg["w_smooth"]).argmax(0)
    ref[masked] = 0
    got = with_crf.predict_ids(img)
    assert (got == ref).all()
    assert (got != plain.predict_ids(img)).any()  # the step did something on this tile
    with pytest.raises(ValueError, match="crf.window"):
        Predictor([member], {"crf": {"window": 4}})


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


@pytest.mark.parametrize("mode", ["tile_percentile", "tile_standard"])
def test_per_tile_modes_use_the_whole_tiles_numbers_in_every_window_and_block(mode):
    """Windows and blocks are normalised with the whole tile's own numbers: the same
    probabilities as normalising the tile by hand and predicting it with identity stats."""
    from glacier_runtime.backends import TorchRunner
    from glacier_runtime.normalize import identity_stats, normalize
    from glacier_runtime.predictor import Member, Predictor

    rng = np.random.default_rng(5)
    img = (rng.gamma(2.0, 30.0, (5, 300, 260)) + 50 * np.arange(5)[:, None, None]).astype(np.float32)
    img[:, 250:, :] *= 3.0  # the bottom of the tile differs: a block's own numbers would differ
    st = {**identity_stats(5), "mode": mode, "tile_percentiles": [2, 98]}
    oracle = pointwise_predictor(window=1024).predict_proba(normalize(img, st))
    ids_oracle = pointwise_predictor(window=1024).predict_ids(normalize(img, st))

    def pred(**inf):
        return Predictor([Member(TorchRunner(PointwiseNet(), "cpu", fold_bn=False), st, n_classes=4)], inf)

    assert np.abs(pred(window=1024).predict_proba(img) - oracle).max() < 1e-5
    assert np.abs(pred(window=64, overlap=0.5).predict_proba(img) - oracle).max() < 1e-5
    assert np.array_equal(pred(block=96, window=64).predict_ids(img), ids_oracle)
