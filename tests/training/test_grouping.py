"""Which tiles share a fold: grid ids, a groups file, the rebuilt mosaic; blocks of positions."""
import json
import os

import numpy as np
import pytest

from tests.helpers import write_geotiff
from training.grouping import blocks, group_tiles, read_groups_file


def test_blocks_and_groups_files(tmp_path):
    grid = {"a": (0, 0), "b": (0, 1), "c": (2, 3)}
    assert blocks(grid, ["a", "b", "c", "d"], 2) == {"a": "g0_0", "b": "g0_0", "c": "g1_1", "d": "td"}
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"a": "X", "b": "X", "c": "Y"}))
    assert read_groups_file(str(j), ["a", "b", "c"]) == {"a": "fX", "b": "fX", "c": "fY"}
    c = tmp_path / "g.csv"
    c.write_text("tile,group\na,1\nb,2\n")
    assert read_groups_file(str(c), ["a", "b"]) == {"a": "f1", "b": "f2"}
    with pytest.raises(ValueError, match="names no group for tiles \\['c'\\]"):
        read_groups_file(str(c), ["a", "b", "c"])


def test_phase2_names_are_grouped_by_the_rebuilt_mosaic(tmp_path):
    # 96-pixel tiles (160 m pixels): at 64 px (240 m) too little continues across a seam
    # (7 of 12 pairs found, two mosaics); benchmarks/mosaic_grouping.py measures 512 px
    from training.data.competition import CompetitionDataset
    from training.data.synth import generate_dataset

    root = str(tmp_path / "s")
    generate_dataset(root, n_tiles=9, size=(96, 96), seed=3, unseen_tiles=0)
    ds = CompetitionDataset(os.path.join(root, "train"))
    marker = json.load(open(os.path.join(root, ".glacier-synth.json")))
    truth = {k.split("/", 1)[1]: tuple(v) for k, v in marker["tiles"].items() if k.startswith("train/")}
    g = group_tiles(ds, block=2)
    assert g.method == "edges" and "edge continuity" in g.detail
    want = blocks(truth, ds.keys, 2)  # tiles of one true 2x2 block share a group
    together = {(a, b) for a in ds.keys for b in ds.keys if want[a] == want[b]}
    assert all(g.groups[a] == g.groups[b] for a, b in together)
    assert group_tiles(ds, 2, "none").alone
    one = group_tiles(ds, block=1)  # 1x1 blocks of known positions: the user's choice, no warning
    assert len(set(one.groups.values())) == len(ds.keys) and not one.alone and one.neighbours >= 8


def test_grid_names_and_a_scene_without_neighbours(tmp_path):
    from training.data.competition import CompetitionDataset
    from training.data.synth import generate_dataset

    generate_dataset(str(tmp_path / "g"), n_tiles=4, size=(32, 32), seed=2, layout="grid", unseen_tiles=0)
    g = group_tiles(CompetitionDataset(str(tmp_path / "g" / "train")), block=1)
    assert g.method == "grid" and g.neighbours == 4 and not g.alone
    noise = tmp_path / "n"  # four tiles of independent noise: no edge continues another
    rng = np.random.default_rng(0)
    for i in range(4):
        for b in range(5):
            write_geotiff(str(noise / f"Band{b + 1}" / f"img00{i + 1}.tif"),
                          (rng.random((32, 32)) * 1000 + 100).astype(np.float32))
    g = group_tiles(CompetitionDataset(str(noise), require_labels=False), block=2)
    assert g.method == "edges" and g.neighbours == 0 and g.alone
