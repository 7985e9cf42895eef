"""The class bias fit: bounded, zero on noise, pushing an under-predicted class up; --bias auto
tunes with the same regularised rule."""
import numpy as np

from glacier_submit.tuning.bias import BIAS_GRID, fit_bias

from tests.helpers import probs_from_ids

K = 4


def test_fit_bias_is_bounded_and_stays_zero_on_noise():
    rng = np.random.default_rng(2)
    y = rng.integers(0, K, 20000)
    logp = np.log(np.full((20000, K), 0.25, np.float32) + rng.random((20000, K)).astype(np.float32) * 1e-3)
    b = fit_bias(logp, y)
    assert all(min(BIAS_GRID) <= v <= max(BIAS_GRID) for v in b)
    # an under-predicted class is pushed up, never past the grid's end
    ids = rng.choice(K, (64, 64), p=[0.55, 0.25, 0.15, 0.05])
    p = probs_from_ids(ids, rng=rng, under=3)
    lp = np.log(p.reshape(K, -1).T)
    b = fit_bias(lp, ids.reshape(-1))
    assert b[0] == 0 and 0 < b[3] <= max(BIAS_GRID)


def test_bias_tuned_from_oof(tmp_path):
    from glacier_submit.tuning.bias import tune_bias

    rng = np.random.default_rng(0)
    labels = [rng.choice(4, (40, 40), p=[0.8, 0.15, 0.04, 0.01]) for _ in range(4)]
    probs = []
    for lab in labels:  # a model that under-predicts the rare classes
        p = np.full((4, 40, 40), 0.05, np.float32)
        p[0] += 0.5
        for c in (1, 2, 3):
            p[c][lab == c] += 0.42
        probs.append(p / p.sum(0))
    bias, before, after = tune_bias(probs, labels)
    assert after > before + 0.1 and bias[0] == 0 and bias[3] > 0


def test_default_bias_auto_is_the_regularised_fit():
    """`build --bias auto` tunes with the same regularised rule as --tune oof: never beyond
    [-1, 2] (the old search went to its grid's edge, -2, on over-predicted classes), and the
    value closest to zero that keeps most of the gain."""
    from glacier_submit.tuning.bias import tune_bias

    rng = np.random.default_rng(3)
    labels = [rng.choice(4, (60, 60), p=[0.7, 0.2, 0.08, 0.02]) for _ in range(4)]
    probs = []
    for lab in labels:  # a model that calls lake everywhere: the best bias for it is very negative
        p = np.full((4, 60, 60), 0.1, np.float32)
        for c in range(3):
            p[c][lab == c] += 0.5
        p[3] += 0.55
        probs.append(p / p.sum(0))
    bias, before, after = tune_bias(probs, labels)
    assert all(-1.0 <= b <= 2.0 for b in bias), bias
    assert bias[3] < 0 and after > before + 0.1
