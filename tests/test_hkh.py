"""HKH pre-training: layout detection, band mapping by role, class mapping, memory-mapped
streaming, pretrain + init-from."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from training.bands import BandMappingError
from training.data.hkh import HKHLayoutError, HKHPatches, competition_to_hkh, find_patches, write_fake_hkh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_hkh(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hkh"))
    write_fake_hkh(d, n_train=6, n_val=2, size=64, seed=1)
    return d


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


@pytest.mark.slow
def test_pretrain_then_init_from_reports(fake_hkh, tmp_path, synth_data):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = str(tmp_path / "hkh.pt")
    tiny = ["--set", "train.epochs=2", "--set", "train.patches_per_epoch=8", "--set", "train.batch_size=4",
            "--set", "train.patch_size=64", "--set", "model.decoder_channels=[16,16,16,8,8]", "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config",
                        os.path.join(ROOT, "configs", "hkh_pretrain_quick.yaml"), "--data", fake_hkh, "--out", out,
                        "--device", "cpu", *tiny], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out, weights_only=False)
    assert ck["bands"] == ["B1", "B2", "B3", "B5", "B6_high"] and ck["sensor"] == "L7"
    assert ck["spec"]["in_channels"] == 5
    assert ck["kind"] == "pretrain"  # the build never takes it as an ensemble member
    assert "epoch 2/2" in r.stdout   # per-epoch lines through a pipe
    assert "grade against the pre-training targets" in r.stdout
    log = open(out + ".log.txt").read()
    assert "checkpoint_mb" in log and "min_class_iou" in log and "grade:" in log
    from training.config import load_config
    from training.runs.transfer import load_init_state

    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), {"model.decoder_channels": [16, 16, 16, 8, 8]})
    lines = []
    state = load_init_state(out, cfg, lines)
    assert len(state) > 100 and "loaded" in lines[0]
    cfg2 = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"))  # other decoder: partial load
    lines2 = []
    load_init_state(out, cfg2, lines2)
    assert any("not loaded" in line for line in lines2)
    ck["bands"] = ["B1", "B2", "B3", "B6_low", "B6_high"]
    bad = str(tmp_path / "bad.pt")
    torch.save(ck, bad)
    with pytest.raises(BandMappingError):
        load_init_state(bad, cfg)


def test_pretrain_in_process_then_init_from(fake_hkh, tmp_path):
    """The fast twin of the CLI test above: one tiny epoch in-process, then init-from."""
    from training.config import load_config
    from training.runs.pretrain import pretrain
    from training.runs.transfer import load_init_state

    tiny = {"train.epochs": 1, "train.patches_per_epoch": 4, "train.batch_size": 4, "train.patch_size": 64,
            "model.decoder_channels": [16, 16, 16, 8, 8]}
    out = str(tmp_path / "hkh.pt")
    res = pretrain(os.path.join(ROOT, "configs", "hkh_pretrain_quick.yaml"), fake_hkh, out, device="cpu",
                   overrides=tiny, progress=False, val_patches=1)
    assert res["val_patches"] == 1
    ck = torch.load(out, weights_only=False)
    assert ck["sensor"] == "L7" and ck["bands"] == ["B1", "B2", "B3", "B5", "B6_high"]
    assert ck["class_map"]["names"] == ["background", "glacier", "debris", "lake"]
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), {"model.decoder_channels": [16, 16, 16, 8, 8]})
    lines = []
    state = load_init_state(out, cfg, lines)
    assert len(state) == len(ck["state_dict"]) and "loaded" in lines[0]
