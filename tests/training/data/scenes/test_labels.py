"""Labels as real labels are made: small patches omitted (against scipy's labelling),
resampling, misregistration."""
import numpy as np
from scipy import ndimage

from training.data.scenes.labels import misregister, omit_small, resample


def test_small_debris_and_ponds_are_omitted():
    lab = np.ones((60, 60), np.uint8)               # glacier
    lab[5:25, 5:25] = 2                              # a big debris patch (400 px): kept
    lab[40:44, 40:44] = 2                            # a small one (16 px): drawn as glacier
    lab[10:12, 40:42] = 3                            # a 4 px pond on glacier
    lab[15:17, 15:17] = 3                            # a 4 px pond on the big debris patch
    out = omit_small(lab, 1.0)
    sizes = ndimage.sum(out == 2, ndimage.label(out == 2)[0], index=range(1, 10))
    assert (out[40:44, 40:44] == 1).all() and (out[10:12, 40:42] == 1).all() and (out[15:17, 15:17] == 2).all()
    assert [int(s) for s in sizes if s] == [400]


def test_resample_and_misregister():
    rng = np.random.default_rng(0)
    lab = (rng.random((64, 64)) > 0.5).astype(np.uint8)
    assert np.array_equal(resample(lab, 1), lab)
    coarse = resample(np.kron(np.eye(4, dtype=np.uint8), np.ones((16, 16), np.uint8)), 2)
    assert coarse.shape == (64, 64) and (coarse[:16, :16] == 1).mean() > 0.9
    shifted = misregister(lab, np.random.default_rng(3), 2.0)
    ok = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
          if np.array_equal(shifted, np.roll(np.roll(lab, dy, 0), dx, 1))]
    assert ok  # a shift of at most 2 px each way
