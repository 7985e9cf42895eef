"""Band normalisation with the training statistics: invalid values filled, outliers clipped."""
import numpy as np
import pytest

from glacier_runtime.normalize import normalize


def test_normalize_fills_invalid_with_zero_and_clips():
    st = {"mean": [1.0], "std": [2.0], "lo": [0.0], "hi": [5.0]}
    x = np.array([[[1.0, np.nan, np.inf, 100.0]]], np.float32)
    y = normalize(x, st)
    assert y.tolist() == [[[0.0, 0.0, 0.0, 2.0]]]


def test_normalize_rejects_wrong_band_count():
    with pytest.raises(ValueError, match="3 values for 2 bands"):
        normalize(np.zeros((2, 4, 4), np.float32), {"mean": [0] * 3, "std": [1] * 3, "lo": [0] * 3, "hi": [1] * 3})
