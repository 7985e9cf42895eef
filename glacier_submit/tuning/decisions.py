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

Each decision is one function ``(state) -> [Decision]``, and :data:`DECISIONS` runs them in
a fixed order, each on top of the ones adopted before it: seeds per fold -> TTA views ->
scales -> CRF -> class bias -> post-processing. A new decision is one function and one
line. Candidates whose measured cost (seconds per tile for the whole bundle) exceeds the
time budget are not tried.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from glacier_runtime import postprocess
from glacier_runtime.decision import decide
from glacier_submit.tuning.bias import fit_bias, logp_pixels
from glacier_submit.tuning.stats import bootstrap_gain
from training.metrics import mcc_batch, tile_confusions
from training.rundir import OOFSet

log = logging.getLogger("glacier.tune")

PredictFn = Callable[[List[str], Any, List[float], Dict[str, List[str]]], Dict[str, np.ndarray]]
CostFn = Callable[[Dict[str, Any]], float]
RefineFn = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


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


@dataclass
class TuneResult:
    settings: Dict[str, Any]
    decisions: List[Decision]
    tiles: List[str]
    confidence: float
    n_boot: int
    shift: str = ""          # what the OOF evidence can say about a regional shift (evidence.shift_statement)

    def manifest(self) -> Dict[str, Any]:
        return {"shift": self.shift, "method": f"pooled OOF MCC; adopted when the bootstrap ({self.n_boot} resamples of tiles) "
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
    """The table the build prints, under what its evidence can say about a regional shift."""
    return "\n".join(([res.shift] if res.shift else []) + render_decision_rows([asdict(d) for d in res.decisions]))


# ---- the state every decision reads and moves ---------------------------------------------------
@dataclass
class TuneState:
    """The evidence, the settings adopted so far and the probabilities they give."""
    oof: OOFSet
    k: int
    predict: Optional[PredictFn] = None
    cost: Optional[CostFn] = None
    refine: Optional[RefineFn] = None
    time_budget: Optional[float] = None
    tta_candidates: Sequence[str] = ("none", "flips", "d4")
    scale_candidates: Sequence[Sequence[float]] = ((1.0,), (0.75, 1.0, 1.25))
    presets: Optional[Mapping[str, List[Dict[str, Any]]]] = None
    confidence: float = 0.95
    n_boot: int = 1000
    seed: int = 0
    max_pixels: int = 2_000_000
    settings: Dict[str, Any] = field(default_factory=lambda: {
        "members": None, "tta": "none", "scales": [1.0], "bias": None, "postprocess": "none", "crf": False})
    current: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def keys(self) -> List[str]:
        return self.oof.keys

    @property
    def labels(self) -> List[np.ndarray]:
        return [self.oof.labels[t] for t in self.keys]

    def folds(self) -> Dict[int, List[str]]:
        """fold -> its OOF tiles."""
        out: Dict[int, List[str]] = {}
        for t in self.keys:
            out.setdefault(self.oof.fold_of[t], []).append(t)
        return out

    def cms(self, probs: Mapping[str, np.ndarray], bias=None, rules=None) -> np.ndarray:
        """Per-tile confusions of the runtime's decision (and post-processing) on ``probs``."""
        preds = []
        for t in self.keys:
            ids = decide(probs[t], bias)
            preds.append(postprocess.apply(ids, rules, self.k) if rules else ids)
        return tile_confusions(preds, self.labels, self.k)

    def judge(self, name: str, base_val, cand_val, base_cm, cand_cm, cost_s=None, extra="") -> Decision:
        g = bootstrap_gain(base_cm, cand_cm, n_boot=self.n_boot, confidence=self.confidence, seed=self.seed)
        ok = g.lo > 0
        why = (f"lower bound {g.lo:+.4f} > 0" if ok else f"lower bound {g.lo:+.4f} <= 0: simpler setting stays") + extra
        return Decision(name, base_val, cand_val, ok, g.gain, g.lo, g.hi, cost_s, why)

    def cost_of(self, s: Dict[str, Any]) -> Optional[float]:
        return None if self.cost is None else float(self.cost(s))

    def attempt(self, name: str, base_val, cand_val, s: Dict[str, Any],
                make: Callable[[], Dict[str, np.ndarray]]) -> Decision:
        """One move from the current setting to ``s``: refused (never computed) over the time
        budget, else ``make()`` judged against the current probabilities; when adopted the
        candidate's probabilities become current."""
        c = self.cost_of(s)
        if self.time_budget is not None and c is not None and c > self.time_budget:
            return Decision(name, base_val, cand_val, False, cost_s=c,
                            reason=f"{c:.2f} s/tile over the {self.time_budget:.2f} s budget")
        cand = make()
        d = self.judge(name, base_val, cand_val, self.cms(self.current), self.cms(cand), c)
        if d.adopted:
            self.current = cand
        return d

    def logp(self, keys: Sequence[str]):
        return logp_pixels([self.current[t] for t in keys], [self.oof.labels[t] for t in keys],
                           self.max_pixels, self.seed)


# ---- the decisions, in their order ------------------------------------------------------------
def _ensemble_probs(st: TuneState, use: Mapping[int, List[str]]) -> Dict[str, Optional[np.ndarray]]:
    return {t: st.oof.mean_probs(t, use.get(st.oof.fold_of[t], [])) for t in st.keys}


def decide_seeds(st: TuneState) -> List[Decision]:
    """One member per fold (the first seed) against the mean of every seed of the fold."""
    per_fold = {f: sorted(ms) for f, ms in st.oof.members_of_fold.items()}
    one = {f: ms[:1] for f, ms in per_fold.items()}
    st.current = _ensemble_probs(st, one)
    if any(v is None for v in st.current.values()):  # the first seed lacks a tile: use every member
        one = per_fold
        st.current = _ensemble_probs(st, per_fold)
    st.settings["members"] = {str(f): ms for f, ms in one.items()}
    if not any(len(ms) > 1 for ms in per_fold.values()):
        return [Decision("seeds per fold", "1", "1", False, reason="one member per fold: nothing to choose")]
    every = _ensemble_probs(st, per_fold)
    if not all(v is not None for v in every.values()):
        return []
    s_all = dict(st.settings, members={str(f): ms for f, ms in per_fold.items()})
    d = st.attempt("seeds per fold", "1", "all", s_all, lambda: every)
    if d.adopted:
        st.settings["members"] = s_all["members"]
    return [d]


def decide_tta(st: TuneState) -> List[Decision]:
    """TTA views, each tile re-predicted with its own fold's kept members."""
    if st.predict is None:
        return [Decision("tta", "none", "none", False,
                         reason="no training tiles to re-predict (give --tune-data): TTA and scales not tuned")]
    st.current = st.predict(st.keys, "none", [1.0], st.settings["members"])
    out = []
    for tta in [t for t in st.tta_candidates if t != "none"]:
        d = st.attempt("tta", st.settings["tta"], tta, dict(st.settings, tta=tta),
                       lambda tta=tta: st.predict(st.keys, tta, list(st.settings["scales"]), st.settings["members"]))
        if d.adopted:
            st.settings["tta"] = tta
        out.append(d)
    return out


def decide_scales(st: TuneState) -> List[Decision]:
    """Multi-scale inference on top of the chosen views."""
    if st.predict is None:
        return []
    out = []
    for sc in [list(map(float, s)) for s in st.scale_candidates if list(s) != [1.0]]:
        d = st.attempt("scales", st.settings["scales"], sc, dict(st.settings, scales=sc),
                       lambda sc=sc: st.predict(st.keys, st.settings["tta"], sc, st.settings["members"]))
        if d.adopted:
            st.settings["scales"] = sc
        out.append(d)
    return out


def decide_crf(st: TuneState) -> List[Decision]:
    """CRF refinement of the merged probabilities (fixed parameters: nothing is fitted)."""
    if st.refine is None:
        return [Decision("crf", False, False, False,
                         reason="no training tiles for the appearance term (give --tune-data): CRF not tried")]
    d = st.attempt("crf", False, True, dict(st.settings, crf=True), lambda: st.refine(st.current))
    if d.adopted:
        st.settings["crf"] = True
    return [d]


def decide_bias(st: TuneState) -> List[Decision]:
    """The class bias, its gain cross-fitted over folds, the final value fitted on every tile."""
    split = st.folds()
    if len(split) < 2:
        return [Decision("bias", None, None, False, reason="one fold only: cannot cross-fit")]
    cross: Dict[str, np.ndarray] = {}
    for f, fkeys in split.items():
        b = fit_bias(*st.logp([t for t in st.keys if st.oof.fold_of[t] != f]))
        for t in fkeys:
            cross[t] = decide(st.current[t], b)
    base_cm = st.cms(st.current)
    cand_cm = tile_confusions([cross[t] for t in st.keys], st.labels, st.k)
    final = fit_bias(*st.logp(st.keys))
    if all(v == 0 for v in final):
        return [Decision("bias", [0.0] * st.k, final, False, reason="no class moves by the minimum gain")]
    d = st.judge("bias", [0.0] * st.k, final, base_cm, cand_cm, None, " (gain cross-fitted over folds)")
    if d.adopted:
        st.settings["bias"] = final
    return [d]


def _best_preset(st: TuneState, ids: Mapping[str, np.ndarray], keys: Sequence[str]) -> str:
    best, best_m = "none", -2.0
    for name, rules in st.presets.items():
        cm = tile_confusions([postprocess.apply(ids[t], rules, st.k) for t in keys],
                             [st.oof.labels[t] for t in keys], st.k)
        m = float(mcc_batch(cm.sum(0)))
        if m > best_m + 1e-12:
            best, best_m = name, m
    return best


def decide_postprocess(st: TuneState) -> List[Decision]:
    """A post-processing preset, chosen per fold on the other folds, then judged."""
    split = st.folds()
    if not st.presets or len(split) < 2:
        return []
    ids = {t: decide(st.current[t], st.settings["bias"]) for t in st.keys}
    cross_ids = {}
    for f, fkeys in split.items():
        pick = _best_preset(st, ids, [t for t in st.keys if st.oof.fold_of[t] != f])
        for t in fkeys:
            cross_ids[t] = postprocess.apply(ids[t], st.presets[pick], st.k)
    final = _best_preset(st, ids, st.keys)
    if final == "none":
        return [Decision("postprocess", "none", "none", False, reason="no preset beats none on OOF")]
    c = st.cost_of(dict(st.settings, postprocess=final))
    d = st.judge("postprocess", "none", final, tile_confusions([ids[t] for t in st.keys], st.labels, st.k),
                 tile_confusions([cross_ids[t] for t in st.keys], st.labels, st.k), c,
                 " (choice cross-fitted over folds)")
    if d.adopted:
        st.settings["postprocess"] = final
    return [d]


#: The decisions in the order they run; each sees the settings the ones before it adopted.
DECISIONS: Sequence[Callable[[TuneState], List[Decision]]] = (
    decide_seeds, decide_tta, decide_scales, decide_crf, decide_bias, decide_postprocess)


def tune(oof: OOFSet, n_classes: int, **options: Any) -> TuneResult:
    """Choose seeds per fold, TTA views, scales, CRF, bias and post-processing from OOF evidence.

    ``predict(keys, tta, scales, members)`` re-predicts the given OOF tiles, each with its own
    fold's kept members (``members``: fold -> member names), and returns ``{tile: (K, H, W)
    probabilities}`` (masked pixels as background); without it the saved OOF probabilities are
    used and TTA and scales are not tuned. ``cost(settings)`` gives the bundle's seconds per
    tile. ``refine(probs)`` applies the CRF to ``{tile: probabilities}`` (it needs the tiles'
    bands); without it the CRF is not offered. Other options: the fields of :class:`TuneState`.
    """
    if not oof.keys:
        raise ValueError("no out-of-fold predictions with labels beside the members: train with "
                         "`glacier-train cv` (it writes weights/oof/) or build without --tune oof")
    st = TuneState(oof, n_classes, **options)
    decisions: List[Decision] = []
    for step in DECISIONS:
        decisions.extend(step(st))
    return TuneResult(settings=st.settings, decisions=decisions, tiles=list(oof.keys), confidence=st.confidence,
                      n_boot=st.n_boot)
