"""The weights folder of a run (``glacier-train cv --out``), named in one place.

Layout::

    OUT/fold{k}_seed{s}.pt         members
    OUT/oof/fold{k}_seed{s}/T.npy  out-of-fold probabilities (fp16, masked pixels background)
    OUT/oof/labels/T.npy           their labels (class ids)
    OUT/logs/fold{k}_seed{s}.csv   per-epoch metrics; OUT/logs/worker{i}.log fold-parallel output
    OUT/.work/fold{k}_seed{s}/     a cut member's last.pt / best.pt
    OUT/cv_summary.json|.txt, training_log.txt, curves.png

:class:`RunDir` names every path; :func:`read_oof` is the one reader of the out-of-fold
arrays (used by the CV summary, the bias fit, the tuner and the benchmarks).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

MEMBER_RE = re.compile(r"^fold(-?\d+)_seed(-?\d+)\.pt$")


def member_name(fold: int, seed: int) -> str:
    return f"fold{fold}_seed{seed}"


def parse_member(filename: str) -> Optional[Tuple[int, int]]:
    """``fold3_seed1.pt`` -> (3, 1); None for any other name."""
    m = MEMBER_RE.match(os.path.basename(filename))
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class RunDir:
    root: str

    @classmethod
    def of_member(cls, path: str) -> "RunDir":
        """The run folder a member checkpoint lies in."""
        return cls(os.path.dirname(os.path.abspath(path)))

    # -- members ------------------------------------------------------------------------
    def member(self, fold: int, seed: int) -> str:
        return os.path.join(self.root, member_name(fold, seed) + ".pt")

    def members(self) -> List[Tuple[int, int, str]]:
        """(fold, seed, path) of every member file, in name order."""
        if not os.path.isdir(self.root):
            return []
        out = []
        for name in sorted(os.listdir(self.root)):
            fs = parse_member(name)
            if fs:
                out.append((fs[0], fs[1], os.path.join(self.root, name)))
        return out

    # -- derived files --------------------------------------------------------------------
    @property
    def oof_root(self) -> str:
        return os.path.join(self.root, "oof")

    def oof_dir(self, name: str) -> str:
        return os.path.join(self.oof_root, name)

    @property
    def labels_dir(self) -> str:
        return os.path.join(self.oof_root, "labels")

    def oof_file(self, name: str, key: str) -> str:
        return os.path.join(self.oof_dir(name), f"{key}.npy")

    def label_file(self, key: str) -> str:
        return os.path.join(self.labels_dir, f"{key}.npy")

    def oof_members(self) -> List[str]:
        """Names of the members with an ``oof/<name>/`` folder."""
        if not os.path.isdir(self.oof_root):
            return []
        return sorted(d for d in os.listdir(self.oof_root)
                      if d != "labels" and os.path.isdir(self.oof_dir(d)))

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.root, "logs")

    def log_csv(self, name: str) -> str:
        return os.path.join(self.logs_dir, f"{name}.csv")

    def worker_log(self, worker: int) -> str:
        return os.path.join(self.logs_dir, f"worker{worker}.log")

    def work_dir(self, name: str) -> str:
        return os.path.join(self.root, ".work", name)

    @property
    def cv_summary_json(self) -> str:
        return os.path.join(self.root, "cv_summary.json")

    @property
    def cv_summary_txt(self) -> str:
        return os.path.join(self.root, "cv_summary.txt")

    @property
    def training_log(self) -> str:
        return os.path.join(self.root, "training_log.txt")

    @property
    def curves_png(self) -> str:
        return os.path.join(self.root, "curves.png")

    # -- writing and cleaning ---------------------------------------------------------------
    def write_oof(self, name: str, probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> None:
        """One member's out-of-fold probabilities and their labels, each file atomically."""
        from glacier_runtime.atomic import atomic_write_with

        for key, p in probs.items():
            for path, arr in ((self.oof_file(name, key), p), (self.label_file(key), labels[key])):
                atomic_write_with(path, lambda tmp, a=arr: np.save(tmp, a))

    def remove_member(self, fold: int, seed: int) -> None:
        """A member and everything derived from it: OOF arrays, cut-run state, CSV log."""
        name = member_name(fold, seed)
        for p in (self.member(fold, seed), self.log_csv(name)):
            if os.path.exists(p):
                os.unlink(p)
        for d in (self.oof_dir(name), self.work_dir(name)):
            shutil.rmtree(d, ignore_errors=True)

    def prune_oof(self, val_keys: Iterable[str]) -> List[str]:
        """Keep in ``oof/`` exactly the arrays of members present and the labels of ``val_keys``."""
        removed: List[str] = []
        if not os.path.isdir(self.oof_root):
            return removed
        val_keys = set(val_keys)
        for name in os.listdir(self.oof_root):
            p = self.oof_dir(name)
            if name == "labels":
                for f in os.listdir(p):
                    if f.endswith(".npy") and f[:-4] not in val_keys:
                        os.unlink(os.path.join(p, f))
                        removed.append(os.path.join(p, f))
                continue
            if not os.path.exists(os.path.join(self.root, name + ".pt")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    def clean_temps(self) -> List[str]:
        """Temporary files a killed writer left in the folder and its sub-folders."""
        from glacier_runtime.atomic import remove_stale_temps

        removed: List[str] = []
        for folder, _, _ in os.walk(self.root):
            removed += remove_stale_temps(folder)
        return removed


# ---- the one out-of-fold reader ------------------------------------------------------------
@dataclass(frozen=True)
class OOFMember:
    """What the reader needs to know of a member: where its run folder is, its name, fold and
    the tiles it validated and trained on."""
    run: RunDir
    name: str
    fold: int
    val_tiles: Sequence[str]
    train_tiles: Sequence[str] = ()

    @classmethod
    def from_meta(cls, name: str, meta: Mapping) -> "OOFMember":
        """From a payload entry's ``meta`` (``glacier_submit.members``)."""
        return cls(RunDir.of_member(meta["source"]), name, int(meta["fold"]), tuple(meta.get("val_tiles") or ()),
                   tuple(meta.get("train_tiles") or ()))

    @classmethod
    def from_folder(cls, run: RunDir, name: str) -> "OOFMember":
        """From the files alone (no checkpoint read): the tiles of ``oof/<name>/``; the fold
        from the name (``fold3_seed0`` -> 3, else -1)."""
        d = run.oof_dir(name)
        tiles = tuple(sorted(f[:-4] for f in os.listdir(d) if f.endswith(".npy") and not f.startswith("."))
                      ) if os.path.isdir(d) else ()
        fs = parse_member(name + ".pt")
        return cls(run, name, fs[0] if fs else -1, tiles)


@dataclass
class OOFSet:
    """Out-of-fold probabilities per member, the labels, and each tile's fold."""
    keys: List[str]
    labels: Dict[str, np.ndarray]
    fold_of: Dict[str, int]
    probs: Dict[str, Dict[str, np.ndarray]]           # member name -> tile -> (K, H, W) float32
    members_of_fold: Dict[int, List[str]] = field(default_factory=dict)

    def mean_probs(self, key: str, members: Optional[Sequence[str]] = None) -> Optional[np.ndarray]:
        """Mean probabilities of ``key`` over ``members`` (default: all, in reading order)
        that have it; None when none has."""
        names = list(self.probs) if members is None else list(members)
        ps = [self.probs[m][key] for m in names if key in self.probs.get(m, {})]
        return np.mean(ps, 0) if ps else None


def read_oof(members: Sequence[OOFMember], labels: bool = True) -> OOFSet:
    """Read the out-of-fold arrays of ``members``.

    A tile counts when a member of its own fold (``val_tiles`` holds it, ``train_tiles`` does
    not) has its probabilities and, with ``labels``, when its label file is there too (without,
    the caller brings the labels: ``OOFSet.labels`` stays empty). Members keep the order given."""
    probs: Dict[str, Dict[str, np.ndarray]] = {}
    found: Dict[str, np.ndarray] = {}
    fold_of: Dict[str, int] = {}
    members_of_fold: Dict[int, List[str]] = {}
    for m in members:
        if not os.path.isdir(m.run.oof_dir(m.name)):
            continue
        members_of_fold.setdefault(m.fold, []).append(m.name)
        train = set(m.train_tiles)
        for key in m.val_tiles:
            f, lab = m.run.oof_file(m.name, key), m.run.label_file(key)
            if key in train or not os.path.isfile(f) or (labels and not os.path.isfile(lab)):
                continue
            probs.setdefault(m.name, {})[key] = np.load(f).astype(np.float32)
            if key not in fold_of:
                fold_of[key] = m.fold
                if labels:
                    found[key] = np.load(lab).astype(np.int64)
    return OOFSet(keys=sorted(fold_of), labels=found, fold_of=fold_of, probs=probs, members_of_fold=members_of_fold)


def fold_members(run: RunDir, folds: Mapping, seeds: Sequence[int]) -> List[OOFMember]:
    """The OOF members of a CV run: every fold x seed of ``folds`` (folds.json), seeds in order."""
    return [OOFMember(run, member_name(f["fold"], s), int(f["fold"]), tuple(f["val"]), tuple(f["train"]))
            for f in folds["folds"] for s in seeds]
