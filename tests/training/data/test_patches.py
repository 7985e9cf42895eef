"""Training patches: the same index gives the same augmented patch."""
import numpy as np
import torch

from tests.helpers import QUICK, toy_labels
from training.config import load_config


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


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_augmentation_differs_between_ranks():
    """Under DDP rank r's i-th patch must not get rank 0's i-th augmentation; rank 0 keeps the
    one-process augmentation."""
    from training.data.augment import build_augment
    from training.data.patches import PatchDataset

    cfg = load_config(QUICK).augment
    img = {"t": np.random.default_rng(0).standard_normal((5, 64, 64)).astype(np.float32)}
    lab = {"t": np.zeros((64, 64), np.uint8)}
    patches = [("t", 0, 0, 0)]

    def item(rank):
        return PatchDataset(img, lab, patches, 64, 4, build_augment(cfg), seed=3, epoch=1, rank=rank)[0][0]

    assert not torch.equal(item(0), item(1))
    aug = build_augment(cfg)
    aug.set_random_seed(int((3 * 1_000_003 + 1 * 10_007 + 0) % (2**31)))  # the one-process formula
    ref = aug(image=np.ascontiguousarray(img["t"].transpose(1, 2, 0)), mask=lab["t"])["image"]
    assert torch.equal(item(0), torch.from_numpy(np.ascontiguousarray(ref.transpose(2, 0, 1))))
