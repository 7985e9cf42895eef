"""``glacier-submit build``: members -> solution.py + model.pth + manifest.json + zip.

Steps, one function each: load members (pre-training checkpoints skipped), choose the
backend, store weights in fp16 when fp32 is over the size budget, choose members under it
(every fold represented; ``--max-members``), fit the time budget (TTA/scales first, then
members), tune the bias, render, check the upload size, and publish the four files as one
set. Nothing in ``out`` changes before every budget is met."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform as _pyplatform
import time
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from glacier_submit import __version__
from glacier_submit.members import cast_payload, load_members, make_payload
from glacier_submit.publish import prepare_out, publish_bundle
from glacier_submit.quantize import check_calibration, quantize_entries
from glacier_submit.selection import drop_weakest, folds_missing, render_table, select_members
from glacier_runtime.crf import validate_crf
from glacier_runtime.predictor import Predictor
from glacier_runtime.tta import resolve_views
from glacier_submit.tune import PredictFn, RefineFn, TuneResult, load_oof_set, tune

log = logging.getLogger("glacier.build")
MB = 1024 * 1024

#: What --time-budget drops first: extra scales, then D4 -> flips, then flips -> none, then members.
DROP_ORDER_DOC = ("1) extra scales, 2) D4 -> flips, 3) flips -> no TTA, 4) the weakest members "
                  "(each drop is in the member table)")
#: How members are chosen under the size budget (glacier_submit/selection.py).
SELECTION_DOC = ("strongest by validation MCC, each fold's strongest first, kept while the upload fits "
                 "--max-mb and --max-members (greedy); fp16 first when fp32 does not fit")


class BudgetError(RuntimeError):
    """The bundle cannot meet its size budget; the message has the table and the fix."""


def preset_names() -> List[str]:
    """Post-processing presets shipped inside the package (glacier_submit/presets/)."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("glacier_submit").joinpath("presets").iterdir() if p.name.endswith(".yaml"))


def load_postprocess(preset: Optional[str]) -> List[Dict[str, Any]]:
    """A preset name (shipped as package data, found from any install) or a YAML path -> rule list."""
    import yaml
    from importlib.resources import files

    from glacier_runtime.postprocess import validate_rules

    if not preset or preset == "none":
        return []
    if os.path.isfile(preset):
        with open(preset) as fh:
            text = fh.read()
    else:
        res = files("glacier_submit").joinpath("presets").joinpath(f"{preset}.yaml")
        if not res.is_file():
            raise ValueError(f"post-processing preset {preset!r} not found; use one of {preset_names()} or a YAML path")
        text = res.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    return validate_rules(data.get("rules", []))


def serialise(payload: Dict[str, Any]) -> bytes:
    """model.pth bytes: tensors and plain types only, so it loads with weights_only=True."""
    from glacier_runtime.safeload import plain

    buf = io.BytesIO()
    torch.save(plain(payload, "model payload"), buf)
    return buf.getvalue()


def check_tile(stats: Dict[str, Any], data: Optional[str] = None, size: Tuple[int, int] = (512, 512)) -> np.ndarray:
    """The tile the build times and checks fp16 on: a real tile from ``data`` when given,
    else a deterministic one in the members' value range (smooth seeded fields scaled by
    each band's training mean and std, clipped to its robust range)."""
    if data:
        from glacier_runtime.tiles import list_tiles, read_tile

        tiles, _ = list_tiles(data)
        for paths in tiles.values():
            if len(paths) == 5:
                return read_tile(paths)
    h, w = size
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / np.float32(max(h, w))
    mean, std, lo, hi = (np.asarray(stats[k], np.float32) for k in ("mean", "std", "lo", "hi"))
    bands = []
    for b in range(mean.shape[0]):
        z = 0.3 * rng.standard_normal((h, w)).astype(np.float32)
        for f in (1.5, 4.0, 11.0, 29.0):  # blobs from scene to speck size
            a, p = rng.uniform(0, 2 * np.pi, 2)
            z += np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy) + p).astype(np.float32) / np.sqrt(f)
        z = (z - z.mean()) / max(float(z.std()), 1e-6) * 1.5
        bands.append(np.clip(mean[b] + std[b] * z, lo[b], hi[b]))
    return np.stack(bands).astype(np.float32)


def time_predictor(payload: Dict[str, Any], tile: np.ndarray, device: str = "cpu",
                   overrides: Optional[Dict[str, Any]] = None, repeats: int = 1) -> Dict[str, float]:
    """Load time and steady per-tile time of the bundle's predictor on one tile."""
    t0 = time.perf_counter()
    pred = Predictor.from_payload(payload, device=device, overrides=overrides)
    load_s = time.perf_counter() - t0
    pred.predict_ids(tile[:, :64, :64])  # warm-up (allocator, thread pools)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.predict_ids(tile)
        times.append(time.perf_counter() - t)
    return {"load_s": load_s, "tile_s": float(np.median(times)), "views": pred.n_forward_views}


def agreement(payload_a: Dict[str, Any], payload_b: Dict[str, Any], tile: np.ndarray) -> float:
    a = Predictor.from_payload(payload_a, device="cpu", overrides={"tta": "none", "scales": [1.0]}).predict_ids(tile)
    b = Predictor.from_payload(payload_b, device="cpu", overrides={"tta": "none", "scales": [1.0]}).predict_ids(tile)
    return float((a == b).mean())


def candidate_settings(tta, scales: Sequence[float]) -> List[Tuple[Any, List[float]]]:
    """Requested (tta, scales), then cheaper settings in the documented drop order."""
    views = [v.name for v in resolve_views(tta)]
    out = [(tta, list(scales))]
    if len(scales) > 1:
        out.append((tta, [1.0]))
    if len(views) > 3:
        out.append(("flips", [1.0]))
    if len(views) > 1:
        out.append(("none", [1.0]))
    seen, uniq = set(), []
    for t, s in out:
        key = (json.dumps(t), tuple(s))
        if key not in seen:
            seen.add(key)
            uniq.append((t, s))
    return uniq


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- build steps ----------------------------------------------------------------------------

def blob_budget(budget: int, source_bytes: int, single_file: bool) -> int:
    """Bytes model.pth may take: the upload (solution.py + model.pth) within ``budget``;
    --single-file embeds it base64 (4/3) in solution.py beside the runtime source."""
    room = budget - source_bytes
    return (room - 512) * 3 // 4 if single_file else room


def tensor_bytes(entry: Dict[str, Any], fp16: bool) -> int:
    n = sum(v.numel() * (2 if fp16 and v.is_floating_point() else v.element_size()) for v in entry["state_dict"].values())
    onnx = entry.get("onnx")
    return n + (onnx.numel() if isinstance(onnx, torch.Tensor) else len(onnx or b""))


def member_sizes(entries: List[Dict[str, Any]], inference: Dict[str, Any], fp16: bool) -> Tuple[Dict[str, int], int]:
    """Each member's serialised share of model.pth (in the stored precision) and the bytes
    of a payload without members; shares add up to the payload's size within bytes."""
    empty = make_payload(entries[:1], inference)
    empty["members"] = []
    base = len(serialise(empty))
    sizes = {}
    for e in entries:
        one = make_payload([e], inference)
        one = cast_payload(one, torch.float16) if fp16 else one
        sizes[e["name"]] = len(serialise(one)) - base
    return sizes, base


def choose_precision(entries: List[Dict[str, Any]], inference: Dict[str, Any], precision: str, room: int,
                     notes: List[str]) -> bool:
    """fp16 when asked, or (auto) when every member in fp32 would exceed the budget."""
    if precision != "auto":
        return precision == "fp16"
    raw = sum(tensor_bytes(e, False) for e in entries)
    total = raw if raw > room else len(serialise(make_payload(entries, inference)))
    if total > room:
        notes.append(f"fp32 weights of {len(entries)} members are {total / MB:.1f} MB > {room / MB:.1f} MB "
                     "left for model.pth: stored in fp16")
        return True
    return False


def choose_members(entries: List[Dict[str, Any]], inference: Dict[str, Any], fp16: bool, room: int,
                   max_members: Optional[int]) -> List[Dict[str, Any]]:
    """The selection table (see glacier_submit/selection.py); BudgetError if no member fits."""
    sizes, base = member_sizes(entries, inference, fp16)
    rows = [{"name": e["name"], "fold": e["meta"]["fold"], "seed": e["meta"]["seed"],
             "val_mcc": e["meta"]["val_mcc"], "bytes": sizes[e["name"]]} for e in entries]
    table = select_members(rows, room, base, max_members)
    if not any(r["kept"] for r in table):
        raise BudgetError(
            f"no member fits: the smallest needs {min(sizes.values()) / MB:.1f} MB "
            f"({'fp16' if fp16 else 'fp32'}) and {room / MB:.1f} MB are left for the weights.\n"
            f"{render_table(table)}\nRaise --max-mb if the platform allows it, or train a smaller encoder.")
    return table


def fit_time(payload: Dict[str, Any], tile: np.ndarray, device: str, tta: Any, scales: Sequence[float],
             time_budget: Optional[float], table: List[Dict[str, Any]], notes: List[str]):
    """Time the requested setting; with a budget, cheaper TTA/scales follow in the documented
    order, then the weakest members go (marked in ``table``). Returns (timing, (tta, scales))."""
    candidates = candidate_settings(tta, scales) if time_budget is not None else [(tta, list(scales))]
    for chosen in candidates:
        timing = time_predictor(payload, tile, device, {"tta": chosen[0], "scales": chosen[1]})
        if time_budget is None or timing["tile_s"] <= time_budget:
            break
    if chosen != (tta, list(scales)):  # only a time budget picks another setting
        notes.append(f"time budget {time_budget:.2f} s/tile: TTA {tta!r} x scales {list(scales)} reduced to "
                     f"{chosen[0]!r} x {chosen[1]} (drop order: {DROP_ORDER_DOC})")
    while time_budget is not None and timing["tile_s"] > time_budget and len(payload["members"]) > 1:
        n = len(payload["members"])
        keep = min(n - 1, max(1, int(time_budget / (timing["tile_s"] / n))))
        dropped = drop_weakest(table, keep, f"time budget: {n} members take {timing['tile_s']:.2f} s per tile "
                                            f"> {time_budget:.2f} s")
        payload["members"] = [e for e in payload["members"] if e["name"] not in dropped]
        timing = time_predictor(payload, tile, device, {"tta": chosen[0], "scales": chosen[1]})
    if time_budget is not None and timing["tile_s"] > time_budget:
        notes.append(f"even the cheapest setting with one member takes {timing['tile_s']:.2f} s per tile "
                     f"> the {time_budget:.2f} s budget")
    return timing, chosen


def tune_bias_auto(bias: Any, entries: List[Dict[str, Any]], names: List[str], notes: List[str],
                   crf: bool = False):
    """Bias: given, none, or tuned on the out-of-fold predictions beside the members.

    With the CRF on, ``auto`` leaves the bias at 0: the saved OOF probabilities are the
    CRF's input, while the runtime adds the bias to its output (sharper), so a bias fitted
    on them would act on different numbers. ``--tune oof`` fits it after the CRF.
    """
    bias_info: Dict[str, Any] = {"mode": "none"}
    bias_values = None
    tuned_on: Dict[str, List[str]] = {}  # setting -> tile ids it was tuned on (evaluate's leakage guard)
    if isinstance(bias, (list, tuple)):
        bias_values = [float(b) for b in bias]
        bias_info = {"mode": "given", "values": bias_values}
    elif bias == "auto" and crf:
        bias_info = {"mode": "none (--bias auto is not fitted under --crf)"}
        notes.append("--bias auto left the bias at 0: it would be fitted on the out-of-fold probabilities "
                     "before the CRF, but applied after it; use --tune oof --tune-data DIR (fits the bias "
                     "after the CRF) or give --bias values")
    elif bias == "auto":
        from glacier_submit.tuning.bias import load_oof, tune_bias

        wdirs = {os.path.dirname(e["meta"]["source"]) for e in entries}
        probs, labels, keys = [], [], []
        for wd in sorted(wdirs):
            p, l, k = load_oof(wd, names)
            probs += p
            labels += l
            keys += k
        if probs:
            bias_values, before, after = tune_bias(probs, labels)
            bias_info = {"mode": "tuned on OOF (regularised)", "values": bias_values, "oof_tiles": len(keys),
                         "oof_mcc_before": before, "oof_mcc_after": after}
            tuned_on["bias"] = sorted(keys)
        else:
            notes.append("no out-of-fold predictions beside the members: bias left at 0")
    return bias_values, bias_info, tuned_on


def prepare_backend(entries: List[Dict[str, Any]], backend: str) -> Tuple[str, Dict[str, Any]]:
    """Resolve ``auto``; for ONNX, export every member (parity-checked) into its entry."""
    from training.models import runtime_supports

    supported = all(runtime_supports(e["spec"]) for e in entries)
    if backend == "auto":
        backend = "torch" if supported else "onnx"
    if backend == "torch" and not supported:
        bad = [e["name"] for e in entries if not runtime_supports(e["spec"])]
        raise ValueError(f"members {bad} have no pure-torch runtime twin; build with --backend onnx")
    parity_report: Dict[str, Any] = {}
    if backend == "onnx":
        for e in entries:
            attach_onnx(e, parity_report)
            if not runtime_supports(e["spec"]):
                e["state_dict"] = {}
    return backend, parity_report


def attach_onnx(entry: Dict[str, Any], parity_report: Dict[str, Any]) -> None:
    """Export the member to ONNX (parity-checked against torch) into ``entry["onnx"]``."""
    from glacier_submit.export import export_member, onnx_tensor

    res = export_member(entry)
    entry["onnx"] = onnx_tensor(res["onnx"])
    parity_report[entry["name"]] = res["parity"]


def int8_backend(backend: str, calib: Optional[str], notes: List[str]) -> str:
    """int8 runs as an ONNX graph in onnxruntime: ``auto`` becomes ``onnx`` (noted), ``torch`` is
    refused; calibration data must be given. Checked before any export."""
    from glacier_submit.quantize import Int8Error, check_calib_data

    if backend == "torch":
        raise Int8Error("--precision int8 runs only on the ONNX backend (int8 graphs run in onnxruntime; the "
                        "pure-torch runtime is fp32/fp16): use --backend onnx or auto, or drop --precision int8")
    check_calib_data(calib)
    if backend == "auto":
        notes.append("--precision int8: backend onnx (int8 graphs run in onnxruntime; solution.py asks for it "
                      "with '# pip install onnxruntime')")
    return "onnx"


def check_allow_int8(precision: str, backend: str, time_budget: Optional[float], calib: Optional[str]) -> None:
    """``--allow-int8`` is a permission for ``--time-budget``; refuse combinations it cannot serve."""
    from glacier_submit.quantize import Int8Error, check_calib_data

    if time_budget is None:
        raise Int8Error("--allow-int8 lets --time-budget switch to int8; give --time-budget SECONDS, or build int8 "
                        "outright with --precision int8")
    if precision == "fp16":
        raise Int8Error("--allow-int8 goes with --precision auto or fp32 (got fp16)")
    if backend == "torch":
        raise Int8Error("--allow-int8 needs the ONNX backend (int8 graphs run in onnxruntime): use --backend auto "
                        "or onnx")
    check_calib_data(calib)


def consider_int8(payload: Dict[str, Any], tile: np.ndarray, device: str, time_budget: float, calib: str,
                  min_agreement: float, parity_report: Dict[str, Any], notes: List[str]):
    """``--allow-int8``: when the requested setting exceeds ``time_budget`` in fp32, quantise the
    kept members and use int8 if it passes the agreement check and is faster. Returns
    (int8 payload, int8 manifest info) or None (fp32 kept; the note says why)."""
    from glacier_submit.quantize import Int8Error

    over = {"tta": payload["inference"]["tta"], "scales": payload["inference"]["scales"]}
    t32 = time_predictor(payload, tile, device, over)["tile_s"]
    if t32 <= time_budget:
        notes.append(f"--allow-int8: fp32 fits the time budget ({t32:.2f} s <= {time_budget:.2f} s per tile): "
                     "kept fp32")
        return None
    members = [dict(e) for e in payload["members"]]
    for e in members:
        if e.get("onnx") is None:
            attach_onnx(e, parity_report)
    used, blobs = quantize_entries(members, calib)
    p8 = dict(payload, members=members)
    head = f"--allow-int8: fp32 takes {t32:.2f} s per tile > the {time_budget:.2f} s budget"
    try:
        info = int8_agreement(p8, blobs, used, calib, tile, min_agreement)
    except Int8Error as exc:
        notes.append(f"{head}; int8 not used ({exc})")
        return None
    t8 = time_predictor(p8, tile, device, over)["tile_s"]
    if t8 >= t32:
        notes.append(f"{head}; int8 not used: it takes {t8:.2f} s, no faster on this device")
        return None
    info.update(fp32_tile_s=round(t32, 3), int8_tile_s=round(t8, 3), chosen_by="--time-budget with --allow-int8")
    notes.append(f"{head}; int8 takes {t8:.2f} s with {100 * info['agreement']:.3f} % pixel agreement "
                 f"(>= {min_agreement:g} %): built in int8, backend onnx (needs onnxruntime where it runs)")
    return p8, info


def int8_agreement(payload: Dict[str, Any], fp32_blobs: Dict[str, Any], calib_used: Dict[str, List[str]],
                   calib: str, tile: np.ndarray, min_agreement: float) -> Dict[str, Any]:
    """Measure int8 vs fp32 class-map agreement of the kept members; refuse below the threshold."""
    from glacier_submit.quantize import METHOD, agreement_tiles, check_agreement, measure_agreement, onnxruntime_version

    names, images = agreement_tiles(payload["members"], calib, tile)
    res = measure_agreement(payload, fp32_blobs, images)
    check_agreement(res, min_agreement, names)
    kept = {e["name"] for e in payload["members"]}
    return {"method": METHOD, "onnxruntime": onnxruntime_version(), "calib_data": os.path.abspath(calib),
            "calibration_tiles": {k: v for k, v in calib_used.items() if k in kept},
            "agreement": res["ensemble"], "member_agreement": res["members"], "agreement_tiles": names,
            "agreement_setting": "no TTA, bias or post-processing", "min_agreement": min_agreement}


def check_upload(src_bytes: bytes, blob: bytes, single_file: bool, budget: int, max_mb: float) -> None:
    """The last check before anything is written: the upload fits ``--max-mb``."""
    total = len(src_bytes) + (0 if single_file else len(blob))
    if total > budget:
        what = "--single-file solution.py" if single_file else "solution.py + model.pth"
        raise BudgetError(f"{what} is {total / MB:.1f} MB > {max_mb:.0f} MB; raise --max-mb or use --max-members")


def zip_bundle(src_bytes: bytes, blob: Optional[bytes]) -> bytes:
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("solution.py", src_bytes)
        if blob is not None:
            z.writestr("model.pth", blob)
    return zbuf.getvalue()


def build(models: Sequence[str], out: str, tta: Any = "none", scales: Sequence[float] = (1.0,), merge: str = "mean",
          weights: Optional[Sequence[float]] = None, postprocess: Optional[str] = "none", backend: str = "auto",
          max_mb: float = 300.0, time_budget: Optional[float] = None, test_tiles: int = 100,
          precision: str = "auto", bias: Any = "auto", check_data: Optional[str] = None,
          single_file: bool = False, device: str = "cpu", window: int = 1024,
          max_members: Optional[int] = None, check_size: Tuple[int, int] = (512, 512),
          tune: Optional[str] = None, tune_data: Optional[str] = None, tune_confidence: float = 0.95,
          calib_data: Optional[str] = None, int8_min_agreement: float = 99.5, allow_int8: bool = False,
          crf: bool = False, echo=None) -> Dict[str, Any]:
    """Build a bundle; returns the manifest (also written to ``out/manifest.json``).

    Nothing in ``out`` changes until every budget is met; then the four files replace the
    previous bundle as one set (glacier_submit/publish.py). With ``tune="oof"`` the seeds per
    fold, TTA, scales, bias and post-processing are chosen from out-of-fold evidence
    (glacier_submit/tune.py) instead of taken from the arguments; the CRF step
    (``crf=True``, or offered to the tuner when ``tune_data`` is given) refines the merged
    probabilities with the tile's bands (glacier_runtime/crf.py). ``precision="int8"``
    quantises each member's ONNX graph, calibrated on its training tiles in ``calib_data``
    (default ``tune_data``), and refuses below ``int8_min_agreement`` percent pixel agreement
    with fp32 (glacier_submit/quantize.py). ``allow_int8`` lets ``time_budget`` switch to int8
    (when it passes the same check) before any TTA, scale or member is dropped.
    """
    from glacier_submit.render import render_solution

    prepare_out(out)
    if tune not in (None, "none", "oof"):
        raise ValueError(f"--tune must be none or oof, got {tune!r}")
    tune = None if tune == "none" else tune
    if max_members is not None and max_members < 1:
        raise ValueError(f"--max-members must be at least 1 (got {max_members})")
    if precision not in ("auto", "fp32", "fp16", "int8"):
        raise ValueError(f"--precision must be auto, fp32, fp16 or int8, got {precision!r}")
    notes: List[str] = []
    int8 = precision == "int8"
    calib = calib_data or tune_data
    if int8:
        backend = int8_backend(backend, calib, notes)
    elif allow_int8:
        check_allow_int8(precision, backend, time_budget, calib)
    entries = load_members(models, notes)
    if int8 or allow_int8:
        check_calibration(entries, calib)
    if weights is not None:
        if len(weights) != len(entries):
            raise ValueError(f"--weights has {len(weights)} values for {len(entries)} members")
        for e, w in zip(entries, weights):
            e["weight"] = float(w)
        merge = "weighted"
    resolve_views(tta)  # validate early
    rules = load_postprocess(postprocess)
    inference = {"tta": tta, "scales": [float(s) for s in scales], "merge": merge, "bias": None,
                 "window": window, "overlap": 0.25, "max_batch": "auto", "stride": 32, "postprocess": rules,
                 "crf": validate_crf({"enabled": True}) if crf else None}
    backend, parity_report = prepare_backend(entries, backend)
    tile = check_tile(entries[0]["stats"], check_data, check_size)
    pip = ["onnxruntime"] if backend == "onnx" else []
    calib_used, fp32_blobs = quantize_entries(entries, calib) if int8 else ({}, {})

    # size budget: fp16 first, then the strongest members with every fold represented
    budget = int(max_mb * MB)
    room = blob_budget(budget, len(render_solution(__version__, pip).encode("utf-8")), single_file)
    fp16 = choose_precision(entries, inference, precision, room, notes)
    table = choose_members(entries, inference, fp16, room, max_members)
    kept = {r["name"] for r in table if r["kept"]}
    entries = [e for e in entries if e["name"] in kept]
    payload = make_payload(entries, inference)
    agree16 = int8_info = None
    if int8:
        int8_info = int8_agreement(payload, fp32_blobs, calib_used, calib, tile, int8_min_agreement)
        fp32_blobs.clear()
    if fp16:
        p16 = cast_payload(payload, torch.float16)
        if backend == "torch":
            agree16 = agreement(payload, p16, tile)
        payload = p16

    tuning = None
    if tune == "oof":
        from glacier_submit.tune import render_decisions

        say = echo or (lambda line: log.info(line))
        say("tuning on out-of-fold predictions (build --tune oof) ...")
        tuning = tune_for_build(entries, payload, tile, device, time_budget, tune_data, tune_confidence, echo=say)
        st = tuning.settings
        say(render_decisions(tuning))
        if st.get("members"):
            keep_names = {m for ms in st["members"].values() for m in ms}
            for r in table:
                if r["kept"] and r["name"] not in keep_names:
                    r.update(kept=False, reason="tune oof: one seed per fold (averaging seeds did not hold up on OOF)")
            entries = [e for e in entries if e["name"] in keep_names]
            payload["members"] = [e for e in payload["members"] if e["name"] in keep_names]
        tta, scales, postprocess = st["tta"], list(st["scales"]), st["postprocess"]
        rules = load_postprocess(postprocess)
        payload["inference"].update(tta=tta, scales=[float(s) for s in scales], postprocess=rules,
                                    crf=validate_crf({"enabled": True}) if st.get("crf") else None)

    if allow_int8 and not int8:  # --time-budget may switch to int8 before dropping anything
        switched = consider_int8(payload, tile, device, time_budget, calib, int8_min_agreement, parity_report, notes)
        if switched is not None:
            payload, int8_info = switched
            int8, fp16, agree16, backend, pip = True, False, None, "onnx", ["onnxruntime"]

    # time budget: TTA/scales in the documented order, then the weakest members
    timing, chosen = fit_time(payload, tile, device, tta, scales, time_budget, table, notes)
    payload["inference"]["tta"], payload["inference"]["scales"] = chosen[0], chosen[1]
    kept = {r["name"] for r in table if r["kept"]}
    entries = [e for e in entries if e["name"] in kept]
    missing = folds_missing(table)
    if missing:
        notes.append(f"no member of folds {missing} fits the budgets: the bundle covers folds "
                     f"{sorted({e['meta']['fold'] for e in entries})} only (raise --max-mb / --max-members)")
    dropped = [r["name"] for r in table if not r["kept"]]
    if dropped:
        notes.append(f"kept {len(entries)} of {len(table)} members; dropped {dropped} (reasons in the member table)")

    if tuning is not None:
        bias_values = tuning.settings["bias"]
        bias_info = ({"mode": "tuned on OOF (--tune oof, cross-fitted, regularised)", "values": bias_values,
                      "oof_tiles": len(tuning.tiles)} if bias_values else {"mode": "none (--tune oof kept 0)"})
        tuned_on = {"tuning": list(tuning.tiles)}
        if bias_values:
            tuned_on["bias"] = list(tuning.tiles)
    else:
        bias_values, bias_info, tuned_on = tune_bias_auto(bias, entries, [e["name"] for e in entries], notes,
                                                          crf=bool(payload["inference"].get("crf")))
    payload["inference"]["bias"] = bias_values
    blob = serialise(payload)
    source = render_solution(__version__, pip, embedded=blob if single_file else None)
    src_bytes = source.encode("utf-8")
    check_upload(src_bytes, blob, single_file, budget, max_mb)

    files = {"solution.py": {"bytes": len(src_bytes), "sha256": sha256(src_bytes)}}
    if not single_file:
        files["model.pth"] = {"bytes": len(blob), "sha256": sha256(blob)}
    views = [v.name for v in resolve_views(payload["inference"]["tta"])]
    manifest = {
        "tool": "glacier-submit", "tool_version": __version__, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "members": [{"name": e["name"], "fold": e["meta"]["fold"], "seed": e["meta"]["seed"],
                     "arch": e["spec"]["arch"], "encoder": e["spec"]["encoder"], "val_mcc": e["meta"]["val_mcc"],
                     "weight": e["weight"], "train_tiles": e["meta"]["train_tiles"],
                     "val_tiles": e["meta"]["val_tiles"], "sha": e["meta"]["sha"], "source": e["meta"]["source"]}
                    for e in entries],
        "selection": {"rule": SELECTION_DOC, "max_members": max_members, "table": table,
                      "folds": sorted({r["fold"] for r in table}), "folds_missing": missing},
        "tta": views, "scales": payload["inference"]["scales"], "merge": merge,
        "weights": [e["weight"] for e in entries], "bias": bias_info, "tuned_on_tiles": tuned_on, "postprocess": rules,
        "postprocess_preset": postprocess, "crf": payload["inference"].get("crf"),
        "tuning": tuning.manifest() if tuning is not None else None,
        "normalisation": {e["name"]: e["stats"] for e in entries},
        "class_map": payload["class_map"], "bands": payload["bands"],
        "runtime": {"backend": backend, "precision": "int8" if int8 else "fp16" if fp16 else "fp32",
                    "fp16_agreement": agree16, "int8": int8_info,
                    "onnx_parity": {k: v for k, v in parity_report.items() if k in kept}, "single_file": single_file,
                    "built_with": {"python": _pyplatform.python_version(), "torch": torch.__version__}},
        "budget": {"max_mb": max_mb, "time_budget_s": time_budget},
        "timing": {"device": device, "machine": f"{_pyplatform.machine()} {os.cpu_count()} cores",
                   "check_tile": list(tile.shape), "load_s": round(timing["load_s"], 3),
                   "tile_s": round(timing["tile_s"], 3), "forward_views": timing["views"],
                   "test_tiles": test_tiles, "estimated_total_s": round(timing["load_s"] + test_tiles * timing["tile_s"], 1)},
        "files": files, "notes": notes,
    }
    out_files = {"solution.py": src_bytes, "manifest.json": (json.dumps(manifest, indent=2) + "\n").encode(),
                 "submission.zip": zip_bundle(src_bytes, None if single_file else blob)}
    if not single_file:
        out_files["model.pth"] = blob
    publish_bundle(out, out_files)
    return manifest


def render_manifest(m: Dict[str, Any]) -> str:
    """The build's printed summary: which members were kept or dropped and why, then the
    kept members, inference settings, size and time."""
    lines = []
    if m.get("selection"):
        sel = m["selection"]
        kept = sum(r["kept"] for r in sel["table"])
        lines += [f"members: kept {kept} of {len(sel['table'])} (folds {sel['folds']}"
                  + (f", missing {sel['folds_missing']}" if sel["folds_missing"] else ", all represented") + ")",
                  render_table(sel["table"]), ""]
    lines += [f"{'member':<16} {'fold':>4} {'seed':>4} {'arch':<16} {'val MCC':>8} {'weight':>7}"]
    for e in m["members"]:
        mcc = e["val_mcc"] if e["val_mcc"] is not None else float("nan")
        lines.append(f"{e['name']:<16} {e['fold']:>4} {e['seed']:>4} {e['arch'] + '/' + e['encoder']:<16} {mcc:>8.4f} {e['weight']:>7.3f}")
    t, r = m["timing"], m["runtime"]
    size = sum(f["bytes"] for f in m["files"].values()) / MB
    lines += [
        "",
        f"TTA {len(m['tta'])} views ({', '.join(m['tta'])}) x scales {m['scales']}, merge {m['merge']}, "
        f"post-processing {m['postprocess_preset'] or 'none'} ({len(m['postprocess'])} rules)"
        + (", CRF on" if m.get('crf') else ""),
        f"bias: {m['bias']['mode']}" + (f" {[round(b, 2) for b in m['bias']['values']]}" if m['bias'].get('values') else "")
        + (f" (OOF MCC {m['bias']['oof_mcc_before']:.4f} -> {m['bias']['oof_mcc_after']:.4f})" if 'oof_mcc_after' in m['bias'] else ""),
        f"backend {r['backend']}, weights {r['precision']}"
        + (f" (fp16 vs fp32 class agreement {r['fp16_agreement'] * 100:.3f} %)" if r.get("fp16_agreement") is not None else "")
        + (f" (int8 vs fp32 class agreement {r['int8']['agreement'] * 100:.3f} % on {len(r['int8']['agreement_tiles'])} "
           f"tiles, threshold {r['int8']['min_agreement']:g} %; needs onnxruntime where it runs)" if r.get("int8") else ""),
        f"size {size:.1f} MB of {m['budget']['max_mb']:.0f} MB",
        f"time on {t['device']} ({t['machine']}): load {t['load_s']:.2f} s, {t['tile_s']:.2f} s per "
        f"{t['check_tile'][1]}x{t['check_tile'][2]} tile -> ~{t['estimated_total_s']:.0f} s for {t['test_tiles']} tiles",
    ]
    if m.get("tuning"):
        from glacier_submit.tune import render_decision_rows

        tu = m["tuning"]
        lines += ["", f"--tune oof on {len(tu['tiles'])} out-of-fold tiles ({tu['method']}):"]
        lines += render_decision_rows(tu["decisions"])
    lines += [f"note: {n}" for n in m["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# glue for ``build --tune oof``
# ---------------------------------------------------------------------------------------

def tune_for_build(entries: List[Dict[str, Any]], payload: Dict[str, Any], tile: np.ndarray, device: str,
                   time_budget: Optional[float], tune_data: Optional[str], confidence: float = 0.95,
                   n_boot: int = 1000, echo: Callable[[str], None] = lambda s: None) -> TuneResult:
    """Run :func:`tune` for a build: costs measured on the check tile with the bundle's own
    predictor, TTA/scales judged by re-predicting the OOF tiles of ``tune_data`` (the
    training folder) with each tile's own fold members."""
    from glacier_runtime.predictor import Predictor

    oof = load_oof_set(entries)
    if not oof.keys:
        raise ValueError("--tune oof needs the out-of-fold predictions `glacier-train cv` writes beside the "
                         "members (weights/oof/<member>/ and weights/oof/labels/); none were found for "
                         f"{[e['name'] for e in entries]}")
    presets = {name: load_postprocess(name) for name in preset_names()}
    presets.setdefault("none", [])
    names = {e["name"]: i for i, e in enumerate(payload["members"])}

    def subset(members: Optional[Mapping[str, List[str]]]) -> List[int]:
        if not members:
            return list(range(len(payload["members"])))
        keep = {m for ms in members.values() for m in ms}
        return [i for n, i in names.items() if n in keep]

    cache: Dict[Any, float] = {}

    def cost(s: Mapping[str, Any]) -> float:
        idx = subset(s.get("members"))
        key = (tuple(idx), str(s.get("tta")), tuple(s.get("scales") or [1.0]), s.get("postprocess"), bool(s.get("crf")))
        if key not in cache:
            sub = dict(payload, members=[payload["members"][i] for i in idx])
            over = {"tta": s.get("tta", "none"), "scales": list(s.get("scales") or [1.0]),
                    "postprocess": presets.get(s.get("postprocess") or "none", []),
                    "crf": {"enabled": True} if s.get("crf") else None}
            cache[key] = time_predictor(sub, tile, device, over)["tile_s"]
            echo(f"  cost: {len(idx)} members, TTA {over['tta']}, scales {over['scales']}, "
                 f"post-processing {s.get('postprocess') or 'none'}{', CRF' if s.get('crf') else ''}: "
                 f"{cache[key]:.2f} s/tile")
        return cache[key]

    predict: Optional[PredictFn] = None
    refine: Optional[RefineFn] = None
    if tune_data:
        from training.data.competition import CompetitionDataset

        ds = CompetitionDataset(tune_data)
        missing = [k for k in oof.keys if k not in set(ds.keys)]
        if missing:
            raise ValueError(f"--tune-data {tune_data} lacks OOF tiles {missing[:5]}: give the folder the members "
                             "were trained on")

        def _predict(keys: List[str], tta: Any, scales: List[float], members: Mapping[str, List[str]]):
            out: Dict[str, np.ndarray] = {}
            preds: Dict[int, Predictor] = {}
            for k in keys:
                f = oof.fold_of[k]
                if f not in preds:
                    idx = [names[m] for m in members.get(str(f), []) if m in names]
                    preds[f] = Predictor.from_payload(payload, device=device, members=idx,
                                                      overrides={"tta": tta, "scales": scales, "bias": None,
                                                                 "postprocess": []})
                img = ds.image(k)
                p = preds[f]
                out[k] = p.masked_to_background(p.predict_proba(img), p.masked(img)).astype(np.float32)
            echo(f"  re-predicted {len(keys)} OOF tiles with TTA {tta}, scales {scales}")
            return out

        predict = _predict
        # the CRF with each tile's own fold member statistics as the appearance term's scale
        refiners: Dict[int, Predictor] = {}

        def _refine(probs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
            out: Dict[str, np.ndarray] = {}
            for k, p in probs.items():
                f = oof.fold_of[k]
                if f not in refiners:
                    idx = [names[m] for m in oof.members_of_fold.get(f, []) if m in names][:1] or [0]
                    refiners[f] = Predictor.from_payload(payload, device=device, members=idx,
                                                         overrides={"crf": {"enabled": True}})
                out[k] = refiners[f].refine(p, ds.image(k))
            echo(f"  CRF on {len(probs)} OOF tiles")
            return out

        refine = _refine

    k = int(payload["members"][0]["spec"]["classes"])
    return tune(oof, k, predict=predict, cost=cost, time_budget=time_budget, presets=presets,
                confidence=confidence, n_boot=n_boot, refine=refine)
