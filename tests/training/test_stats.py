"""Band statistics: robust to outliers and NaN, masked (all-zero) pixels ignored."""
import numpy as np
import pytest

from training.stats import compute_stats


def test_stats_robust_to_outliers_and_nan():
    rng = np.random.default_rng(0)
    img = rng.normal(10, 2, (2, 100, 100)).astype(np.float32)
    img[0, 0, :20] = 1e9
    img[1, 1, :50] = np.nan
    st = compute_stats([img], ["a", "b"])
    assert abs(st["mean"][0] - 10) < 0.2 and abs(st["std"][0] - 2) < 0.3
    assert st["hi"][0] < 100


def test_stats_wrong_shape():
    with pytest.raises(ValueError, match="expected"):
        compute_stats([np.zeros((3, 4, 4))], ["a", "b"])


def test_stats_ignore_masked_zero_pixels():
    rng = np.random.default_rng(0)
    img = rng.normal(270, 3, (2, 50, 50)).astype(np.float32)
    img[:, :, :5] = 0.0  # a masked gap: zero in every band
    st = compute_stats([img], ["a", "b"])
    assert abs(st["mean"][1] - 270) < 0.5 and st["std"][1] < 4 and st["lo"][1] > 250
    raw = compute_stats([img], ["a", "b"], ignore_masked=False)
    assert raw["std"][1] > 50
