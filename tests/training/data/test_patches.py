"""Training patches: the same index gives the same augmented patch."""
import numpy as np
import torch

from tests.helpers import toy_labels


def test_patch_dataset_deterministic_per_index():
    from training.data.augment import build_augment
    from training.config import AugmentConfig
    from training.data.patches import PatchDataset

    labs = toy_labels()
    imgs = {k: np.random.default_rng(1).normal(size=(5, 96, 96)).astype(np.float32) for k in labs}
    patches = [("00_00", 0, 0, 0), ("00_01", 10, 20, 1)]
    ds = PatchDataset(imgs, labs, patches, 32, 4, build_augment(AugmentConfig()), boundary=True, seed=1, epoch=2)
    a, b = ds[1], ds[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (5, 32, 32) and a[1].shape == (32, 32) and a[2].shape == (4, 32, 32)
