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
