"""``glacier-submit build``: members -> solution.py + model.pth + manifest.json + zip.

A pipeline of named steps over a frozen :class:`BuildOptions`; each step takes the
:class:`BuildPlan` the steps before it made and returns it moved one step on:

1. ``check_options``: the arguments, and what int8 needs, before anything is read;
2. ``load``: member checkpoints (pre-training ones skipped), weights, post-processing;
3. ``choose_backend``: torch or ONNX (members exported and parity-checked), the check tile;
4. ``choose_precision``: fp16 when fp32 is over the size budget;
5. ``choose_members``: the strongest under the size budget, every fold represented;
6. ``tune``: with ``--tune oof``, the settings from out-of-fold evidence;
7. ``switch_to_int8``: with ``--allow-int8``, int8 when fp32 is too slow;
8. ``fit_time``: the time budget (TTA/scales first, then members);
9. ``fit_bias``: the class bias, given or fitted;
10. ``render``: solution.py and model.pth, and the upload checked against ``--max-mb``;
11. ``publish``: the manifest, and the four files replacing ``out`` as one set.

Nothing in ``out`` changes before every budget is met.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform as _pyplatform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from glacier_runtime.crf import validate_crf
from glacier_runtime.settings import InferenceSettings
from glacier_runtime.tta import resolve_views
from glacier_submit import __version__, quantize, timing
from glacier_submit.manifest import BiasInfo, Budget, Manifest, MemberRecord, Runtime, Selection, Timing
from glacier_submit.members import cast_payload, load_members, make_payload
from glacier_submit.postprocessing import all_presets, load_postprocess
from glacier_submit.publish import prepare_out, publish_bundle, sha256, zip_bundle
from glacier_submit.selection import SELECTION_DOC, folds_missing
from glacier_submit import sizing
from glacier_submit.sizing import MB, BudgetError, blob_budget, check_upload, fp16_agreement, serialise

__all__ = ["BuildOptions", "BuildPlan", "BudgetError", "STEPS", "build"]

log = logging.getLogger("glacier.build")


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``glacier-submit build`` was asked for (the CLI's flags, typed)."""
    models: Tuple[str, ...]
    out: str
    tta: Any = "none"
    scales: Tuple[float, ...] = (1.0,)
    merge: str = "mean"
    weights: Optional[Tuple[float, ...]] = None
    postprocess: Optional[str] = "none"
    backend: str = "auto"
    max_mb: float = 300.0
    time_budget: Optional[float] = None
    test_tiles: int = 100
    precision: str = "auto"
    bias: Any = "auto"                    # auto | none | per-class values
    check_data: Optional[str] = None
    single_file: bool = False
    device: str = "cpu"
    window: int = 1024
    max_members: Optional[int] = None
    check_size: Tuple[int, int] = (512, 512)
    tune: Optional[str] = None            # None | "oof"
    tune_data: Optional[str] = None
    tune_confidence: float = 0.95
    calib_data: Optional[str] = None
    int8_min_agreement: float = 99.5
    allow_int8: bool = False
    crf: bool = False
    adapt: Optional[str] = None           # None | "bn": test-time batch-norm adaptation in the bundle

    @property
    def calib(self) -> Optional[str]:
        """Calibration tiles for int8: ``calib_data``, else the training folder of ``--tune-data``."""
        return self.calib_data or self.tune_data

    @property
    def budget_bytes(self) -> int:
        return int(self.max_mb * MB)


@dataclass
class BuildPlan:
    """What the steps have decided so far."""
    notes: List[str] = field(default_factory=list)
    entries: List[Dict[str, Any]] = field(default_factory=list)   # members still in the bundle
    merge: str = "mean"
    rules: List[Dict[str, Any]] = field(default_factory=list)
    postprocess_preset: Optional[str] = None
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    backend: str = "auto"
    parity: Dict[str, Any] = field(default_factory=dict)
    pip: List[str] = field(default_factory=list)
    tile: Optional[np.ndarray] = None
    int8: bool = False
    calib_used: Dict[str, List[str]] = field(default_factory=dict)
    fp32_blobs: Dict[str, Any] = field(default_factory=dict)
    room: int = 0                         # bytes model.pth may take
    fp16: bool = False
    fp16_agreement: Optional[float] = None
    int8_info: Optional[Dict[str, Any]] = None
    table: List[Dict[str, Any]] = field(default_factory=list)     # the member selection table
    payload: Dict[str, Any] = field(default_factory=dict)
    tuning: Any = None                    # TuneResult of --tune oof
    timing: Dict[str, float] = field(default_factory=dict)
    bias: BiasInfo = field(default_factory=BiasInfo)
    tuned_on: Dict[str, List[str]] = field(default_factory=dict)  # setting -> tiles (evaluate's leak guard)
    source: bytes = b""
    blob: bytes = b""
    manifest: Optional[Manifest] = None
    echo: Callable[[str], None] = log.info   # progress lines (--tune oof)

    @property
    def kept(self) -> set:
        return {r["name"] for r in self.table if r["kept"]}

    def keep_only(self, names: set) -> None:
        self.entries = [e for e in self.entries if e["name"] in names]
        if self.payload:
            self.payload["members"] = [e for e in self.payload["members"] if e["name"] in names]


Step = Callable[[BuildOptions, BuildPlan], BuildPlan]


# ---- 1-3: options, members, backend ---------------------------------------------------------------
def check_options(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """The arguments, and what int8 needs, before any checkpoint is read."""
    prepare_out(o.out)
    if o.tune not in (None, "oof"):
        raise ValueError(f"--tune must be none or oof, got {o.tune!r}")
    if o.max_members is not None and o.max_members < 1:
        raise ValueError(f"--max-members must be at least 1 (got {o.max_members})")
    if o.precision not in ("auto", "fp32", "fp16", "int8"):
        raise ValueError(f"--precision must be auto, fp32, fp16 or int8, got {o.precision!r}")
    p.int8, p.backend = o.precision == "int8", o.backend
    if o.adapt not in (None, "none", "bn"):
        raise ValueError(f"--adapt must be none or bn, got {o.adapt!r}")
    if o.adapt == "bn":
        if p.int8 or o.backend == "onnx" or o.allow_int8:
            raise ValueError("--adapt bn re-estimates batch norm inside the torch model; an ONNX graph has it folded "
                             "in: build with --backend torch (or auto) and without --precision int8 / --allow-int8")
        p.backend = "torch"
    if p.int8:
        p.backend = quantize.int8_backend(o.backend, o.calib, p.notes)
    elif o.allow_int8:
        quantize.check_allow_int8(o.precision, o.backend, o.time_budget, o.calib)
    return p


def load(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """Members, their ensemble weights, the post-processing rules and the inference settings."""
    p.entries = load_members(o.models, p.notes)
    if p.int8 or o.allow_int8:
        quantize.check_calibration(p.entries, o.calib)
    p.merge = o.merge
    if o.weights is not None:
        if len(o.weights) != len(p.entries):
            raise ValueError(f"--weights has {len(o.weights)} values for {len(p.entries)} members")
        for e, w in zip(p.entries, o.weights):
            e["weight"] = float(w)
        p.merge = "weighted"
    resolve_views(o.tta)  # validate early
    p.rules, p.postprocess_preset = load_postprocess(o.postprocess), o.postprocess
    p.inference = InferenceSettings(tta=o.tta, scales=[float(s) for s in o.scales], merge=p.merge, window=o.window,
                                    postprocess=p.rules, crf=validate_crf({"enabled": True}) if o.crf else None,
                                    adapt="bn" if o.adapt == "bn" else None)
    return p


def choose_backend(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """torch or ONNX (every member exported and parity-checked); the check tile; int8 graphs."""
    from glacier_submit.export import prepare_backend

    p.backend, p.parity = prepare_backend(p.entries, p.backend)
    p.tile = timing.check_tile(p.entries[0]["stats"], o.check_data, o.check_size)
    p.pip = ["onnxruntime"] if p.backend == "onnx" else []
    if p.int8:
        p.calib_used, p.fp32_blobs = quantize.quantize_entries(p.entries, o.calib)
    return p


# ---- 4-5: the size budget ------------------------------------------------------------------------
def choose_precision(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """fp16 when asked, or when every member in fp32 would exceed the room left for model.pth."""
    from glacier_submit.render import render_solution

    p.room = blob_budget(o.budget_bytes, len(render_solution(__version__, p.pip).encode("utf-8")), o.single_file)
    p.fp16 = sizing.choose_precision(p.entries, p.inference.to_dict(), o.precision, p.room, p.notes)
    return p


def choose_members(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """The strongest members under the size budget; the payload; int8 agreement; the fp16 copy."""
    p.table = sizing.choose_members(p.entries, p.inference.to_dict(), p.fp16, p.room, o.max_members)
    p.keep_only(p.kept)
    p.payload = make_payload(p.entries, p.inference.to_dict())
    if p.int8:
        p.int8_info = quantize.int8_agreement(p.payload, p.fp32_blobs, p.calib_used, o.calib, p.tile,
                                              o.int8_min_agreement)
        p.fp32_blobs.clear()
    if p.fp16:
        p16 = cast_payload(p.payload, torch.float16)
        if p.backend == "torch":
            p.fp16_agreement = fp16_agreement(p.payload, p16, p.tile)
        p.payload = p16
    return p


# ---- 6-9: settings, precision switch, time and bias -------------------------------------------------
def tune(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """``--tune oof``: seeds per fold, TTA, scales, CRF, bias and post-processing from OOF evidence."""
    if o.tune != "oof":
        return p
    from glacier_submit.tuning.decisions import render_decisions
    from glacier_submit.tuning.evidence import BuildEvidence

    say = p.echo
    say("tuning on out-of-fold predictions (build --tune oof) ...")
    evidence = BuildEvidence(p.entries, p.payload, p.tile, o.device, all_presets(), o.tune_data, echo=say)
    p.tuning = evidence.tune(o.time_budget, o.tune_confidence)
    st = p.tuning.settings
    say(render_decisions(p.tuning))
    if st.get("members"):
        keep_names = {m for ms in st["members"].values() for m in ms}
        for r in p.table:
            if r["kept"] and r["name"] not in keep_names:
                r.update(kept=False, reason="tune oof: one seed per fold (averaging seeds did not hold up on OOF)")
        p.keep_only(keep_names)
    p.rules, p.postprocess_preset = load_postprocess(st["postprocess"]), st["postprocess"]
    p.inference = dataclasses.replace(p.inference, tta=st["tta"], scales=[float(s) for s in st["scales"]],
                                      postprocess=p.rules, crf=validate_crf({"enabled": True}) if st.get("crf") else None)
    p.payload["inference"] = p.inference.to_dict()
    return p


def switch_to_int8(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """``--allow-int8``: int8 before anything is dropped, when fp32 is too slow and int8 passes."""
    if not o.allow_int8 or p.int8:
        return p
    switched = quantize.consider_int8(p.payload, p.tile, o.device, o.time_budget, o.calib, o.int8_min_agreement,
                                      p.parity, p.notes)
    if switched is not None:
        p.payload, p.int8_info = switched
        p.int8, p.fp16, p.fp16_agreement, p.backend, p.pip = True, False, None, "onnx", ["onnxruntime"]
    return p


def fit_time(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """The time budget: TTA/scales in the documented order, then the weakest members."""
    p.timing, chosen = timing.fit_time(p.payload, p.tile, o.device, p.inference.tta, p.inference.scales,
                                       o.time_budget, p.table, p.notes)
    p.inference = dataclasses.replace(p.inference, tta=chosen[0], scales=chosen[1])
    p.payload["inference"] = p.inference.to_dict()
    if p.timing.get("adapt_s"):
        p.notes.append(f"--adapt bn: {p.timing['adapt_s']:.2f} s per tile re-estimating batch norm (one pass per "
                       "member before predicting), included in the time estimate")
    p.keep_only(p.kept)
    missing = folds_missing(p.table)
    if missing:
        p.notes.append(f"no member of folds {missing} fits the budgets: the bundle covers folds "
                       f"{sorted({e['meta']['fold'] for e in p.entries})} only (raise --max-mb / --max-members)")
    dropped = [r["name"] for r in p.table if not r["kept"]]
    if dropped:
        p.notes.append(f"kept {len(p.entries)} of {len(p.table)} members; dropped {dropped} (reasons in the member table)")
    return p


def fit_bias(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """The class bias: from ``--tune oof``, given, none, or fitted on the members' OOF arrays."""
    if p.tuning is not None:
        values = p.tuning.settings["bias"]
        tiles = list(p.tuning.tiles)
        p.bias = (BiasInfo("tuned on OOF (--tune oof, cross-fitted, regularised)", values, len(tiles)) if values
                  else BiasInfo("none (--tune oof kept 0)"))
        p.tuned_on = {"tuning": tiles, **({"bias": tiles} if values else {})}
    else:
        p.bias, p.tuned_on = auto_bias(o.bias, p.entries, p.notes, crf=bool(p.inference.crf))
    p.inference = dataclasses.replace(p.inference, bias=p.bias.values)
    p.payload["inference"] = p.inference.to_dict()
    return p


def auto_bias(bias: Any, entries: List[Dict[str, Any]], notes: List[str], crf: bool = False):
    """Bias: given, none, or tuned on the out-of-fold predictions beside the members.

    With the CRF on, ``auto`` leaves the bias at 0: the saved OOF probabilities are the
    CRF's input, while the runtime adds the bias to its output (sharper), so a bias fitted
    on them would act on different numbers. ``--tune oof`` fits it after the CRF.
    Returns (BiasInfo, {"bias": tiles it was fitted on}).
    """
    if isinstance(bias, (list, tuple)):
        return BiasInfo("given", [float(b) for b in bias]), {}
    if bias != "auto":
        return BiasInfo("none"), {}
    if crf:
        notes.append("--bias auto left the bias at 0: it would be fitted on the out-of-fold probabilities "
                     "before the CRF, but applied after it; use --tune oof --tune-data DIR (fits the bias "
                     "after the CRF) or give --bias values")
        return BiasInfo("none (--bias auto is not fitted under --crf)"), {}
    from glacier_submit.tuning.bias import tune_bias
    from glacier_submit.tuning.evidence import read_member_oof

    oof = read_member_oof(entries)
    if not oof.keys:
        notes.append("no out-of-fold predictions beside the members: bias left at 0")
        return BiasInfo("none"), {}
    values, before, after = tune_bias([oof.mean_probs(k) for k in oof.keys], [oof.labels[k] for k in oof.keys])
    return (BiasInfo("tuned on OOF (regularised)", values, len(oof.keys), before, after),
            {"bias": list(oof.keys)})


# ---- 10-11: the files --------------------------------------------------------------------------------
def render(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """solution.py and model.pth; the upload must fit ``--max-mb`` (else nothing is written)."""
    from glacier_submit.render import render_solution

    p.blob = serialise(p.payload)
    p.source = render_solution(__version__, p.pip, embedded=p.blob if o.single_file else None).encode("utf-8")
    check_upload(p.source, p.blob, o.single_file, o.budget_bytes, o.max_mb)
    return p


def publish(o: BuildOptions, p: BuildPlan) -> BuildPlan:
    """manifest.json, then solution.py, model.pth and submission.zip replace ``out`` as one set."""
    files = {"solution.py": {"bytes": len(p.source), "sha256": sha256(p.source)}}
    if not o.single_file:
        files["model.pth"] = {"bytes": len(p.blob), "sha256": sha256(p.blob)}
    p.manifest = make_manifest(o, p, files)
    out_files = {"solution.py": p.source,
                 "manifest.json": (json.dumps(p.manifest.to_dict(), indent=2) + "\n").encode(),
                 "submission.zip": zip_bundle(p.source, None if o.single_file else p.blob)}
    if not o.single_file:
        out_files["model.pth"] = p.blob
    publish_bundle(o.out, out_files)
    return p


def make_manifest(o: BuildOptions, p: BuildPlan, files: Dict[str, Dict[str, Any]]) -> Manifest:
    inf, t = p.inference, p.timing
    return Manifest(
        tool_version=__version__, built=time.strftime("%Y-%m-%d %H:%M:%S"),
        members=[MemberRecord(e["name"], e["meta"]["fold"], e["meta"]["seed"], e["spec"]["arch"], e["spec"]["encoder"],
                              e["meta"]["val_mcc"], e["weight"], e["meta"]["train_tiles"], e["meta"]["val_tiles"],
                              e["meta"]["sha"], e["meta"]["source"], _fingerprints(e, e["meta"]["train_tiles"]))
                 for e in p.entries],
        selection=Selection(SELECTION_DOC, o.max_members, p.table, sorted({r["fold"] for r in p.table}),
                            folds_missing(p.table)),
        tta=[v.name for v in resolve_views(inf.tta)], scales=inf.scales, merge=p.merge,
        weights=[e["weight"] for e in p.entries], bias=p.bias, tuned_on_tiles=p.tuned_on,
        tuned_on_sha256={s: sorted({h for e in p.entries for h in _fingerprints(e, keys)}) for s, keys in p.tuned_on.items()},
        postprocess=p.rules,
        postprocess_preset=p.postprocess_preset, crf=inf.crf, adapt=inf.adapt,
        tuning=p.tuning.manifest() if p.tuning is not None else None,
        normalisation={e["name"]: e["stats"] for e in p.entries},
        class_map=p.payload["class_map"], bands=p.payload["bands"],
        runtime=Runtime(p.backend, "int8" if p.int8 else "fp16" if p.fp16 else "fp32", p.fp16_agreement, p.int8_info,
                        {k: v for k, v in p.parity.items() if k in p.kept}, o.single_file,
                        {"python": _pyplatform.python_version(), "torch": torch.__version__}),
        budget=Budget(o.max_mb, o.time_budget),
        timing=Timing(o.device, f"{_pyplatform.machine()} {os.cpu_count()} cores", list(p.tile.shape),
                      round(t["load_s"], 3), round(t["tile_s"], 3), t["views"], o.test_tiles,
                      round(t["load_s"] + o.test_tiles * t["tile_s"], 1)),
        files=files, notes=p.notes)


def _fingerprints(entry: Dict[str, Any], keys) -> List[str]:
    """Content fingerprints of ``keys`` as the member recorded them (empty for older members)."""
    known = entry["meta"].get("tile_sha256") or {}
    return sorted(known[k] for k in keys if k in known)


#: The build, in order.
STEPS: Sequence[Step] = (check_options, load, choose_backend, choose_precision, choose_members, tune, switch_to_int8,
                         fit_time, fit_bias, render, publish)

def build(models: Sequence[str], out: str, echo: Optional[Callable[[str], None]] = None, **options: Any) -> Dict[str, Any]:
    """Build a bundle; returns the manifest as written to ``out/manifest.json``.

    ``options`` are the fields of :class:`BuildOptions` (the CLI's flags). Nothing in ``out``
    changes until every budget is met; then the four files replace the previous bundle as
    one set (glacier_submit/publish.py). With ``tune="oof"`` the seeds per fold, TTA,
    scales, CRF, bias and post-processing come from out-of-fold evidence
    (glacier_submit/tuning/); ``precision="int8"`` and ``allow_int8`` follow the int8 policy
    of glacier_submit/quantize.py.
    """
    if options.get("tune") == "none":
        options["tune"] = None
    for k in ("scales", "weights", "check_size"):
        if options.get(k) is not None:
            options[k] = tuple(options[k])
    opts = BuildOptions(models=tuple(models), out=out, **options)
    plan = BuildPlan(echo=echo or log.info)
    for step in STEPS:
        plan = step(opts, plan)
    return plan.manifest.to_dict()
