"""Shared fixtures: tiny synthetic datasets and TIFF writers (torchgeo-style fake data)."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_geotiff(path: str, arr: np.ndarray, compress: Optional[str] = None, tiled: bool = False,
                  nodata=None) -> str:
    """Write a single-band GeoTIFF with rasterio (LZW/deflate/tiled as asked)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    os.makedirs(os.path.dirname(path), exist_ok=True)
    profile = dict(driver="GTiff", height=arr.shape[0], width=arr.shape[1], count=1, dtype=arr.dtype.name)
    if compress:
        profile["compress"] = compress
    if tiled:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(arr, 1)
    return path


def make_tile(root: str, tid: str, h: int = 40, w: int = 44, dtype=np.float32, seed: int = 0,
              label_values=(0, 85, 170, 255), naming: str = "train", **kw) -> None:
    rng = np.random.default_rng(seed)
    names = ([f"B2_B2_masked_{tid}.tif", f"B3_B3_masked_{tid}.tif", f"B4_B4_masked_{tid}.tif",
              f"B6_B6_masked_{tid}.tif", f"B10_B10_masked_{tid}.tif"] if naming == "train" else [f"img{tid}.tif"] * 5)
    for b, name in enumerate(names):
        data = (rng.random((h, w)) * 1000).astype(dtype)
        write_geotiff(os.path.join(root, f"Band{b + 1}", name), data, **kw)
    lab = rng.choice(np.array(label_values, dtype=np.uint8), size=(h, w))
    lname = f"Y_output_resized_{tid}.tif" if naming == "train" else f"img{tid}.tif"
    write_geotiff(os.path.join(root, "label", lname), lab)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A tiny synthetic benchmark: 9 train tiles and 4 unseen tiles of 64x64."""
    from training.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(str(out), n_tiles=9, size=(64, 64), seed=3, unseen_tiles=4)
    return str(out)


def make_member(path: str, seed: int = 0, fold: int = 0, train_tiles=("00_00", "00_01"), val_tiles=("01_00",),
                classes: int = 4, encoder: str = "resnet18", val_mcc: float = 0.5) -> str:
    """A tiny member checkpoint in the training format, with random weights (no training)."""
    import torch

    from glacier_runtime.classes import class_map
    from glacier_runtime.models import build_model
    from training.engine.checkpoint import FORMAT, save_atomic

    torch.manual_seed(seed)
    spec = {"arch": "Unet", "encoder": encoder, "in_channels": 5, "classes": classes,
            "decoder_channels": [16, 16, 16, 8, 8], "decoder_attention_type": None}
    model = build_model(spec)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    stats = {"bands": ["B2", "B3", "B4", "B6", "B10"], "mean": [0.15, 0.15, 0.15, 0.15, 270.0],
             "std": [0.1, 0.1, 0.1, 0.08, 10.0], "lo": [0.0, 0.0, 0.0, 0.0, 200.0], "hi": [1.0, 1.0, 1.0, 1.0, 320.0]}
    save_atomic({"format": FORMAT, "spec": spec, "state_dict": model.state_dict(), "sensor": "L8",
                 "bands": ["B2", "B3", "B4", "B6", "B10"], "stats": stats, "class_map": class_map(classes == 2),
                 "fold": fold, "seed": seed, "train_tiles": list(train_tiles), "val_tiles": list(val_tiles),
                 "history": [], "val_mcc": val_mcc, "best_epoch": 0, "config": {}, "code_version": "test"}, path)
    return path


@pytest.fixture(scope="session")
def tiny_members(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return [make_member(str(d / f"fold{i}_seed0.pt"), seed=i, fold=i, train_tiles=[f"0{i}_00"], val_mcc=0.5 + i / 10)
            for i in range(2)]


@pytest.fixture(scope="session")
def messy_test_data(tmp_path_factory):
    """A test folder as the platform sees it: same name in every band folder, with an odd
    size, an LZW-compressed tile, a NaN tile, a corrupt band and a tile missing a band."""
    from training.data.synth import write_split, UNSEEN_REGION

    root = tmp_path_factory.mktemp("testset")
    write_split(str(root), 3, (64, 64), seed=9, region=UNSEEN_REGION, naming="test")
    import tifffile

    rng = np.random.default_rng(0)
    for b in range(5):
        base = rng.random((37, 41)).astype(np.float32) * (300 if b == 4 else 0.5)
        tifffile.imwrite(str(root / f"Band{b + 1}" / "img004.tif"), base)                   # odd size
        write_geotiff(str(root / f"Band{b + 1}" / "img005.tif"), base[:32, :40], compress="lzw")  # LZW
        nan = base.copy()
        nan[:10] = np.nan
        tifffile.imwrite(str(root / f"Band{b + 1}" / "img006.tif"), nan)                    # NaN rows
        tifffile.imwrite(str(root / f"Band{b + 1}" / "img007.tif"), base)
        if b != 2:
            tifffile.imwrite(str(root / f"Band{b + 1}" / "img008.tif"), base)               # Band3 missing
    p = root / "Band2" / "img007.tif"
    p.write_bytes(p.read_bytes()[:100])                                                       # corrupt
    (root / "Band1" / "notes.txt").write_text("stray")
    return str(root)
