"""``glacier-submit evaluate``: the bundle run as the platform runs it on held-out tiles,
with a leakage guard, scores, timing, ablations and a report."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from glacier_submit.sandbox import RunResult, run_bundle
from training.data.competition import CompetitionDataset
from training.metrics import ConfusionAccumulator
from glacier_runtime.tiles import tile_id


class EvaluateError(RuntimeError):
    pass


class LeakError(EvaluateError):
    pass


def load_manifest(bundle: str) -> Dict[str, Any]:
    path = os.path.join(bundle, "manifest.json")
    if not os.path.isfile(path):
        raise EvaluateError(f"{bundle} has no manifest.json; build it with `glacier-submit build`")
    with open(path) as fh:
        return json.load(fh)


def leakage(manifest: Dict[str, Any], tiles: Sequence[str]) -> Dict[str, List[str]]:
    """Member name -> evaluated tiles it trained on."""
    out = {}
    for m in manifest["members"]:
        hit = sorted(set(tiles) & set(m.get("train_tiles", [])))
        if hit:
            out[m["name"]] = hit
    return out


def oof_hint(manifest: Dict[str, Any]) -> str:
    for m in manifest["members"]:
        p = os.path.join(os.path.dirname(m.get("source", "")), "cv_summary.json")
        if os.path.exists(p):
            with open(p) as fh:
                s = json.load(fh)
            if s.get("oof_mcc") is not None:
                return f" The out-of-fold MCC of these members is {s['oof_mcc']:.4f} ({p})."
    return " Use the out-of-fold score from cv_summary.json instead."


def stage_tiles(ds: CompetitionDataset, keys: Sequence[str], folder: str) -> None:
    """A competition-layout folder holding only ``keys`` (symlinks), for the bundle to read."""
    if os.path.exists(folder):
        shutil.rmtree(folder)
    for key in keys:
        for band, path in ds.tiles[key].bands.items():
            d = os.path.join(folder, band)
            os.makedirs(d, exist_ok=True)
            os.symlink(os.path.abspath(path), os.path.join(d, os.path.basename(path)))


def class_ids_from_pixels(mask: np.ndarray, values: Sequence[int], name: str) -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    for i, v in enumerate(values):
        lut[int(v)] = i
    ids = lut[mask.astype(np.int64) & 255]
    if (ids == 255).any() or mask.max() > 255:
        bad = sorted(set(np.unique(mask).tolist()) - set(int(v) for v in values))
        raise EvaluateError(f"{name}: mask has values {bad} outside the class map {list(values)}")
    return ids


def score(ds: CompetitionDataset, keys: Sequence[str], masks: Dict[str, np.ndarray], values: Sequence[int]):
    acc = ConfusionAccumulator(len(ds.class_names))
    per_tile = {}
    preds = {}
    problems = []
    for key in keys:
        tid = tile_id(ds.tiles[key].bands["Band1"])
        if tid not in masks:
            problems.append(f"no mask for tile {key} (id {tid})")
            continue
        m = masks[tid]
        truth = ds.label(key)
        if m.shape != truth.shape:
            problems.append(f"tile {key}: mask {m.shape} vs label {truth.shape}")
            continue
        ids = class_ids_from_pixels(m, values, key)
        per_tile[key] = acc.update(truth, ids)
        preds[key] = ids
    return acc, per_tile, preds, problems


def ablations(bundle: str, ds: CompetitionDataset, keys: Sequence[str], manifest: Dict[str, Any],
              device: str = "cpu") -> List[Dict[str, Any]]:
    """MCC and time of variants built from the same members (in-process, same runtime code)."""
    from glacier_runtime.predictor import Predictor, load_payload

    payload = load_payload(os.path.join(bundle, "model.pth"))
    base_inf = payload["inference"]
    n = len(ds.class_names)
    variants: List[Dict[str, Any]] = []

    def run(label, overrides, members=None, rule_sets=None):
        pred = Predictor.from_payload(payload, device=device, overrides=overrides, members=members)
        t0 = time.perf_counter()
        probs = {k: pred.predict_proba(ds.image(k)) for k in keys}
        secs = (time.perf_counter() - t0) / max(len(keys), 1)
        for rs_label, rules in (rule_sets or [("", None)]):
            if rules is not None:
                pred.rules = rules
            acc = ConfusionAccumulator(n)
            for k in keys:
                acc.update(ds.label(k), pred.decide(probs[k], pred.masked(ds.image(k))))
            variants.append({"variant": label + rs_label, "mcc": acc.mcc, "seconds_per_tile": secs,
                             "views": pred.n_forward_views})

    rules = list(base_inf.get("postprocess") or [])
    rule_sets = [("", rules)]
    if rules:
        rule_sets.append((" - no post-processing", []))
        for i, r in enumerate(rules):
            rule_sets.append((f" - without {r['rule']}(class {r.get('class')})", rules[:i] + rules[i + 1:]))
    run("bundle as built", {}, rule_sets=rule_sets)
    run("bundle without bias", {"bias": None})
    for label, tta, scales in (("no TTA", "none", [1.0]), ("flips", "flips", [1.0]), ("D4", "d4", [1.0]),
                               ("D4 + scales 0.75/1/1.25", "d4", [0.75, 1.0, 1.25])):
        if tta == base_inf.get("tta") and list(scales) == list(base_inf.get("scales", [1.0])):
            continue
        run(label, {"tta": tta, "scales": scales})
    if len(payload["members"]) > 1:
        best = int(np.argmax([m["meta"].get("val_mcc") or 0 for m in payload["members"]]))
        run(f"single member ({payload['members'][best]['name']})", {}, members=[best])
    base = variants[0]
    for v in variants:
        v["delta_mcc"] = v["mcc"] - base["mcc"]
        v["delta_seconds"] = v["seconds_per_tile"] - base["seconds_per_tile"]
    return variants


def evaluate(bundle: str, data: str, out: str, fold: Optional[int] = None, folds: Optional[str] = None,
             tiles: Optional[Sequence[str]] = None, convention: str = "imagepath", timeout: Optional[float] = None,
             allow_leak: bool = False, compare: bool = False, python: Optional[str] = None,
             label_mode: str = "multiclass", figures: bool = True, device: str = "cpu") -> Dict[str, Any]:
    manifest = load_manifest(bundle)
    ds = CompetitionDataset(data, label_mode=label_mode, require_labels=False)
    keys = list(ds.keys)
    if fold is not None:
        if not folds:
            raise EvaluateError("--fold needs --folds folds.json")
        from training.folds import fold_split, load_folds

        _, keys = fold_split(load_folds(folds), fold)
    if tiles:
        keys = list(tiles)
    missing = [k for k in keys if k not in ds.tiles]
    if missing:
        raise EvaluateError(f"tiles {missing} not found in {data} (has {ds.keys[:10]}...)")
    if not keys:
        raise EvaluateError("no tiles to evaluate")
    leaks = leakage(manifest, keys)
    stamped = False
    if leaks:
        if not allow_leak:
            lines = [f"  {m}: trained on {t}" for m, t in leaks.items()]
            msg = ("leaky evaluation refused: members trained on evaluated tiles\n" + "\n".join(lines) + "\n")
            if len(leaks) == len(manifest["members"]) and fold is not None:
                msg += ("A fold is only held out for members that never trained on it; a k-fold ensemble has no "
                        "clean fold." + oof_hint(manifest) + " ")
            msg += "Evaluate on unseen tiles, build a bundle from members that never saw this fold, or pass --allow-leak (the report is stamped LEAKY)."
            raise LeakError(msg)
        stamped = True
    os.makedirs(out, exist_ok=True)
    staged = os.path.join(out, "_input")
    stage_tiles(ds, keys, staged)
    run: RunResult = run_bundle(bundle, staged, convention, os.path.join(out, "_masks"), timeout, python)
    report: Dict[str, Any] = {
        "bundle": os.path.abspath(bundle), "data": os.path.abspath(data), "tiles": keys, "convention": convention,
        "leaky": stamped, "leaks": leaks, "returncode": run.returncode, "timed_out": run.timed_out,
        "seconds": run.seconds, "seconds_per_tile": run.seconds / len(keys), "peak_rss_mb": run.peak_rss_mb,
        "time_budget_s": manifest.get("budget", {}).get("time_budget_s"), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if not run.ok:
        report["stderr_tail"] = run.tail(3000)
        _write_json(os.path.join(out, "report.json"), report)
        why = "timed out" if run.timed_out else f"exited with code {run.returncode}"
        raise EvaluateError(f"the bundle {why} under the {convention} convention. Last output:\n{run.tail(1500)}")
    values = manifest["class_map"]["values"]
    report["mask_count"] = len(run.masks)
    if ds.has_labels:
        acc, per_tile, preds, problems = score(ds, keys, run.masks, values)
        report.update(mcc=acc.mcc, per_class=acc.per_class(ds.class_names), per_tile_mcc=per_tile,
                      confusion=acc.cm.tolist(), class_names=list(ds.class_names), problems=problems)
    else:
        preds = {}
        report["note"] = "no labels: timing only"
    if compare and ds.has_labels:
        report["ablations"] = ablations(bundle, ds, keys, manifest, device)
    if figures:
        from glacier_submit.report import write_report

        report["figures"] = write_report(out, report, ds, keys, preds, manifest)
    _write_json(os.path.join(out, "report.json"), report)
    return report


def _write_json(path: str, obj: Dict[str, Any]) -> None:
    from glacier_runtime.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=float) + "\n").encode())


def render_report(r: Dict[str, Any]) -> str:
    lines = []
    if r.get("leaky"):
        lines.append("LEAKY EVALUATION: members trained on evaluated tiles " + json.dumps(r["leaks"]))
    if "mcc" in r:
        lines.append(f"MCC over all pixels of {len(r['tiles'])} tiles: {r['mcc']:.4f}")
        lines.append(f"{'class':<12} {'MCC':>7} {'IoU':>7} {'F1':>7} {'support':>10}")
        for c in r["per_class"]:
            lines.append(f"{c['class']:<12} {c['mcc']:>7.3f} {c['iou']:>7.3f} {c['f1']:>7.3f} {c['support']:>10}")
    budget = r.get("time_budget_s")
    lines.append(f"time: {r['seconds']:.1f} s total, {r['seconds_per_tile']:.2f} s per tile"
                 + (f" (budget {budget:.2f} s per tile: {'OK' if r['seconds_per_tile'] <= budget else 'OVER'})" if budget else "")
                 + f", peak RSS {r['peak_rss_mb']:.0f} MB")
    for p in r.get("problems", []):
        lines.append(f"problem: {p}")
    if r.get("ablations"):
        lines.append("")
        lines.append(f"{'variant':<44} {'MCC':>7} {'dMCC':>8} {'s/tile':>7} {'ds/tile':>8} {'views':>6}")
        for v in r["ablations"]:
            lines.append(f"{v['variant']:<44} {v['mcc']:>7.4f} {v['delta_mcc']:>+8.4f} {v['seconds_per_tile']:>7.2f} "
                         f"{v['delta_seconds']:>+8.2f} {v['views']:>6}")
    return "\n".join(lines)
