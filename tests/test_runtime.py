"""Inference runtime: models, TTA, windows, post-processing, predictor."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from glacier_runtime import postprocess
from glacier_runtime.backends import TorchRunner, fold_batchnorm
from glacier_runtime.models import UnsupportedArchitecture, build_model
from glacier_runtime.normalize import identity_stats
from glacier_runtime.predictor import Member, Predictor
from glacier_runtime.tta import D4, group_views, resolve_views
from glacier_runtime.window import blend_weight, pad_to_multiple, plan_windows, window_starts


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34", pytest.param("resnet50", marks=pytest.mark.slow)])
@pytest.mark.parametrize("attention", [None, "scse"])
def test_strict_load_and_parity_with_smp(encoder, attention):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    ref = _randomise_bn(smp.Unet(encoder, encoder_weights=None, in_channels=5, classes=4,
                                 decoder_attention_type=attention)).eval()
    mine = build_model({"arch": "Unet", "encoder": encoder, "in_channels": 5, "classes": 4,
                        "decoder_attention_type": attention}).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 5, 64, 96)
    with torch.no_grad():
        assert (ref(x) - mine(x)).abs().max().item() <= 1e-5


def test_unsupported_architecture_message():
    with pytest.raises(UnsupportedArchitecture, match="--backend onnx"):
        build_model({"arch": "FPN", "encoder": "resnet34", "in_channels": 5, "classes": 4})


def test_batchnorm_folding_keeps_outputs():
    torch.manual_seed(1)
    m = _randomise_bn(build_model({"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4})).eval()
    x = torch.randn(2, 5, 64, 64)
    with torch.no_grad():
        ref = m(x)
        import copy

        fused = fold_batchnorm(copy.deepcopy(m))
        assert not any(isinstance(k, nn.BatchNorm2d) for k in fused.modules())
        assert (fused(x) - ref).abs().max().item() < 1e-4


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 23), w=st.integers(1, 23), name=st.sampled_from(list(D4)))
def test_view_inverse_roundtrip(h, w, name):
    x = torch.randn(2, 3, h, w)
    v = D4[name]
    y = v.forward(x)
    assert tuple(y.shape[-2:]) == v.out_shape(h, w)
    assert torch.equal(v.inverse(y), x)


def test_d4_views_are_distinct_and_group_by_shape():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    outs = {tuple(D4[n].forward(x).flatten().tolist()) for n in D4}
    assert len(outs) == 8
    assert len(group_views(resolve_views("d4"), 3, 4)) == 2
    assert len(group_views(resolve_views("d4"), 4, 4)) == 1
    with pytest.raises(ValueError, match="unknown TTA"):
        resolve_views(["spin"])


class PointwiseNet(nn.Module):
    """1x1 convolutions only: equivariant under every D4 view by construction."""

    def __init__(self, cin=5, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU(), nn.Conv2d(8, k, 1))

    def forward(self, x):
        return self.net(x)


def _predictor(model=None, **inference):
    model = model or PointwiseNet()
    member = Member(TorchRunner(model, "cpu", fold_bn=False), identity_stats(5), n_classes=4)
    return Predictor([member], inference)


def test_equivariant_model_identical_under_every_view():
    img = np.random.default_rng(0).normal(size=(5, 37, 41)).astype(np.float32)
    base = _predictor(tta="none").predict_proba(img)
    d4 = _predictor(tta="d4").predict_proba(img)
    assert np.abs(base - d4).max() < 1e-5
    for name in D4:
        one = _predictor(tta=[name]).predict_proba(img)
        assert np.abs(base - one).max() < 1e-5


@pytest.mark.parametrize("shape", [(37, 41), (500, 517), (1, 1), (5, 64)])
def test_odd_sizes_keep_height_and_width(shape):
    img = np.random.default_rng(1).normal(size=(5,) + shape).astype(np.float32)
    p = _predictor(tta="flips", scales=[0.75, 1.0]).predict_proba(img)
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
    pr = _predictor()
    a, b = pr.predict_proba(bad), pr.predict_proba(filled)
    assert np.isfinite(a).all() and np.abs(a - b).max() < 1e-6


def test_windowed_equals_whole_for_pointwise_model():
    img = np.random.default_rng(3).normal(size=(5, 150, 130)).astype(np.float32)
    whole = _predictor(window=1024).predict_proba(img)
    windowed = _predictor(window=64, overlap=0.5).predict_proba(img)
    assert np.abs(whole - windowed).max() < 1e-5


def test_windows_cover_and_weights_positive():
    starts = window_starts(300, 128, 0.25)
    assert starts[0] == 0 and starts[-1] == 300 - 128
    cover = np.zeros(300)
    for s in starts:
        cover[s:s + 128] += 1
    assert cover.min() >= 1
    assert (blend_weight(64, 96) > 0).all()
    assert len(plan_windows(64, 64, 128, 0.25)) == 1


def test_pad_reflect_and_tiny_tiles():
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    p, hw = pad_to_multiple(x, 32)
    assert p.shape == (2, 32, 32) and hw == (3, 5) and np.array_equal(p[:, :3, :5], x)
    p, _ = pad_to_multiple(np.ones((1, 1, 1), np.float32), 32)
    assert p.shape == (1, 32, 32)


def test_bias_shifts_decision():
    pr = _predictor(bias=[0.0, 0.0, 0.0, 50.0])
    ids = pr.predict_ids(np.ones((5, 8, 8), np.float32))
    assert (ids == 3).all()
    with pytest.raises(ValueError, match="bias needs 4"):
        _predictor(bias=[1.0])


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
    mask, note = _predictor(tta="d4").predict_pixels_safe(np.ones((5, 9, 11), np.float32))
    assert note == "" and set(np.unique(mask)) <= {0, 85, 170, 255}


# ---- post-processing vs scipy.ndimage references -------------------------------------------
ndi = pytest.importorskip("scipy.ndimage")


def _ref_remove_small(mask, cls, min_area):
    out = mask.copy()
    lab, n = ndi.label(mask == cls, structure=np.ones((3, 3)))
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() < min_area:
            ring = ndi.binary_dilation(comp, structure=np.ones((3, 3))) & ~comp
            vals = mask[ring]
            vals = vals[vals != cls]
            out[comp] = np.bincount(vals, minlength=4).argmax() if vals.size else 0
    return out


def _random_mask(seed, shape=(60, 70)):
    rng = np.random.default_rng(seed)
    import cv2

    base = rng.random((shape[0] // 6 + 1, shape[1] // 6 + 1))
    big = cv2.resize(base, shape[::-1], interpolation=cv2.INTER_NEAREST)
    mask = np.digitize(big, [0.5, 0.75, 0.9]).astype(np.uint8)
    speck = rng.random(shape)
    mask[speck < 0.03] = rng.integers(0, 4)
    return mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cls,min_area", [(3, 10), (2, 40), (1, 5)])
def test_remove_small_matches_scipy(seed, cls, min_area):
    m = _random_mask(seed)
    assert np.array_equal(postprocess.remove_small(m, cls, min_area), _ref_remove_small(m, cls, min_area))


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_matches_scipy(seed):
    m = _random_mask(seed)
    for cls in (1, 2):
        ref = m.copy()
        ref[ndi.binary_fill_holes(m == cls)] = cls
        assert np.array_equal(postprocess.fill_holes(m, cls), ref)


def test_fill_holes_max_area():
    m = np.ones((20, 20), np.uint8)
    m[2:4, 2:4] = 0     # 4 px hole
    m[8:14, 8:14] = 0   # 36 px hole
    out = postprocess.fill_holes(m, 1, max_area=10)
    assert (out[2:4, 2:4] == 1).all() and (out[8:14, 8:14] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_debris_rule_matches_scipy(seed):
    m = _random_mask(seed)
    lab, n = ndi.label(m == 2, structure=np.ones((3, 3)))
    near = ndi.binary_dilation(m == 1, structure=np.ones((3, 3)))
    ref = m.copy()
    for i in range(1, n + 1):
        if not (near & (lab == i)).any():
            ref[lab == i] = 0
    assert np.array_equal(postprocess.debris_needs_glacier(m), ref)


def test_lake_shape_thin_and_small():
    m = np.zeros((40, 40), np.uint8)
    m[5:25, 5:25] = 3      # a proper lake
    m[30, 2:38] = 3        # a one-pixel-wide line (shadow edge)
    m[35:37, 35:37] = 3    # a 4 px speck
    out = postprocess.lake_shape(m, 3, min_area=8, min_width=3)
    assert (out[5:25, 5:25] == 3).all() and (out[30] != 3).all() and (out[35:37, 35:37] != 3).all()
    ref = m.copy()
    dist = ndi.distance_transform_edt(np.pad(m == 3, 1))[1:-1, 1:-1]
    lab, n = ndi.label(m == 3, structure=np.ones((3, 3)))
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() < 8 or 2 * dist[comp].max() < 3:
            ref[comp] = 0
    assert np.array_equal(out, ref)


def test_rules_validation_and_disable():
    with pytest.raises(ValueError, match="rule"):
        postprocess.validate_rules([{"rule": "erode"}])
    m = _random_mask(1)
    assert np.array_equal(postprocess.apply(m, [{"rule": "min_area", "class": 3, "min_area": 50, "enabled": False}]), m)


def test_masked_pixels_become_background():
    img = np.random.default_rng(7).normal(size=(5, 20, 20)).astype(np.float32)
    img[:, :, :4] = 0.0  # masked strip: zero in every band
    pr = _predictor(bias=[0.0, 50.0, 0.0, 0.0])  # would say glacier everywhere
    ids = pr.predict_ids(img)
    assert (ids[:, :4] == 0).all() and (ids[:, 4:] == 1).all()
    off = _predictor(bias=[0.0, 50.0, 0.0, 0.0], masked_background=False).predict_ids(img)
    assert (off == 1).all()
    img[0, 0, 0] = 0.5  # one band non-zero: not masked
    assert pr.predict_ids(img)[0, 0] == 1
