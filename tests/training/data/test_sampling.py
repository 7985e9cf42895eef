"""The pixel-balanced patch sampler: target class rates met, rare pixels boosted, absent classes
renormalised."""
import numpy as np
import pytest

from training.data.sampling import PixelBalancedSampler, achieved_rates

from tests.helpers import toy_labels


def test_sampler_hits_targets_and_boosts_rare_pixels():
    labs = toy_labels()
    targets = {"background": 0.1, "glacier": 0.35, "debris": 0.4, "lake": 0.15}
    s = PixelBalancedSampler(labs, ["background", "glacier", "debris", "lake"], targets, patch=32, seed=0)
    patches = s.sample(4000, seed=0, epoch=0)
    rates = achieved_rates([p[3] for p in patches], 4)
    assert np.allclose(rates, [0.1, 0.35, 0.4, 0.15], atol=0.03)
    lake_px = np.mean([(labs[k][y:y + 32, x:x + 32] == 3).mean() for k, y, x, _ in patches])
    overall = np.mean([(lab == 3).mean() for lab in labs.values()])
    assert lake_px > 2 * overall  # 15 % of patches hold a 16 px lake: ~2.9x the base rate
    for _, y, x, _ in patches[:200]:
        assert 0 <= y <= 96 - 32 and 0 <= x <= 96 - 32
    assert s.sample(10, 0, 3) == s.sample(10, 0, 3) and s.sample(10, 0, 3) != s.sample(10, 0, 4)


def test_sampler_absent_class_renormalised():
    labs = {"a": np.zeros((40, 40), np.uint8)}
    labs["a"][:, 20:] = 1
    s = PixelBalancedSampler(labs, ["background", "glacier", "debris", "lake"],
                             {"background": 0.1, "glacier": 0.35, "debris": 0.4, "lake": 0.15}, patch=32)
    assert s.absent == ["debris", "lake"] and abs(s.probs.sum() - 1) < 1e-9 and s.probs[2] == 0
    with pytest.raises(ValueError, match="unknown classes"):
        PixelBalancedSampler(labs, ["background", "glacier"], {"ice": 1.0}, patch=32)


def test_sampler_tile_smaller_than_patch():
    labs = {"a": np.ones((20, 25), np.uint8)}
    s = PixelBalancedSampler(labs, ["background", "glacier"], {"glacier": 1.0}, patch=64)
    assert all(p[1] == 0 and p[2] == 0 for p in s.sample(20, 0, 0))
