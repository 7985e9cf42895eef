"""The bootstrap gain of a candidate over the current setting: zero when equal, a positive lower
bound for a clear improvement, pooled MCC equal to sklearn's on all pixels."""
import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from glacier_submit.tuning.stats import bootstrap_gain
from training.metrics import tile_confusions

K = 4


def _noisy(labels, acc, rng):
    return [np.where(rng.random(y.shape) < acc, y, rng.integers(0, K, y.shape)) for y in labels]


def test_bootstrap_gain_no_difference_and_clear_difference():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, K, (16, 16)) for _ in range(12)]
    weak = _noisy(labels, 0.6, rng)
    a = tile_confusions(weak, labels, K)
    g = bootstrap_gain(a, a, n_boot=300)
    assert g.gain == 0 and g.lo <= 0 <= g.hi
    b = tile_confusions(_noisy(labels, 0.9, rng), labels, K)
    g = bootstrap_gain(a, b, n_boot=300)
    assert g.lo > 0 and g.gain == pytest.approx(g.cand_mcc - g.base_mcc)
    # the pooled score is the MCC of all pixels together (sklearn on the concatenation)
    flat = lambda xs: np.concatenate([x.ravel() for x in xs])  # noqa: E731
    assert g.base_mcc == pytest.approx(matthews_corrcoef(flat(labels), flat(weak)), abs=1e-12)


def test_confusions_of_other_shapes_are_refused():
    a = np.zeros((3, K, K))
    with pytest.raises(ValueError, match="differ in shape"):
        bootstrap_gain(a, np.zeros((2, K, K)))
