"""MCC, confusions and per-class scores against sklearn."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, matthews_corrcoef, precision_score, recall_score

from training.metrics import ConfusionAccumulator, confusion, mcc, mcc_batch, mcc_from_confusion, per_class_scores, tile_confusions


@pytest.mark.parametrize("seed", range(25))
def test_mcc_equals_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    k = int(rng.integers(2, 6))
    p = rng.dirichlet(np.ones(k))
    t = rng.choice(k, n, p=p)
    noise = rng.random(n) < rng.random()
    y = np.where(noise, rng.choice(k, n), t)
    assert abs(mcc(t, y, k) - matthews_corrcoef(t, y)) < 1e-9


@pytest.mark.parametrize("t,p", [
    ([0, 0, 0, 0], [0, 0, 0, 0]),          # one class only
    ([0, 0, 1, 1], [0, 0, 0, 0]),          # constant prediction
    ([1, 1, 1], [0, 2, 1]),                # constant truth
    ([0, 1, 2, 3], [3, 2, 1, 0]),          # all wrong
    ([0, 1, 0, 1], [0, 1, 0, 1]),          # perfect, class 2/3 empty
])
def test_mcc_degenerate_cases(t, p):
    assert abs(mcc(np.array(t), np.array(p), 4) - matthews_corrcoef(t, p)) < 1e-9


def test_streaming_equals_concatenated():
    rng = np.random.default_rng(1)
    acc = ConfusionAccumulator(4)
    ts, ps = [], []
    for _ in range(7):
        shape = tuple(rng.integers(3, 40, 2))
        t = rng.choice(4, shape, p=[0.7, 0.25, 0.049, 0.001])
        p = np.where(rng.random(shape) < 0.2, rng.choice(4, shape), t)
        acc.update(t, p)
        ts.append(t.ravel())
        ps.append(p.ravel())
    assert abs(acc.mcc - matthews_corrcoef(np.concatenate(ts), np.concatenate(ps))) < 1e-9


def test_per_class_matches_sklearn():
    rng = np.random.default_rng(2)
    t = rng.choice(4, 3000)
    p = np.where(rng.random(3000) < 0.3, rng.choice(4, 3000), t)
    rows = per_class_scores(confusion(t, p, 4))
    for k, row in enumerate(rows):
        assert abs(row["mcc"] - matthews_corrcoef(t == k, p == k)) < 1e-9
        assert abs(row["iou"] - jaccard_score(t == k, p == k)) < 1e-9
        assert abs(row["f1"] - f1_score(t == k, p == k)) < 1e-9


def test_large_counts_do_not_overflow():
    cm = np.array([[10**9, 10**6], [10**6, 10**8]], dtype=np.int64)
    assert 0.9 < mcc_from_confusion(cm) <= 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="sizes differ"):
        confusion(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion(np.array([0, 5]), np.array([0, 1]), 4)


def test_per_class_recall_precision_iou_match_sklearn():
    rng = np.random.default_rng(0)
    t = rng.choice(4, 5000, p=[0.6, 0.25, 0.1, 0.05])
    p = np.where(rng.random(5000) < 0.7, t, rng.integers(0, 4, 5000))
    rows = per_class_scores(confusion(t, p, 4))
    np.testing.assert_allclose([r["recall"] for r in rows], recall_score(t, p, average=None), atol=1e-12)
    np.testing.assert_allclose([r["precision"] for r in rows], precision_score(t, p, average=None), atol=1e-12)
    np.testing.assert_allclose([r["iou"] for r in rows], jaccard_score(t, p, average=None), atol=1e-12)
    for k, r in enumerate(rows):
        assert r["mcc"] == pytest.approx(matthews_corrcoef(t == k, p == k), abs=1e-12)


K = 4


def test_mcc_batch_matches_sklearn():
    rng = np.random.default_rng(1)
    cms, refs = [], []
    for i in range(6):
        t = rng.integers(0, K, 400)
        p = np.where(rng.random(400) < 0.3 + 0.1 * i, t, rng.integers(0, K, 400))
        if i == 5:
            p[:] = 0  # a constant prediction: MCC defined as 0
        cms.append(tile_confusions([p], [t], K)[0])
        refs.append(matthews_corrcoef(t, p))
    np.testing.assert_allclose(mcc_batch(np.stack(cms)), refs, atol=1e-12)
