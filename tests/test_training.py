"""Training backend: configs, losses, sampler, augmentation, checkpoints, resume, DDP."""
import os

import numpy as np
import pytest
import torch
import yaml

from training.config import ConfigError, load_config
from training.losses import (boundary_loss, class_weights_from_shares, dice_loss, focal_loss,
                             signed_distance_maps, soft_mcc_loss)
from training.data.sampling import PixelBalancedSampler, achieved_rates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")


# ---- configs --------------------------------------------------------------------------------
def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_shipped_configs_load():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.endswith(".yaml"):
            load_config(os.path.join(ROOT, "configs", name))


@pytest.mark.parametrize("data,needle", [
    ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"train": {"patch_size": 100}}, "multiple of 32"),
    ({"loss": {"focal": 0, "dice": 0, "mcc": 0, "boundary": 0}}, "at least one loss"),
    ({"data": {"bands": ["B2", "B3", "B4", "B6", "B99"]}}, "B99"),
    ({"model": {"decoder_attention_type": "cbam"}}, "decoder_attention_type"),
    ({"sampler": {"targets": {"glacier": -1}}}, "targets"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_bad_configs_name_key_and_file(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value) and path in str(exc.value)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))


def test_overrides():
    cfg = load_config(QUICK, {"train.epochs": 2, "loss.boundary": 0.0})
    assert cfg.train.epochs == 2 and cfg.loss.boundary == 0.0


# ---- losses ---------------------------------------------------------------------------------
def test_perfect_prediction_losses_near_zero():
    t = torch.tensor([[[0, 1], [2, 3]]])
    logits = torch.nn.functional.one_hot(t, 4).permute(0, 3, 1, 2).float() * 50
    assert focal_loss(logits, t) < 1e-6
    assert dice_loss(logits, t) < 1e-3
    assert soft_mcc_loss(logits, t) < 1e-3


def test_soft_mcc_equals_hard_mcc_for_onehot():
    from training.metrics import mcc

    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (1, 16, 16))
    p = np.where(rng.random(t.shape) < 0.3, rng.integers(0, 4, t.shape), t)
    logits = torch.nn.functional.one_hot(torch.from_numpy(p), 4).permute(0, 3, 1, 2).float() * 60
    assert abs((1 - soft_mcc_loss(logits, torch.from_numpy(t))).item() - mcc(t, p, 4)) < 1e-3


def test_focal_known_value():
    logits = torch.zeros(1, 4, 1, 1)
    t = torch.zeros(1, 1, 1, dtype=torch.long)
    # p = 0.25 -> -(0.75^2) * log(0.25)
    assert abs(focal_loss(logits, t, gamma=2).item() - (0.75 ** 2) * np.log(4)) < 1e-5
    assert abs(focal_loss(logits, t, gamma=0).item() - np.log(4)) < 1e-5


@pytest.mark.parametrize("fn", ["focal", "dice", "mcc", "boundary"])
def test_absent_class_finite_loss_and_gradients(fn):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    t = torch.zeros(2, 16, 16, dtype=torch.long)  # background only: no lake, debris, glacier
    if fn == "focal":
        loss = focal_loss(logits, t, weight=class_weights_from_shares([0.7, 0.25, 0.05, 0.0]))
    elif fn == "dice":
        loss = dice_loss(logits, t)
    elif fn == "mcc":
        loss = soft_mcc_loss(logits, t)
    else:
        d = torch.from_numpy(np.stack([signed_distance_maps(x, 4) for x in t.numpy()]))
        loss = boundary_loss(logits, d)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_signed_distance_signs():
    t = np.zeros((20, 20), np.uint8)
    t[5:15, 5:15] = 1
    d = signed_distance_maps(t, 4)
    assert d[1, 10, 10] < 0 < d[1, 0, 0]
    assert (d[3] == 1).all()  # absent class: positive everywhere


def test_class_weights_favour_rare():
    w = class_weights_from_shares([0.7, 0.25, 0.05, 0.0005])
    assert w[3] > w[2] > w[1] > w[0]
    assert abs(w.mean().item() - 1) < 1e-5


# ---- sampler and augmentation ---------------------------------------------------------------
def _labels():
    labs = {}
    for i in range(4):
        lab = np.zeros((96, 96), np.uint8)
        lab[:, 40:] = 1
        lab[70:90, 50:80] = 2
        if i % 2:
            lab[10:14, 10:14] = 3
        labs[f"00_0{i}"] = lab
    return labs


def test_sampler_hits_targets_and_boosts_rare_pixels():
    labs = _labels()
    targets = {"background": 0.1, "glacier": 0.35, "debris": 0.4, "lake": 0.15}
    s = PixelBalancedSampler(labs, ["background", "glacier", "debris", "lake"], targets, patch=32, seed=0)
    patches = s.sample(4000, seed=0, epoch=0)
    rates = achieved_rates([p[3] for p in patches], 4)
    assert np.allclose(rates, [0.1, 0.35, 0.4, 0.15], atol=0.03)
    lake_px = np.mean([(labs[k][y:y + 32, x:x + 32] == 3).mean() for k, y, x, _ in patches])
    overall = np.mean([(l == 3).mean() for l in labs.values()])
    assert lake_px > 2 * overall  # 15 % of patches hold a 16 px lake: ~2.9x the base rate
    for k, y, x, c in patches[:200]:
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


def test_augmentation_keeps_image_and_mask_aligned():
    from training.data.augment import build_augment
    from training.config import AugmentConfig

    aug = build_augment(AugmentConfig(band_p=0, noise_p=0, affine_p=1.0, scale=0.1, rotate=20))
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, (64, 64)).astype(np.uint8)
    mask = np.kron(mask[:8, :8], np.ones((8, 8), np.uint8))  # blocky: nearest == linear inside blocks
    img = np.repeat(mask[..., None].astype(np.float32), 5, axis=2)
    for s in range(10):
        aug.set_random_seed(s)
        out = aug(image=img, mask=mask)
        agree = (np.round(out["image"][..., 0]) == out["mask"]).mean()
        assert agree > 0.93, agree
    aug_d4 = build_augment(AugmentConfig(band_p=0, noise_p=0, affine_p=0))
    for s in range(10):
        aug_d4.set_random_seed(s)
        out = aug_d4(image=img, mask=mask)
        assert np.array_equal(out["image"][..., 0].astype(np.uint8), out["mask"])


def test_patch_dataset_deterministic_per_index():
    from training.data.augment import build_augment
    from training.config import AugmentConfig
    from training.data.patches import PatchDataset

    labs = _labels()
    imgs = {k: np.random.default_rng(1).normal(size=(5, 96, 96)).astype(np.float32) for k in labs}
    patches = [("00_00", 0, 0, 0), ("00_01", 10, 20, 1)]
    ds = PatchDataset(imgs, labs, patches, 32, 4, build_augment(AugmentConfig()), boundary=True, seed=1, epoch=2)
    a, b = ds[1], ds[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (5, 32, 32) and a[1].shape == (32, 32) and a[2].shape == (4, 32, 32)
