"""What ``build --tune oof`` judges its candidates with: the members' out-of-fold arrays, the
bundle's own predictor to re-predict OOF tiles (TTA, scales) and refine them (CRF), and the
check tile to measure what each candidate costs per tile."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from glacier_runtime.predictor import Predictor
from training.rundir import OOFMember, OOFSet, read_oof


def read_member_oof(entries: Sequence[Mapping[str, Any]]) -> OOFSet:
    """The OOF arrays of payload entries (``glacier_submit.members``), in their order."""
    return read_oof([OOFMember.from_meta(e["name"], e["meta"]) for e in entries])


#: fold groupings (glacier-train folds --grouping) that know where tiles lay: the spatial ones
#: keep the tiles of one block x block cell of a mosaic in one fold; a groups file keeps each of
#: its groups (regions, when the user made them so) in one fold
SPATIAL = {"grid": "grid ids in the names", "georeferencing": "the files' georeferencing",
           "edges": "mosaics rebuilt from edge continuity"}


def shift_statement(entries: Sequence[Mapping[str, Any]]) -> Tuple[bool, str]:
    """(grouped, line): whether the members' folds were grouped (a groups file, or spatial
    blocks of a mosaic), with a line saying what their OOF evidence can see of a shift, or a
    warning that it cannot see a regional shift."""
    methods = {(e["meta"].get("fold_grouping") or {}).get("method") for e in entries}
    details = sorted({(e["meta"].get("fold_grouping") or {}).get("detail") or "" for e in entries} - {""})
    detail = f"; {details[0]}" if details else ""
    method = next(iter(methods)) if len(methods) == 1 else None
    if method == "file":
        return True, (f"evidence: folds grouped by a groups file (--groups{detail}): every out-of-fold tile was "
                      "predicted by members that saw none of its group, so when the groups are regions a shift "
                      "between those regions is in this evidence; a shift to a region unlike all of them is not")
    if method in SPATIAL:
        return True, (f"evidence: spatially blocked folds ({SPATIAL[method]}{detail}): out-of-fold tiles were "
                      "predicted by members that saw none of their block, so a shift across the mosaic is in this "
                      "evidence, but not a shift to another region. For that, make the folds with --groups FILE "
                      "naming each tile's region")
    known = ", ".join(sorted(str(m) for m in methods if m)) or "not recorded"
    return False, (f"WARNING: the members' folds were not grouped by region or mosaic (grouping: {known}): "
                   "out-of-fold tiles have neighbours in the training folds, so this evidence cannot see a regional "
                   "shift and gains may not carry to the unseen region. Make the folds with `glacier-train folds "
                   "--groups FILE` (each tile's region) or `--grouping auto` (spatial blocks), and retrain")


class BuildEvidence:
    """Cost, re-prediction and CRF for the tuner, on the members of ``payload``.

    ``tune_data`` is the training folder the members were trained on; without it the
    tuner judges only what the saved OOF probabilities can show (no TTA, scales, CRF)."""

    def __init__(self, entries: Sequence[Mapping[str, Any]], payload: Dict[str, Any], tile: np.ndarray,
                 device: str, presets: Mapping[str, List[Dict[str, Any]]], tune_data: Optional[str] = None,
                 echo: Callable[[str], None] = lambda s: None):
        self.oof = read_member_oof(entries)
        self.entries = list(entries)
        if not self.oof.keys:
            raise ValueError("--tune oof needs the out-of-fold predictions `glacier-train cv` writes beside the "
                             "members (weights/oof/<member>/ and weights/oof/labels/); none were found for "
                             f"{[e['name'] for e in entries]}")
        self.payload, self.tile, self.device, self.presets, self.echo = payload, tile, device, presets, echo
        self.index = {e["name"]: i for i, e in enumerate(payload["members"])}
        self._costs: Dict[Any, float] = {}
        self.ds = None
        if tune_data:
            from training.data.competition import CompetitionDataset

            self.ds = CompetitionDataset(tune_data)
            missing = [k for k in self.oof.keys if k not in set(self.ds.keys)]
            if missing:
                raise ValueError(f"--tune-data {tune_data} lacks OOF tiles {missing[:5]}: give the folder the "
                                 "members were trained on")
        self._predictors: Dict[Any, Predictor] = {}

    @property
    def n_classes(self) -> int:
        return int(self.payload["members"][0]["spec"]["classes"])

    def _subset(self, members: Optional[Mapping[str, List[str]]]) -> List[int]:
        if not members:
            return list(range(len(self.payload["members"])))
        keep = {m for ms in members.values() for m in ms}
        return [i for n, i in self.index.items() if n in keep]

    def cost(self, s: Mapping[str, Any]) -> float:
        """Seconds per check tile of the bundle under settings ``s`` (measured once per setting)."""
        from glacier_submit.timing import time_predictor

        idx = self._subset(s.get("members"))
        key = (tuple(idx), str(s.get("tta")), tuple(s.get("scales") or [1.0]), s.get("postprocess"), bool(s.get("crf")))
        if key not in self._costs:
            sub = dict(self.payload, members=[self.payload["members"][i] for i in idx])
            over = {"tta": s.get("tta", "none"), "scales": list(s.get("scales") or [1.0]),
                    "postprocess": self.presets.get(s.get("postprocess") or "none", []),
                    "crf": {"enabled": True} if s.get("crf") else None}
            self._costs[key] = time_predictor(sub, self.tile, self.device, over)["tile_s"]
            self.echo(f"  cost: {len(idx)} members, TTA {over['tta']}, scales {over['scales']}, "
                      f"post-processing {s.get('postprocess') or 'none'}{', CRF' if s.get('crf') else ''}: "
                      f"{self._costs[key]:.2f} s/tile")
        return self._costs[key]

    def predict(self, keys: List[str], tta: Any, scales: List[float],
                members: Mapping[str, List[str]]) -> Dict[str, np.ndarray]:
        """Each OOF tile re-predicted by its own fold's ``members`` (masked pixels background)."""
        out: Dict[str, np.ndarray] = {}
        preds: Dict[int, Predictor] = {}
        for k in keys:
            f = self.oof.fold_of[k]
            if f not in preds:
                idx = [self.index[m] for m in members.get(str(f), []) if m in self.index]
                preds[f] = Predictor.from_payload(self.payload, device=self.device, members=idx,
                                                  overrides={"tta": tta, "scales": scales, "bias": None,
                                                             "postprocess": []})
            img = self.ds.image(k)
            p = preds[f]
            out[k] = p.masked_to_background(p.predict_proba(img), p.masked(img)).astype(np.float32)
        self.echo(f"  re-predicted {len(keys)} OOF tiles with TTA {tta}, scales {scales}")
        return out

    def refine(self, probs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The CRF, with each tile's own fold member statistics as the appearance term's scale."""
        out: Dict[str, np.ndarray] = {}
        for k, p in probs.items():
            f = self.oof.fold_of[k]
            if ("crf", f) not in self._predictors:
                idx = [self.index[m] for m in self.oof.members_of_fold.get(f, []) if m in self.index][:1] or [0]
                self._predictors[("crf", f)] = Predictor.from_payload(self.payload, device=self.device, members=idx,
                                                                      overrides={"crf": {"enabled": True}})
            out[k] = self._predictors[("crf", f)].refine(p, self.ds.image(k))
        self.echo(f"  CRF on {len(probs)} OOF tiles")
        return out

    def tune(self, time_budget: Optional[float], confidence: float = 0.95, n_boot: int = 1000):
        """:func:`glacier_submit.tuning.decisions.tune` on this evidence."""
        from glacier_submit.tuning.decisions import tune

        have_data = self.ds is not None
        res = tune(self.oof, self.n_classes, predict=self.predict if have_data else None, cost=self.cost,
                   time_budget=time_budget, presets=self.presets, confidence=confidence, n_boot=n_boot,
                   refine=self.refine if have_data else None)
        res.shift = shift_statement(self.entries)[1]
        return res
