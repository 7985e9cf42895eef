"""``build --tune oof``: choose the bundle's settings from out-of-fold evidence.

Every setting starts at its simplest value and moves only when the move holds up on the
training tiles that no member of the tile's own fold saw:

- the gain is the pooled OOF MCC of the candidate minus that of the current setting;
- its uncertainty is a bootstrap over tiles (tiles resampled with replacement, the
  pooled confusion matrix recomputed, ``n_boot`` times); a setting is adopted only when
  the one-sided lower bound of the gain (``1 - confidence`` quantile) is above zero;
- settings that are *fitted* (the class bias, the choice among post-processing presets)
  are cross-fitted: for each fold, fitted on the other folds' tiles and applied to that
  fold's tiles, so their gain is measured on tiles they were not fitted on. When
  adopted, the final value is fitted on every OOF tile.

Decisions run in a fixed order, each on top of the ones adopted before it: seeds per
fold -> TTA views -> scales -> class bias -> post-processing. Candidates whose measured
cost (seconds per tile for the whole bundle) exceeds the time budget are not tried.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from glacier_submit.tuning.bias import BIAS_GRID, fit_bias, logp_pixels  # noqa: F401 - BIAS_GRID re-exported (one rule, one home)

log = logging.getLogger("glacier.tune")


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------

def mcc_batch(cms: np.ndarray) -> np.ndarray:
    """Multi-class MCC (Gorodkin's R_K, as sklearn) of a stack of confusion matrices."""
    cms = np.asarray(cms, np.float64)
    t = cms.sum(2)
    p = cms.sum(1)
    c = np.trace(cms, axis1=1, axis2=2)
    s = cms.sum((1, 2))
    cov_tp = c * s - (t * p).sum(1)
    cov_pp = s * s - (p * p).sum(1)
    cov_tt = s * s - (t * t).sum(1)
    den = np.sqrt(cov_tt * cov_pp)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, cov_tp / np.where(den > 0, den, 1.0), 0.0)
    return out


def tile_confusions(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], k: int) -> np.ndarray:
    """(T, K, K) confusion matrices, one per tile (rows = truth)."""
    out = np.zeros((len(preds), k, k), np.int64)
    for i, (p, y) in enumerate(zip(preds, labels)):
        idx = y.reshape(-1).astype(np.int64) * k + p.reshape(-1).astype(np.int64)
        out[i] = np.bincount(idx, minlength=k * k).reshape(k, k)
    return out


@dataclass
class Gain:
    gain: float
    lo: float
    hi: float
    base_mcc: float
    cand_mcc: float


def bootstrap_gain(base: np.ndarray, cand: np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> Gain:
    """Pooled-MCC gain of ``cand`` over ``base`` (per-tile confusions, same tiles) with a
    bootstrap over tiles: ``lo``/``hi`` are the ``1 - confidence`` / ``confidence`` quantiles."""
    if base.shape != cand.shape:
        raise ValueError(f"per-tile confusions differ in shape: {base.shape} vs {cand.shape}")
    t = base.shape[0]
    b_m = float(mcc_batch(base.sum(0, keepdims=True))[0])
    c_m = float(mcc_batch(cand.sum(0, keepdims=True))[0])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(t, np.full(t, 1.0 / t), size=n_boot).astype(np.float64)  # (B, T)
    kk = base.shape[1] * base.shape[2]
    bb = (counts @ base.reshape(t, kk)).reshape(n_boot, *base.shape[1:])
    cc = (counts @ cand.reshape(t, kk)).reshape(n_boot, *base.shape[1:])
    d = mcc_batch(cc) - mcc_batch(bb)
    return Gain(gain=c_m - b_m, lo=float(np.quantile(d, 1 - confidence)), hi=float(np.quantile(d, confidence)),
                base_mcc=b_m, cand_mcc=c_m)


# ---------------------------------------------------------------------------------------
# the class bias, regularised
# ---------------------------------------------------------------------------------------

def _logp(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_pixels: int, seed: int = 0):
    return logp_pixels(probs, labels, max_pixels, seed)


def decide_ids(probs: np.ndarray, bias: Optional[Sequence[float]] = None) -> np.ndarray:
    """argmax of log p + bias, as the runtime decides (masked pixels are already background
    in saved OOF probabilities)."""
    scores = np.log(np.maximum(probs, 1e-8))
    if bias is not None:
        scores = scores + np.asarray(bias, np.float32).reshape(-1, 1, 1)
    return scores.argmax(0).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# the OOF evidence
# ---------------------------------------------------------------------------------------

@dataclass
class OOFSet:
    """Out-of-fold probabilities per member, the labels, and each tile's fold."""
    keys: List[str]
    labels: Dict[str, np.ndarray]
    fold_of: Dict[str, int]
    probs: Dict[str, Dict[str, np.ndarray]]           # member name -> tile -> (K, H, W) float32
    members_of_fold: Dict[int, List[str]] = field(default_factory=dict)


def load_oof_set(entries: Sequence[Mapping[str, Any]]) -> OOFSet:
    """Read ``oof/<member>/<tile>.npy`` and ``oof/labels/<tile>.npy`` beside the members.

    A tile is used when it has a label and at least one member of its own fold (a member
    whose ``val_tiles`` hold it and whose ``train_tiles`` do not) has its probabilities.
    """
    probs: Dict[str, Dict[str, np.ndarray]] = {}
    labels: Dict[str, np.ndarray] = {}
    fold_of: Dict[str, int] = {}
    members_of_fold: Dict[int, List[str]] = {}
    for e in entries:
        meta = e["meta"]
        wd = os.path.dirname(meta["source"])
        d = os.path.join(wd, "oof", e["name"])
        if not os.path.isdir(d):
            continue
        members_of_fold.setdefault(int(meta["fold"]), []).append(e["name"])
        train = set(meta.get("train_tiles") or [])
        for key in meta.get("val_tiles") or []:
            f = os.path.join(d, f"{key}.npy")
            lab = os.path.join(wd, "oof", "labels", f"{key}.npy")
            if key in train or not (os.path.isfile(f) and os.path.isfile(lab)):
                continue
            probs.setdefault(e["name"], {})[key] = np.load(f).astype(np.float32)
            if key not in labels:
                labels[key] = np.load(lab).astype(np.int64)
                fold_of[key] = int(meta["fold"])
    keys = sorted(labels)
    return OOFSet(keys=keys, labels=labels, fold_of=fold_of, probs=probs, members_of_fold=members_of_fold)


# ---------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------

@dataclass
class Decision:
    setting: str
    baseline: Any
    candidate: Any
    adopted: bool
    gain: Optional[float] = None
    lo: Optional[float] = None
    hi: Optional[float] = None
    cost_s: Optional[float] = None
    reason: str = ""


PredictFn = Callable[[List[str], Any, List[float], Dict[str, List[str]]], Dict[str, np.ndarray]]
CostFn = Callable[[Dict[str, Any]], float]
RefineFn = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


@dataclass
class TuneResult:
    settings: Dict[str, Any]
    decisions: List[Decision]
    tiles: List[str]
    confidence: float
    n_boot: int

    def manifest(self) -> Dict[str, Any]:
        return {"method": f"pooled OOF MCC; adopted when the bootstrap ({self.n_boot} resamples of tiles) "
                          f"lower bound of the gain at {self.confidence:.0%} confidence is > 0; fitted settings "
                          f"cross-fitted over folds",
                "tiles": list(self.tiles), "settings": self.settings,
                "decisions": [asdict(d) for d in self.decisions]}


def render_decision_rows(decisions: Sequence[Mapping[str, Any]]) -> List[str]:
    """One line per decision (kept value, gain, interval, cost, why), from manifest dicts."""
    lines = [f"{'setting':<15} {'kept':<28} {'gain':>8} {'interval':>19} {'s/tile':>7}  why"]
    for d in decisions:
        kept = d["candidate"] if d["adopted"] else d["baseline"]
        g = "" if d["gain"] is None else f"{d['gain']:+.4f}"
        iv = "" if d["lo"] is None else f"[{d['lo']:+.4f}, {d['hi']:+.4f}]"
        c = "" if d["cost_s"] is None else f"{d['cost_s']:.2f}"
        lines.append(f"{d['setting']:<15} {str(kept)[:28]:<28} {g:>8} {iv:>19} {c:>7}  {d['reason']}")
    return lines


def render_decisions(res: TuneResult) -> str:
    """The table the build prints."""
    return "\n".join(render_decision_rows([asdict(d) for d in res.decisions]))


def _folds_split(oof: OOFSet) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for k in oof.keys:
        out.setdefault(oof.fold_of[k], []).append(k)
    return out


def _fit_postprocess(presets: Mapping[str, List[Dict[str, Any]]], ids: Mapping[str, np.ndarray],
                     labels: Mapping[str, np.ndarray], keys: Sequence[str], k: int) -> str:
    from glacier_runtime import postprocess

    best, best_m = "none", -2.0
    for name, rules in presets.items():
        cm = tile_confusions([postprocess.apply(ids[t], rules, k) for t in keys], [labels[t] for t in keys], k)
        m = float(mcc_batch(cm.sum(0, keepdims=True))[0])
        if m > best_m + 1e-12:
            best, best_m = name, m
    return best


def tune(oof: OOFSet, n_classes: int, *, predict: Optional[PredictFn] = None, cost: Optional[CostFn] = None,
         time_budget: Optional[float] = None, tta_candidates: Sequence[str] = ("none", "flips", "d4"),
         scale_candidates: Sequence[Sequence[float]] = ((1.0,), (0.75, 1.0, 1.25)),
         presets: Optional[Mapping[str, List[Dict[str, Any]]]] = None, confidence: float = 0.95,
         n_boot: int = 1000, seed: int = 0, max_pixels: int = 2_000_000,
         refine: Optional[RefineFn] = None) -> TuneResult:
    """Choose seeds per fold, TTA views, scales, bias and post-processing from OOF evidence.

    ``predict(keys, tta, scales, members)`` re-predicts the given OOF tiles, each with its
    own fold's kept members (``members``: fold -> member names), and returns ``{tile: (K, H, W) probabilities}`` (masked pixels
    as background); without it the saved OOF probabilities are used and TTA and scales
    are not tuned. ``cost(settings)`` gives the bundle's seconds per tile. ``refine(probs)``
    applies the CRF to ``{tile: probabilities}`` (it needs the tiles' bands); without it the
    CRF is not offered.
    """
    from glacier_runtime import postprocess

    if not oof.keys:
        raise ValueError("no out-of-fold predictions with labels beside the members: train with "
                         "`glacier-train cv` (it writes weights/oof/) or build without --tune oof")
    k = n_classes
    keys = oof.keys
    labels = [oof.labels[t] for t in keys]
    decisions: List[Decision] = []
    settings: Dict[str, Any] = {"members": None, "tta": "none", "scales": [1.0], "bias": None, "postprocess": "none",
                                "crf": False}

    def cms(probs: Mapping[str, np.ndarray], bias=None, rules=None) -> np.ndarray:
        preds = []
        for t in keys:
            ids = decide_ids(probs[t], bias)
            preds.append(postprocess.apply(ids, rules, k) if rules else ids)
        return tile_confusions(preds, labels, k)

    def judge(name: str, base_val, cand_val, base_cm, cand_cm, cost_s=None, extra="") -> bool:
        g = bootstrap_gain(base_cm, cand_cm, n_boot=n_boot, confidence=confidence, seed=seed)
        ok = g.lo > 0
        why = (f"lower bound {g.lo:+.4f} > 0" if ok else f"lower bound {g.lo:+.4f} <= 0: simpler setting stays") + extra
        decisions.append(Decision(name, base_val, cand_val, ok, g.gain, g.lo, g.hi, cost_s, why))
        return ok

    def over_budget(s: Dict[str, Any]) -> Optional[float]:
        if cost is None:
            return None
        return float(cost(s))

    def attempt(name: str, base_val, cand_val, s: Dict[str, Any],
                make: Callable[[], Dict[str, np.ndarray]]) -> Optional[Dict[str, np.ndarray]]:
        """One move from the current setting to ``s``: refused (never computed) over the
        time budget, else ``make()`` judged against the current probabilities; returns the
        candidate's probabilities when adopted."""
        c = over_budget(s)
        if time_budget is not None and c is not None and c > time_budget:
            decisions.append(Decision(name, base_val, cand_val, False, cost_s=c,
                                      reason=f"{c:.2f} s/tile over the {time_budget:.2f} s budget"))
            return None
        cand = make()
        return cand if judge(name, base_val, cand_val, cms(current), cms(cand), c) else None

    # 1. seeds per fold: one member per fold (the first seed) vs the mean of every seed
    per_fold = {f: sorted(ms) for f, ms in oof.members_of_fold.items()}

    def ensemble_probs(use: Mapping[int, List[str]]) -> Dict[str, np.ndarray]:
        out = {}
        for t in keys:
            ps = [oof.probs[m][t] for m in use.get(oof.fold_of[t], []) if t in oof.probs.get(m, {})]
            out[t] = np.mean(ps, 0) if ps else None
        return out

    one = {f: ms[:1] for f, ms in per_fold.items()}
    current = ensemble_probs(one)
    if any(v is None for v in current.values()):  # the first seed lacks a tile: use every member
        one = per_fold
        current = ensemble_probs(per_fold)
    settings["members"] = {str(f): ms for f, ms in one.items()}
    if any(len(ms) > 1 for ms in per_fold.values()):
        every = ensemble_probs(per_fold)
        if all(v is not None for v in every.values()):
            s_all = dict(settings, members={str(f): ms for f, ms in per_fold.items()})
            if attempt("seeds per fold", "1", "all", s_all, lambda: every) is not None:
                settings["members"], current = s_all["members"], every
    else:
        decisions.append(Decision("seeds per fold", "1", "1", False, reason="one member per fold: nothing to choose"))

    # 2./3. TTA views, then scales (re-predicted with each tile's own fold members)
    if predict is not None:
        current = predict(keys, "none", [1.0], settings["members"])
        for tta in [t for t in tta_candidates if t != "none"]:
            got = attempt("tta", settings["tta"], tta, dict(settings, tta=tta),
                          lambda: predict(keys, tta, list(settings["scales"]), settings["members"]))
            if got is not None:
                settings["tta"], current = tta, got
        for sc in [list(map(float, s)) for s in scale_candidates if list(s) != [1.0]]:
            got = attempt("scales", settings["scales"], sc, dict(settings, scales=sc),
                          lambda: predict(keys, settings["tta"], sc, settings["members"]))
            if got is not None:
                settings["scales"], current = sc, got
    else:
        decisions.append(Decision("tta", "none", "none", False,
                                  reason="no training tiles to re-predict (give --tune-data): TTA and scales not tuned"))

    # 3b. CRF refinement of the merged probabilities (fixed parameters: nothing is fitted)
    if refine is not None:
        got = attempt("crf", False, True, dict(settings, crf=True), lambda: refine(current))
        if got is not None:
            settings["crf"], current = True, got
    else:
        decisions.append(Decision("crf", False, False, False,
                                  reason="no training tiles for the appearance term (give --tune-data): CRF not tried"))

    # 4. class bias, cross-fitted over folds
    split = _folds_split(oof)
    if len(split) >= 2:
        cross: Dict[str, np.ndarray] = {}
        for f, fkeys in split.items():
            fit_keys = [t for t in keys if oof.fold_of[t] != f]
            lp, y = _logp([current[t] for t in fit_keys], [oof.labels[t] for t in fit_keys], max_pixels, seed)
            b = fit_bias(lp, y)
            for t in fkeys:
                cross[t] = decide_ids(current[t], b)
        base_cm = cms(current)
        cand_cm = tile_confusions([cross[t] for t in keys], labels, k)
        lp, y = _logp([current[t] for t in keys], labels, max_pixels, seed)
        final = fit_bias(lp, y)
        if any(v != 0 for v in final) and judge("bias", [0.0] * k, final, base_cm, cand_cm, None,
                                                 " (gain cross-fitted over folds)"):
            settings["bias"] = final
        elif all(v == 0 for v in final):
            decisions.append(Decision("bias", [0.0] * k, final, False, reason="no class moves by the minimum gain"))
    else:
        decisions.append(Decision("bias", None, None, False, reason="one fold only: cannot cross-fit"))

    # 5. post-processing preset, chosen per fold on the other folds, then judged
    if presets and len(split) >= 2:
        ids = {t: decide_ids(current[t], settings["bias"]) for t in keys}
        cross_ids = {}
        for f, fkeys in split.items():
            pick = _fit_postprocess(presets, ids, oof.labels, [t for t in keys if oof.fold_of[t] != f], k)
            for t in fkeys:
                cross_ids[t] = postprocess.apply(ids[t], presets[pick], k)
        final = _fit_postprocess(presets, ids, oof.labels, keys, k)
        if final != "none":
            c = over_budget(dict(settings, postprocess=final))
            if judge("postprocess", "none", final, tile_confusions([ids[t] for t in keys], labels, k),
                     tile_confusions([cross_ids[t] for t in keys], labels, k), c, " (choice cross-fitted over folds)"):
                settings["postprocess"] = final
        else:
            decisions.append(Decision("postprocess", "none", "none", False, reason="no preset beats none on OOF"))
    return TuneResult(settings=settings, decisions=decisions, tiles=list(keys), confidence=confidence, n_boot=n_boot)
