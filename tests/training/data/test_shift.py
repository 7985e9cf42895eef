"""The regional-shift augmentation and lake copy-paste: each band's function against the formula
computed by hand, masked pixels kept, the per-tile numbers after a shift against the runtime's own
per-tile statistics of the shifted tile, the patch path without a shift equal to the pre-normalised
path, and pasted lakes placed on ice with only the pasted pixels changed."""
from __future__ import annotations

import numpy as np
import pytest

from glacier_runtime.normalize import normalize, tile_stats
from training.config import AugmentConfig
from training.data.patches import PatchDataset
from training.data.shift import LakeBank, RadiometricShift

BANDS = ["B2", "B3", "B4", "B6", "B10"]
STATS = {"mean": [9000.0, 9000.0, 9000.0, 8000.0, 30000.0], "std": [2000.0] * 5,
         "lo": [5000.0, 5000.0, 5000.0, 4000.0, 20000.0], "hi": [25000.0, 25000.0, 25000.0, 20000.0, 40000.0]}


def _tile(seed=0, h=24, w=20):
    rng = np.random.default_rng(seed)
    lo, hi = np.array(STATS["lo"])[:, None, None], np.array(STATS["hi"])[:, None, None]
    x = (lo + (hi - lo) * rng.uniform(-0.1, 1.1, (5, h, w))).astype(np.float32)
    x[:, :2, :3] = 0.0  # masked
    return x


def _shift(**kw):
    aug = AugmentConfig(shift_p=1.0, **kw)
    return RadiometricShift.from_config(aug, STATS, "L8", BANDS)


def test_each_bands_function_is_the_formula_by_hand():
    sh = _shift()
    prm = sh.sample(np.random.default_rng(1))
    x = _tile()
    y = sh.apply(x, prm)
    # haze ~ lambda^-2 relative to blue (0.48 um), none on thermal; thermal offset on B10 only
    centres = np.array([0.48, 0.56, 0.655, 1.61])
    np.testing.assert_allclose(sh.haze_weight[:4], (centres / 0.48) ** -2, rtol=1e-6)
    assert sh.haze_weight[4] == 0 and prm["thermal"][:4].tolist() == [0.0] * 4 and prm["thermal"][4] != 0
    for b in range(5):
        lo, hi = STATS["lo"][b], STATS["hi"][b]
        u = (x[b].astype(np.float64) - lo) / (hi - lo)
        g = np.where((u >= 0) & (u <= 1), np.clip(u, 0, 1) ** prm["gamma"][b], u)
        g = np.where(u > 1, 1 + (u - 1), g)
        want = (lo + (hi - lo) * g) * prm["gain"][b] + prm["offset"][b] + prm["haze"][b] + prm["thermal"][b]
        want[:2, :3] = 0.0
        np.testing.assert_allclose(y[b], want, rtol=1e-5, atol=1e-2)
    assert np.all(y[:, :2, :3] == 0)
    assert 1 / 1.2 - 1e-9 <= prm["gamma"].min() and prm["gamma"].max() <= 1.2 + 1e-9
    assert np.all(np.abs(prm["gain"] - 1) <= 0.15)


def test_probability_zero_never_shifts():
    sh = RadiometricShift.from_config(AugmentConfig(shift_p=0.0), STATS, "L8", BANDS)
    rng = np.random.default_rng(0)
    assert all(sh.sample(rng) is None for _ in range(50))


@pytest.mark.parametrize("mode", ["tile_percentile", "tile_standard"])
def test_per_tile_numbers_after_a_gain_and_offset_equal_the_shifted_tiles_own(mode):
    sh = _shift(shift_gamma=0.0, shift_haze=0.0)  # affine per band: exact
    prm = sh.sample(np.random.default_rng(2))
    st = {**STATS, "mode": mode, "tile_percentiles": [2, 98]}
    x = _tile(3)
    moved = sh.stats_after(tile_stats(x, st), prm, mode)
    own = tile_stats(sh.apply(x, prm), st)  # the runtime's numbers on the shifted tile
    for k in ("lo", "hi", "mean", "std"):
        np.testing.assert_allclose(moved[k], own[k], rtol=1e-4)


def test_with_gamma_the_moved_percentiles_stay_close():
    sh = _shift()
    prm = sh.sample(np.random.default_rng(4))
    st = {**STATS, "mode": "tile_percentile", "tile_percentiles": [2, 98]}
    x = _tile(5, 64, 64)
    a = normalize(sh.apply(x, prm), sh.stats_after(tile_stats(x, st), prm, "tile_percentile"))
    b = normalize(sh.apply(x, prm), st)
    assert np.abs(a - b).max() < 0.05  # order statistics move with an increasing function


def test_patch_path_without_shift_equals_the_pre_normalised_path():
    x = _tile(6, 48, 48)
    lab = np.random.default_rng(0).integers(0, 4, (48, 48)).astype(np.uint8)
    patches = [("t", 4, 8, 1), ("t", 10, 2, 2)]
    pre = PatchDataset({"t": normalize(x, STATS)}, {"t": lab}, patches, 32, 4)
    none = RadiometricShift.from_config(AugmentConfig(shift_p=0.0), STATS, "L8", BANDS)
    raw = PatchDataset({"t": x}, {"t": lab}, patches, 32, 4, shift=none, norms={"t": tile_stats(x, STATS)})
    for i in range(2):
        assert np.allclose(pre[i][0].numpy(), raw[i][0].numpy(), atol=1e-6)
        assert np.array_equal(pre[i][1].numpy(), raw[i][1].numpy())
    shifted = PatchDataset({"t": x}, {"t": lab}, patches, 32, 4, shift=_shift(), norms={"t": tile_stats(x, STATS)})
    assert not np.allclose(pre[0][0].numpy(), shifted[0][0].numpy(), atol=1e-3)
    assert np.array_equal(shifted[0][0].numpy(), shifted[0][0].numpy())  # seeded: the same patch twice


def test_lake_paste_puts_a_lake_with_its_margin_on_ice_and_changes_nothing_else():
    src_lab = np.zeros((40, 40), np.uint8)
    src_lab[10:14, 20:25] = 3                       # one lake
    src_img = np.random.default_rng(1).normal(size=(5, 40, 40)).astype(np.float32)
    bank = LakeBank.from_tiles({"a": src_img}, {"a": src_lab}, lake=3, ice=(1, 2), margin=2)
    assert len(bank) == 1
    img, lab, mask = bank.items[0]
    assert lab.shape == (8, 9) and mask.sum() > (lab == 3).sum()  # the margin came along
    y = np.zeros((32, 32), np.uint8)
    y[16:, :] = 1                                   # ice in the lower half
    x = np.full((5, 32, 32), 7.0, np.float32)
    nx, ny = bank.paste(x, y, np.random.default_rng(0))
    changed = np.any(nx != x, axis=0) | (ny != y)
    assert (ny == 3).sum() == 20 and changed.sum() <= mask.sum()
    cy, cx = np.argwhere(ny == 3).mean(0)
    assert 15 <= cy <= 31  # centred on an ice pixel: in the lower half
    assert np.all(x == 7.0) and np.all(y[:16] == 0)  # inputs untouched
    no_ice = np.zeros((32, 32), np.uint8)
    px, py = bank.paste(x, no_ice, np.random.default_rng(0))
    assert px is x and py is no_ice
