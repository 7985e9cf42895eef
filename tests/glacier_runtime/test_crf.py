"""Convolutional CRF: equal to a naive per-pixel mean-field loop, and it does what a CRF should."""
import numpy as np
import pytest

from glacier_runtime.crf import crf_refine, validate_crf

from tests.helpers import naive_crf


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
