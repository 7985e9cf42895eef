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


# ---- per-tile modes: numbers from each tile itself, checked against numpy by hand --------------------

def _fold_stats(c=3):
    return {"mean": [10.0] * c, "std": [5.0] * c, "lo": [-1e9] * c, "hi": [1e9] * c}


def _tile(seed=0, c=3, h=20, w=24):
    rng = np.random.default_rng(seed)
    x = (rng.gamma(2.0, 50.0, (c, h, w)) + np.arange(c)[:, None, None] * 100).astype(np.float32)
    x[:, :3, :5] = 0.0          # masked corner: zero in every band
    x[1, 10, 10] = np.nan        # one invalid value
    return x


def test_tile_percentile_maps_each_bands_own_percentiles_to_0_1():
    x = _tile()
    st = {**_fold_stats(), "mode": "tile_percentile", "tile_percentiles": [2, 98]}
    y = normalize(x, st)
    valid = ~np.all(x == 0, axis=0)
    for b in range(3):
        v = x[b][valid]
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [2, 98])
        want = (np.clip(x[b], lo, hi) - lo) / (hi - lo)
        want[~np.isfinite(x[b])] = 0.0
        np.testing.assert_allclose(y[b], want, rtol=1e-5, atol=1e-6)
    assert y[1, 10, 10] == 0.0
    assert y.min() >= 0 and y.max() <= 1 + 1e-6


def test_tile_standard_standardises_each_band_with_its_clipped_mean_and_std():
    x = _tile(1)
    st = {**_fold_stats(), "mode": "tile_standard", "tile_percentiles": [1, 99]}
    y = normalize(x, st)
    valid = ~np.all(x == 0, axis=0)
    for b in range(3):
        v = x[b][valid].astype(np.float64)
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [1, 99])
        c = np.clip(v, lo, hi)
        want = (np.clip(x[b], lo, hi) - c.mean()) / c.std()
        want[~np.isfinite(x[b])] = 0.0
        np.testing.assert_allclose(y[b], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["tile_percentile", "tile_standard"])
def test_per_tile_modes_undo_a_regions_gain_and_offset(mode):
    """What the mode is for: a tile seen through another calibration (gain, offset per band)
    normalises to the same numbers; the fold mode does not."""
    x = _tile(2)
    x[:, :3, :5] = 1.0  # no masked pixels: a gain would move them
    gain = np.array([1.3, 0.8, 1.1], np.float32)[:, None, None]
    off = np.array([40.0, -15.0, 7.0], np.float32)[:, None, None]
    st = {**_fold_stats(), "mode": mode}
    a, b = normalize(x, st), normalize(x * gain + off, st)
    finite = np.isfinite(x)
    np.testing.assert_allclose(a[finite], b[finite], atol=1e-4)
    fold = _fold_stats()
    assert not np.allclose(normalize(x, fold)[finite], normalize(x * gain + off, fold)[finite], atol=1e-2)


def test_fully_masked_tile_falls_back_to_the_fold_numbers():
    x = np.zeros((3, 8, 8), np.float32)
    st = {**_fold_stats(), "mode": "tile_percentile"}
    np.testing.assert_allclose(normalize(x, st), normalize(x, _fold_stats()))


def test_members_without_a_mode_and_unknown_modes():
    x = _tile(3)
    np.testing.assert_array_equal(normalize(x, _fold_stats()), normalize(x, {**_fold_stats(), "mode": "fold"}))
    with pytest.raises(ValueError, match="normalisation mode 'per_scene' is unknown"):
        normalize(x, {**_fold_stats(), "mode": "per_scene"})
