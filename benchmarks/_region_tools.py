"""Shared steps of the region benchmarks (region_shift.py, generator_ablation.py): run the
product's own commands, pool regions into one training folder, score masks per tile, and
bootstrap intervals over tiles. Each step is a command a user could run by hand."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training.metrics import mcc_batch, tile_confusions  # noqa: E402

BIN = os.path.dirname(sys.executable)
CLASSES = ("background", "glacier", "debris", "lake")


def tool(name: str) -> List[str]:
    exe = os.path.join(BIN, name)
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", {"glacier-train": "training.cli",
                                                                      "glacier-submit": "glacier_submit.cli"}[name]]


def run(cmd: Sequence[str], log: Optional[str] = None) -> str:
    """Run a command, fail with its output's tail when it fails; return its stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    if log:
        with open(log, "a") as fh:
            fh.write("$ " + " ".join(cmd) + "\n" + r.stdout + r.stderr + "\n")
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def pool(sources: Mapping[str, str], out: str, limit: Optional[int] = None) -> Dict[str, str]:
    """A competition-layout folder holding the tiles of several folders (symlinks), each
    renamed ``<source>_<name>`` so names stay unique (the first ``limit`` tiles of each
    source when given); returns {new key: source name}."""
    shutil.rmtree(out, ignore_errors=True)
    owner = {}
    for name, folder in sources.items():
        for sub in sorted(os.listdir(folder)):
            src = os.path.join(folder, sub)
            if not os.path.isdir(src):
                continue
            os.makedirs(os.path.join(out, sub), exist_ok=True)
            for f in sorted(os.listdir(src))[:limit]:
                os.symlink(os.path.abspath(os.path.join(src, f)), os.path.join(out, sub, f"{name}_{f}"))
                owner[f"{name}_{os.path.splitext(f)[0]}"] = name
    return owner


def region_groups(owner: Mapping[str, str], marker: Mapping, block: int, path: str) -> str:
    """A --groups file: tiles of one region in one block x block cell of its scene share a group."""
    groups = {}
    for key, region in owner.items():
        tile = key[len(region) + 1:]
        pos = marker["tiles"].get(f"regions/{region}/{tile}") or marker["tiles"].get(f"train/{tile}")
        r, c = pos if pos else (0, 0)
        groups[key] = f"{region}-{r // block}-{c // block}"
    with open(path, "w") as fh:
        json.dump(groups, fh, indent=1)
    return path


def tile_scores(masks_dir: str, data: str, keys: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Per-tile confusion matrices of the masks a bundle wrote against the data's labels."""
    from glacier_runtime.tiles import read_band, tile_id
    from training.data.competition import CompetitionDataset

    ds = CompetitionDataset(data)
    lut = np.full(256, 0, np.uint8)
    for i, v in enumerate((0, 85, 170, 255)):
        lut[v] = i
    masks = {tile_id(f): os.path.join(masks_dir, f) for f in os.listdir(masks_dir) if f.endswith(".tif")}
    out = {}
    for k in keys or ds.keys:
        tid = tile_id(os.path.basename(ds.tiles[k].bands["Band1"]))
        pred = lut[read_band(masks[tid])[0]] if tid in masks else np.zeros(ds.label(k).shape, np.uint8)
        out[k] = tile_confusions([pred], [ds.label(k)], 4)[0]
    return out


def per_class(cm: np.ndarray) -> Dict[str, float]:
    from training.metrics import per_class_scores

    return {r["class"]: round(r["mcc"], 4) for r in per_class_scores(cm, CLASSES)}


def bootstrap(cms: Sequence[np.ndarray], n: int = 2000, seed: int = 0, level: float = 0.9) -> Tuple[float, float, float]:
    """Pooled MCC of per-tile confusions and its bootstrap interval over tiles."""
    cms = np.asarray(cms, np.float64)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(cms), np.full(len(cms), 1.0 / len(cms)), size=n).astype(np.float64)
    boot = mcc_batch((counts @ cms.reshape(len(cms), -1)).reshape(n, *cms.shape[1:]))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(mcc_batch(cms.sum(0))), float(lo), float(hi)


def bootstrap_gain(a: Sequence[np.ndarray], b: Sequence[np.ndarray], n: int = 2000, seed: int = 0,
                   level: float = 0.9) -> Tuple[float, float, float]:
    """Pooled-MCC gain of ``b`` over ``a`` (same tiles) and its bootstrap interval over tiles."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(a), np.full(len(a), 1.0 / len(a)), size=n).astype(np.float64)
    ba = mcc_batch((counts @ a.reshape(len(a), -1)).reshape(n, *a.shape[1:]))
    bb = mcc_batch((counts @ b.reshape(len(b), -1)).reshape(n, *b.shape[1:]))
    lo, hi = np.quantile(bb - ba, [(1 - level) / 2, (1 + level) / 2])
    return float(mcc_batch(b.sum(0)) - mcc_batch(a.sum(0))), float(lo), float(hi)


def pixel_baseline(train: str, test: str, samples: int = 200_000, seed: int = 0) -> Dict[str, np.ndarray]:
    """The per-pixel baseline (gradient boosting on the 5 band values) trained on ``train``,
    per-tile confusions on ``test``."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from training.data.competition import CompetitionDataset

    tr, te = CompetitionDataset(train), CompetitionDataset(test)
    X = np.concatenate([np.nan_to_num(tr.image(k).reshape(5, -1).T) for k in tr.keys])
    y = np.concatenate([tr.label(k).reshape(-1) for k in tr.keys])
    idx = np.random.default_rng(seed).choice(len(y), min(samples, len(y)), replace=False)
    clf = HistGradientBoostingClassifier(max_iter=200, random_state=seed).fit(X[idx], y[idx])
    out = {}
    for k in te.keys:
        pred = clf.predict(np.nan_to_num(te.image(k).reshape(5, -1).T)).reshape(te.label(k).shape)
        out[k] = tile_confusions([pred], [te.label(k)], 4)[0]
    return out


def cv_oof(weights: str, data: str) -> Dict[str, np.ndarray]:
    """Per-tile confusions of the out-of-fold predictions `glacier-train cv` saved."""
    from glacier_runtime.decision import decide
    from training.rundir import OOFMember, RunDir, read_oof

    run_dir = RunDir(weights)
    oof = read_oof([OOFMember.from_folder(run_dir, n) for n in run_dir.oof_members()])
    return {k: tile_confusions([decide(oof.mean_probs(k))], [oof.labels[k]], 4)[0] for k in oof.keys}


def one_vs_rest(cms: Sequence[np.ndarray], c: int) -> np.ndarray:
    """(T, 2, 2) confusions of class ``c`` against the rest."""
    cms = np.asarray(cms, np.float64)
    tp = cms[:, c, c]
    fn = cms[:, c].sum(1) - tp
    fp = cms[:, :, c].sum(1) - tp
    tn = cms.sum((1, 2)) - tp - fn - fp
    return np.stack([np.stack([tn, fp], 1), np.stack([fn, tp], 1)], 1)


def table(cms: Mapping[str, np.ndarray]) -> Dict[str, object]:
    """MCC with its interval, and each class's one-vs-rest MCC with its interval."""
    t = list(cms.values())
    m, lo, hi = bootstrap(t)
    out = {"mcc": round(m, 4), "ci90": [round(lo, 4), round(hi, 4)], "tiles": len(t), "per_class": {}}
    for c, name in enumerate(CLASSES):
        pm, plo, phi = bootstrap(one_vs_rest(t, c))
        out["per_class"][name] = {"mcc": round(pm, 4), "ci90": [round(plo, 4), round(phi, 4)]}
    return out
