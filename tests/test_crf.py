"""Convolutional CRF: equal to a naive per-pixel mean-field loop, and it does what a CRF should."""
import math

import numpy as np
import pytest

from glacier_runtime.crf import crf_refine, validate_crf


def naive_crf(probs, feats, window, iters, theta_pos, theta_app, w_app, theta_smooth, w_smooth):
    k, h, w = probs.shape
    r = window // 2
    unary = np.log(np.maximum(probs, 1e-8))
    f = np.nan_to_num(feats) / theta_app

    def softmax(z):
        e = np.exp(z - z.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    q = softmax(unary)
    for _ in range(iters):
        msg = np.zeros_like(q)
        for y in range(h):
            for x in range(w):
                for yy in range(max(0, y - r), min(h, y + r + 1)):
                    for xx in range(max(0, x - r), min(w, x + r + 1)):
                        if (yy, xx) == (y, x):
                            continue
                        d2 = (yy - y) ** 2 + (xx - x) ** 2
                        a = math.exp(-((f[:, y, x] - f[:, yy, xx]) ** 2).sum() / 2 - d2 / (2 * theta_pos ** 2))
                        s = math.exp(-d2 / (2 * theta_smooth ** 2))
                        msg[:, y, x] += (w_app * a + w_smooth * s) * q[:, yy, xx]
        q = softmax(unary + msg)
    return q


def test_matches_naive_loop_on_odd_size():
    rng = np.random.default_rng(0)
    p = rng.random((4, 7, 9)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    feats = rng.normal(size=(5, 7, 9)).astype(np.float32)
    cfg = dict(iterations=3, window=5, theta_pos=2.0, theta_app=0.8, w_app=1.0, theta_smooth=1.2, w_smooth=0.7)
    got = crf_refine(p, feats, cfg)
    ref = naive_crf(p.astype(np.float64), feats.astype(np.float64), cfg["window"], cfg["iterations"], cfg["theta_pos"],
                    cfg["theta_app"], cfg["w_app"], cfg["theta_smooth"], cfg["w_smooth"])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


def test_removes_speck_but_keeps_edge_that_the_bands_show():
    h, w = 24, 24
    truth = np.zeros((h, w), int)
    truth[:, 12:] = 1
    feats = np.zeros((5, h, w), np.float32)
    feats[:, :, 12:] = 3.0                       # the bands change where the class changes
    ids = truth.copy()
    ids[5, 5] = 1                                # a speck the bands do not support
    ids[:, 11] = 1                               # edge one pixel off, against the bands
    p = np.full((2, h, w), 0.3, np.float32)
    p[ids, np.arange(h)[:, None], np.arange(w)[None]] = 0.7
    out = crf_refine(p, feats, {"iterations": 5}).argmax(0)
    assert out[5, 5] == 0
    assert (out[:, 11] == 0).mean() > 0.8        # pulled back to the side its bands belong to
    assert (out[:, 12:] == 1).all() and (out[:, :11] == 0).all()


def test_nan_features_and_bad_config():
    p = np.full((3, 5, 5), 1 / 3, np.float32)
    f = np.full((5, 5, 5), np.nan, np.float32)
    assert np.isfinite(crf_refine(p, f)).all()
    with pytest.raises(ValueError, match="odd"):
        validate_crf({"window": 4})
    with pytest.raises(ValueError, match="unknown keys"):
        validate_crf({"iters": 4})
    assert validate_crf({"enabled": False}) is None
    with pytest.raises(ValueError, match="do not match"):
        crf_refine(p, np.zeros((5, 4, 5), np.float32))


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
