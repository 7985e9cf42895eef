"""HKH patches: layout detection, band mapping by role, class mapping, memory-mapped streaming."""
import os

import numpy as np
import pytest

from training.bands import BandMappingError
from training.data.hkh import HKHLayoutError, HKHPatches, competition_to_hkh, find_patches


def test_layout_detection_with_prefix_and_splits(fake_hkh):
    found = find_patches(fake_hkh)
    assert sorted(found) == ["train", "val"] and len(found["train"]) == 6
    assert os.path.basename(found["train"][0].image).startswith("slice_0_img_")


@pytest.mark.parametrize("folder", ["dev", "valid", "validation"])
def test_dev_folder_is_the_validation_split(tmp_path, folder):
    """The glacier_mapping pipeline writes train/ dev/ test/: dev is validation, not 'all'."""
    for split in ("train", folder):
        os.makedirs(tmp_path / split)
        np.save(tmp_path / split / "img_1.npy", np.zeros((8, 8, 15), np.float32))
        np.save(tmp_path / split / "mask_1.npy", np.zeros((8, 8, 2), np.uint8))
    found = find_patches(str(tmp_path))
    assert sorted(found) == ["train", "val"] and found["val"][0].key == os.path.join(folder, "img_1.npy")


def test_flat_layout_and_channel_first(tmp_path):
    img = np.zeros((15, 32, 32), np.float32)
    img[0] = 7.0
    np.save(tmp_path / "img_a.npy", img)
    np.save(tmp_path / "mask_a.npy", np.zeros((2, 32, 32), np.uint8))
    found = find_patches(str(tmp_path))
    p = HKHPatches(found["all"], ["B1", "B2", "B3", "B5", "B6_high"])
    assert p.image(0).shape == (5, 32, 32) and p.image(0)[0].mean() == 7.0


@pytest.mark.parametrize("setup,needle", [
    ("empty", "not an HKH patch folder"),
    ("no_masks", "not an HKH patch folder"),
    ("bad_channels", "15 image channels"),
    ("bad_mask", "masks need"),
])
def test_bad_folders(tmp_path, setup, needle):
    if setup == "no_masks":
        np.save(tmp_path / "img_1.npy", np.zeros((8, 8, 15), np.float32))
    if setup == "bad_channels":
        np.save(tmp_path / "img_1.npy", np.zeros((8, 8, 7), np.float32))
        np.save(tmp_path / "mask_1.npy", np.zeros((8, 8, 2), np.uint8))
    if setup == "bad_mask":
        np.save(tmp_path / "img_1.npy", np.zeros((8, 8, 15), np.float32))
        np.save(tmp_path / "mask_1.npy", np.zeros((8, 8), np.uint8))
    with pytest.raises(HKHLayoutError, match=needle):
        found = find_patches(str(tmp_path))
        HKHPatches(found["all"], ["B1"])


def test_band_mapping_by_role_and_swir_thermal_error():
    assert competition_to_hkh() == ["B1", "B2", "B3", "B5", "B6_high"]
    with pytest.raises(BandMappingError, match="L8:B6 \\(swir1\\) -> L7:B6_low \\(tir\\)"):
        competition_to_hkh(hkh_bands=["B1", "B2", "B3", "B6_low", "B6_high"])


def test_class_mapping(tmp_path):
    mask = np.zeros((4, 4, 2), np.uint8)
    mask[0, :, 0] = 1   # clean ice
    mask[1, :, 1] = 1   # debris
    np.save(tmp_path / "img_0.npy", np.zeros((4, 4, 15), np.float32))
    np.save(tmp_path / "mask_0.npy", mask)
    p = HKHPatches(find_patches(str(tmp_path))["all"], ["B1"])
    lab = p.label(0)
    assert lab[0].tolist() == [1] * 4 and lab[1].tolist() == [2] * 4 and lab[2:].max() == 0
    assert 3 not in lab  # no lake in HKH


def test_memory_mapped_reads_only_selected(fake_hkh, monkeypatch):
    """Every file is opened as a memory map and only the selected channels are indexed out
    of it: materialising a whole array fails the test."""
    orig = np.load
    keys = []

    class Guard:
        def __init__(self, arr):
            self._arr = arr
            self.shape, self.ndim = arr.shape, arr.ndim

        def __getitem__(self, key):
            keys.append(key)
            return self._arr[key]

        def __array__(self, *a, **kw):
            raise AssertionError("a whole HKH array was read into memory")

    def spy(path, *a, **kw):
        assert kw.get("mmap_mode") == "r", f"{path} opened without a memory map"
        return Guard(orig(path, *a, **kw))

    patches = find_patches(fake_hkh)["train"]
    monkeypatch.setattr(np, "load", spy)
    p = HKHPatches(patches, ["B1", "B5"])
    img = p.image(3)
    monkeypatch.setattr(np, "load", orig)
    full = np.load(patches[3].image)  # (H, W, 15): B1 is channel 0, B5 channel 4
    assert img.shape == (2, 64, 64) and np.array_equal(img, full[..., [0, 4]].transpose(2, 0, 1))
    assert [k for k in keys if isinstance(k, tuple)] == [(Ellipsis, [0, 4])]
