"""``manifest.json``: its schema (stdlib dataclasses), written by ``build`` and read by
``evaluate`` and the report, and the summary the build prints.

:meth:`Manifest.to_dict` gives the JSON; :meth:`Manifest.from_dict` reads it back, tolerant
of manifests written by older versions (a missing field takes its default).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar

from glacier_submit.selection import MB, MB_UNIT

T = TypeVar("T")


def _from(cls: Type[T], d: Optional[Mapping[str, Any]]) -> T:
    """``cls`` from a dict: known fields taken, missing ones at their default (None if none)."""
    d = d or {}
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kw[f.name] = d[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw[f.name] = None
    return cls(**kw)


@dataclass
class MemberRecord:
    name: str
    fold: int
    seed: int
    arch: str
    encoder: str
    val_mcc: Optional[float]
    weight: float
    train_tiles: List[str] = field(default_factory=list)
    val_tiles: List[str] = field(default_factory=list)
    sha: Optional[str] = None
    source: Optional[str] = None
    train_sha256: List[str] = field(default_factory=list)  # content fingerprints of train_tiles


@dataclass
class Selection:
    rule: str = ""
    max_members: Optional[int] = None
    table: List[Dict[str, Any]] = field(default_factory=list)   # one row per member: kept or dropped, why
    folds: List[int] = field(default_factory=list)
    folds_missing: List[int] = field(default_factory=list)


@dataclass
class BiasInfo:
    mode: str = "none"
    values: Optional[List[float]] = None
    oof_tiles: Optional[int] = None
    oof_mcc_before: Optional[float] = None
    oof_mcc_after: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Runtime:
    backend: str = "torch"
    precision: str = "fp32"
    fp16_agreement: Optional[float] = None
    int8: Optional[Dict[str, Any]] = None
    onnx_parity: Dict[str, Any] = field(default_factory=dict)
    single_file: bool = False
    built_with: Dict[str, str] = field(default_factory=dict)


@dataclass
class Budget:
    max_mb: float = 300.0
    time_budget_s: Optional[float] = None


@dataclass
class Timing:
    device: str = "cpu"
    machine: str = ""
    check_tile: List[int] = field(default_factory=list)
    load_s: float = 0.0
    tile_s: float = 0.0
    forward_views: int = 0
    test_tiles: int = 0
    estimated_total_s: float = 0.0


@dataclass
class Manifest:
    tool: str = "glacier-submit"
    tool_version: str = ""
    built: str = ""
    members: List[MemberRecord] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    tta: List[str] = field(default_factory=lambda: ["identity"])    # view names
    scales: List[float] = field(default_factory=lambda: [1.0])
    merge: str = "mean"
    weights: List[float] = field(default_factory=list)
    bias: BiasInfo = field(default_factory=BiasInfo)
    tuned_on_tiles: Dict[str, List[str]] = field(default_factory=dict)  # setting -> tiles it was fitted on
    tuned_on_sha256: Dict[str, List[str]] = field(default_factory=dict)  # the same tiles by content
    postprocess: List[Dict[str, Any]] = field(default_factory=list)
    postprocess_preset: Optional[str] = None
    crf: Optional[Dict[str, Any]] = None
    adapt: Optional[str] = None                                      # "bn": test-time batch-norm adaptation
    tuning: Optional[Dict[str, Any]] = None                          # build --tune oof: decisions and tiles
    normalisation: Dict[str, Any] = field(default_factory=dict)      # member -> its statistics
    class_map: Dict[str, List[Any]] = field(default_factory=dict)
    bands: List[str] = field(default_factory=list)
    runtime: Runtime = field(default_factory=Runtime)
    budget: Budget = field(default_factory=Budget)
    timing: Timing = field(default_factory=Timing)
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> {bytes, sha256}
    notes: List[str] = field(default_factory=list)

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["members"] = [dataclasses.asdict(m) for m in self.members]
        for k in ("selection", "runtime", "budget", "timing"):
            d[k] = dataclasses.asdict(d[k])
        d["bias"] = self.bias.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        m = _from(cls, d)
        m.members = [_from(MemberRecord, r) for r in (d.get("members") or [])]
        m.selection = _from(Selection, d.get("selection"))
        m.bias = _from(BiasInfo, d.get("bias"))
        m.runtime = _from(Runtime, d.get("runtime"))
        m.budget = _from(Budget, d.get("budget"))
        m.timing = _from(Timing, d.get("timing"))
        for k in ("tuned_on_tiles", "tuned_on_sha256", "files", "normalisation", "class_map"):
            setattr(m, k, dict(d.get(k) or {}))
        m.notes = list(d.get("notes") or [])
        return m

    @classmethod
    def load(cls, bundle: str) -> "Manifest":
        """``bundle/manifest.json``; FileNotFoundError names the fix."""
        path = os.path.join(bundle, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{bundle} has no manifest.json; build it with `glacier-submit build`")
        with open(path) as fh:
            return cls.from_dict(json.load(fh))

    # -- what evaluate asks of it ------------------------------------------------------------
    @property
    def class_values(self) -> List[int]:
        return list(self.class_map.get("values") or [])

    def member_folders(self) -> List[str]:
        """The run folders the members came from (still there, or not)."""
        return sorted({os.path.dirname(str(m.source)) for m in self.members if m.source})


def render_manifest(m: Any) -> str:
    """The build's printed summary: which members were kept or dropped and why, then the
    kept members, inference settings, size and time (``m``: a Manifest or its dict)."""
    from glacier_submit.selection import render_table

    m = m if isinstance(m, Manifest) else Manifest.from_dict(m)
    lines = []
    if m.selection.table:
        sel = m.selection
        kept = sum(r["kept"] for r in sel.table)
        lines += [f"members: kept {kept} of {len(sel.table)} (folds {sel.folds}"
                  + (f", missing {sel.folds_missing}" if sel.folds_missing else ", all represented") + ")",
                  render_table(sel.table), ""]
    lines += [f"{'member':<16} {'fold':>4} {'seed':>4} {'arch':<16} {'val MCC':>8} {'weight':>7}"]
    for e in m.members:  # older or hand-made manifests may lack fields: '-' then
        mcc = e.val_mcc if e.val_mcc is not None else float("nan")
        arch = f"{e.arch or '?'}/{e.encoder or '?'}"
        lines.append(f"{e.name:<16} {_or_dash(e.fold):>4} {_or_dash(e.seed):>4} {arch:<16} {mcc:>8.4f} "
                     f"{(e.weight if e.weight is not None else float('nan')):>7.3f}")
    lines += ["", _settings_line(m), _bias_line(m.bias), _runtime_line(m.runtime),
              f"size {sum(f['bytes'] for f in m.files.values()) / MB:.1f} of {m.budget.max_mb:.0f} {MB_UNIT}",
              _timing_line(m.timing)]
    if m.tuning:
        from glacier_submit.tuning.decisions import render_decision_rows

        lines += ["", f"--tune oof on {len(m.tuning['tiles'])} out-of-fold tiles ({m.tuning['method']}):"]
        lines += ([m.tuning["shift"]] if m.tuning.get("shift") else []) + render_decision_rows(m.tuning["decisions"])
    lines += [f"note: {n}" for n in m.notes]
    return "\n".join(lines)


def _settings_line(m: Manifest) -> str:
    return (f"TTA {len(m.tta)} views ({', '.join(m.tta)}) x scales {m.scales}, merge {m.merge}, "
            f"post-processing {m.postprocess_preset or 'none'} ({len(m.postprocess)} rules)"
            + (", CRF on" if m.crf else "") + (", batch-norm adaptation on the test tiles" if m.adapt else ""))


def _bias_line(b: BiasInfo) -> str:
    return (f"bias: {b.mode}" + (f" {[round(v, 2) for v in b.values]}" if b.values else "")
            + (f" (OOF MCC {b.oof_mcc_before:.4f} -> {b.oof_mcc_after:.4f})" if b.oof_mcc_after is not None else ""))


def _runtime_line(r: Runtime) -> str:
    line = f"backend {r.backend}, weights {r.precision}"
    if r.fp16_agreement is not None:
        line += f" (fp16 vs fp32 class agreement {r.fp16_agreement * 100:.3f} %)"
    if r.int8:
        line += (f" (int8 vs fp32 class agreement {r.int8['agreement'] * 100:.3f} % on {len(r.int8['agreement_tiles'])} "
                 f"tiles, threshold {r.int8['min_agreement']:g} %; needs onnxruntime where it runs)")
    return line


def _or_dash(v) -> str:
    return "-" if v is None else str(v)


def _timing_line(t: Timing) -> str:
    tile = f"{t.check_tile[1]}x{t.check_tile[2]}" if len(t.check_tile or []) == 3 else "check"
    return (f"time on {t.device} ({t.machine}): load {t.load_s or 0:.2f} s, {t.tile_s or 0:.2f} s per "
            f"{tile} tile -> ~{t.estimated_total_s or 0:.0f} s for {t.test_tiles} tiles")
