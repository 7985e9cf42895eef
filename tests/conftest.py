"""Shared fixtures: tiny synthetic datasets (torchgeo-style fake data), member checkpoints,
built bundles, a folds file, a local HTTP server. The builders they use are in tests/helpers.py."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import Server, fingerprints, make_member, write_geotiff


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A tiny synthetic benchmark: 9 train tiles and 4 unseen tiles of 64x64."""
    from training.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(str(out), n_tiles=9, size=(64, 64), seed=3, unseen_tiles=4)
    return str(out)


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
    write_split(str(root), 3, (64, 64), seed=9, region=UNSEEN_REGION, layout="phase2")
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


@pytest.fixture(scope="session")
def folds_file(synth_data, tmp_path_factory):
    """folds.json of the synthetic training tiles: 3 folds, blocks of one tile."""
    from training.data.competition import CompetitionDataset
    from training.folds import make_folds, save_folds

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    f = make_folds({k: ds.class_pixels(k).tolist() for k in ds.keys}, k=3, block=1)
    path = str(tmp_path_factory.mktemp("folds") / "folds.json")
    save_folds(f, path)
    return path


@pytest.fixture(scope="session")
def fake_hkh(tmp_path_factory):
    """HKH patches in the glacier_mapping layout: 6 train and 2 validation patches of 64x64."""
    from training.data.hkh import write_fake_hkh

    d = str(tmp_path_factory.mktemp("hkh"))
    write_fake_hkh(d, n_train=6, n_val=2, size=64, seed=1)
    return d


# ---- built bundles (read only: no test writes into them) ------------------------------------------
@pytest.fixture(scope="session")
def bundle(tiny_members, tmp_path_factory):
    """Both tiny members, flips TTA, the light preset and a bias: (folder, manifest)."""
    from glacier_submit.bundle import build

    out = str(tmp_path_factory.mktemp("bundle"))
    m = build(tiny_members, out, tta="flips", scales=[1.0], postprocess="light", bias=[0.0, 0.1, 0.2, 0.3])
    return out, m


@pytest.fixture(scope="session")
def real_bundle(tiny_members, tmp_path_factory):
    """Both tiny members with the default settings: the folder."""
    from glacier_submit.bundle import build

    out = str(tmp_path_factory.mktemp("trust_bundle") / "b")
    build(tiny_members, out)
    return out


@pytest.fixture(scope="session")
def setup(synth_data, tmp_path_factory):
    """One member trained on 6 of the synthetic training tiles, default build:
    (bundle, synth_data, training keys, weights folder)."""
    from glacier_submit.bundle import build
    from training.data.competition import CompetitionDataset

    d = tmp_path_factory.mktemp("trust_ev")
    keys = CompetitionDataset(os.path.join(synth_data, "train")).keys
    w = make_member(str(d / "fold0_seed0.pt"), train_tiles=keys[:6], val_tiles=keys[6:],
                    tile_sha256=fingerprints(os.path.join(synth_data, "train")))
    bundle = str(d / "bundle")
    build([w], bundle)
    return bundle, synth_data, keys, str(d)


@pytest.fixture(scope="session")
def oof_members(synth_data, tmp_path_factory):
    """3 folds x 2 seeds of tiny members with out-of-fold arrays (labels one-hot plus independent
    noise per seed) and labels beside them, as `glacier-train cv` writes them: (folder, paths, keys)."""
    from training.data.competition import CompetitionDataset

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = sorted(ds.keys)
    folds = {f: keys[f::3] for f in range(3)}
    w = tmp_path_factory.mktemp("tune_weights")
    rng = np.random.default_rng(0)
    paths = []
    sha = fingerprints(os.path.join(synth_data, "train"))
    os.makedirs(w / "oof" / "labels", exist_ok=True)
    for f, val in folds.items():
        train = [k for k in keys if k not in val]
        for s in range(2):
            name = f"fold{f}_seed{s}"
            paths.append(make_member(str(w / f"{name}.pt"), seed=10 * f + s, fold=f, train_tiles=train,
                                     val_tiles=val, val_mcc=0.6 + 0.01 * s, tile_sha256=sha))
            os.makedirs(w / "oof" / name)
            for k in val:
                y = ds.label(k)
                logits = np.eye(4, dtype=np.float32)[y].transpose(2, 0, 1) * 1.2
                logits += rng.normal(0, 1.0, logits.shape).astype(np.float32)  # independent noise per seed
                p = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
                np.save(w / "oof" / name / f"{k}.npy", p.astype(np.float16))
                np.save(w / "oof" / "labels" / f"{k}.npy", y)
    return str(w), paths, keys


# ---- function-scoped ----------------------------------------------------------------------------------
@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 (tests.helpers.Server), closed after the test."""
    s = Server()
    yield s
    s.close()


@pytest.fixture
def nan_loss_at(monkeypatch):
    """Make the loss's focal part NaN (still attached to the graph, so the gradients are NaN
    too, as in a real divergence) on the chosen training calls (0-based)."""
    from training.losses import CombinedLoss

    orig = CombinedLoss.forward
    calls = {"n": 0, "bad": set()}

    def forward(self, logits, target, dist=None, epoch=0):
        parts = orig(self, logits, target, dist, epoch)
        i = calls["n"]
        calls["n"] += 1
        if i in calls["bad"]:
            parts["focal"] = parts["focal"] * float("nan")
            parts["total"] = sum(v for k, v in parts.items() if k != "total")
        return parts

    monkeypatch.setattr(CombinedLoss, "forward", forward)

    def arm(steps):
        calls["bad"] = set(steps)
        return calls

    return arm
