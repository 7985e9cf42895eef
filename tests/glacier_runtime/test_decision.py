"""The decision rule: class = argmax over classes of log(max(p, 1e-8)) + bias, pixel by pixel,
against a naive per-pixel Python loop."""
import math

import numpy as np
import pytest

from glacier_runtime.decision import EPS, biased_argmax, decide, log_probs


def naive_decide(probs, bias):
    """One pixel at a time: the first class with the highest log(max(p, 1e-8)) + bias."""
    k, h, w = probs.shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            scores = [math.log(max(float(probs[c, y, x]), 1e-8)) + (bias[c] if bias else 0.0) for c in range(k)]
            out[y, x] = scores.index(max(scores))
    return out


@pytest.mark.parametrize("bias", [None, [0.0, 0.5, -0.25, 1.0], [0.0, 0.0, 0.0, 30.0]])
def test_decide_equals_a_per_pixel_loop(bias):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(13, 17)).transpose(2, 0, 1)  # (K, H, W), float64
    probs[2, :3] = 0.0     # a class with probability 0 on some pixels: the floor orders it
    probs[3, 5:7, :] = 0.0
    got = decide(probs, bias)
    assert got.dtype == np.uint8 and got.shape == (13, 17)
    assert np.array_equal(got, naive_decide(probs, bias))


def test_zero_probability_is_floored_so_a_bias_can_still_lift_it():
    assert EPS == 1e-8
    probs = np.array([[[1.0]], [[0.0]]])  # class 1 has p = 0
    # log(1) + 0 = 0 against log(1e-8) + 19 = 0.58...: class 1 wins only because of the floor
    assert math.log(1e-8) + 19 > 0
    assert decide(probs, [0.0, 19.0])[0, 0] == 1
    assert decide(probs, [0.0, 18.0])[0, 0] == 0  # log(1e-8) + 18 = -0.42 < 0
    assert decide(probs)[0, 0] == 0


def test_log_probs_keeps_the_precision_and_floors():
    p = np.array([0.5, 0.0, 1e-12], np.float32)
    lp = log_probs(p)
    assert lp.dtype == np.float32
    np.testing.assert_allclose(lp, [math.log(0.5), math.log(1e-8), math.log(1e-8)], rtol=1e-6)


def test_biased_argmax_on_a_trailing_class_axis():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(6, 5, 3)).astype(np.float32)  # (H, W, K)
    bias = [0.25, -0.5, 0.75]
    got = biased_argmax(scores, bias, axis=-1)
    want = np.zeros((6, 5), np.uint8)
    for y in range(6):
        for x in range(5):
            s = [float(scores[y, x, c]) + bias[c] for c in range(3)]
            want[y, x] = s.index(max(s))
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert np.array_equal(biased_argmax(scores, None, axis=2), scores.argmax(2))
