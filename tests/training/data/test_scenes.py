"""Whole scenes: deterministic per seed, Landsat DNs, and an effect switched off changes the
bands (not the labels) when it is radiometric."""
import numpy as np

from training.data.scenes import ALL_ON, REGIONS, generate_scene


def test_scene_is_deterministic_and_dn_scaled():
    a = generate_scene(2, 2, (96, 96), 5, REGIONS["khumbu"])
    b = generate_scene(2, 2, (96, 96), 5, REGIONS["khumbu"])
    c = generate_scene(2, 2, (96, 96), 6, REGIONS["khumbu"])
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])
    bands, labels = a
    assert bands.shape == (5, 192, 192) and bands.dtype == np.float32 and labels.dtype == np.uint8
    valid = bands[:4][:, (bands != 0).any(0)]
    assert 4000 < np.median(valid) < 40000 and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_a_radiometric_effect_changes_bands_not_labels():
    on = generate_scene(2, 2, (96, 96), 1, REGIONS["khumbu"])
    off = generate_scene(2, 2, (96, 96), 1, REGIONS["khumbu"], effects=ALL_ON.off("clouds").off("calibration"))
    assert np.array_equal(on[1], off[1]) and not np.array_equal(on[0], off[0])
    raw = generate_scene(2, 2, (96, 96), 1, REGIONS["khumbu"], effects=ALL_ON.off("misregistration"))
    _, _, extra = generate_scene(2, 2, (96, 96), 1, REGIONS["khumbu"], return_extras=True)
    assert np.array_equal(raw[0], on[0]) and set(extra) >= {"elevation", "slope", "nir", "truth"}


def test_inventory_labels_change_labels_not_bands():
    """Labels from the older inventory: the same image; labelled ice is more than the image
    shows, and without the effect the labels are the image's truth (resampled, shifted)."""
    on, on_labels, extra = generate_scene(2, 2, (96, 96), 1, REGIONS["khumbu"], return_extras=True)
    off, off_labels = generate_scene(2, 2, (96, 96), 1, REGIONS["khumbu"], effects=ALL_ON.off("inventory_labels"))
    assert np.array_equal(on, off) and not np.array_equal(on_labels, off_labels)
    valid = on_labels < 255
    assert ((on_labels == 1) | (on_labels == 2))[valid].mean() > ((off_labels == 1) | (off_labels == 2))[valid].mean()
    truth = extra["truth"]
    agree_on, agree_off = (on_labels == truth)[valid].mean(), (off_labels == truth)[valid].mean()
    assert agree_off > agree_on
