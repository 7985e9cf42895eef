"""``glacier-submit evaluate``: the bundle run as the platform runs it on held-out tiles,
with a leakage guard, scores, timing, ablations and a report."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from glacier_submit.manifest import Manifest
from glacier_submit.report import figures_available, render_report, write_report  # noqa: F401 (render_report re-exported)
from glacier_submit.sandbox import RunResult, run_bundle
from training.data.competition import CompetitionDataset
from training.metrics import ConfusionAccumulator
from glacier_runtime.atomic import remove_stale_temps
from glacier_runtime.tiles import TileIdCollision, tile_ids


class EvaluateError(RuntimeError):
    pass


class LeakError(EvaluateError):
    pass


def load_manifest(bundle: str) -> Manifest:
    try:
        return Manifest.load(bundle)
    except FileNotFoundError as exc:
        raise EvaluateError(str(exc)) from None


def leakage(manifest: Manifest, tiles: Sequence[str], fingerprints: Optional[Mapping[str, str]] = None
            ) -> Dict[str, List[str]]:
    """Member name (or ``tuned <setting>``) -> evaluated tiles it trained on or was tuned on.

    Tiles are recognised by their content fingerprint (``fingerprints``: evaluated tile ->
    sha256 of its decoded bands) where the manifest records fingerprints: Phase-2 training and
    test tiles share names (``img001`` ...), so a name alone proves nothing. Older manifests
    without fingerprints are checked by name."""
    out = {}
    hashes = dict(fingerprints or {})

    def hits(names, shas):
        if shas and hashes:
            seen = set(shas)
            return sorted(k for k in tiles if hashes.get(k) in seen)
        return sorted(set(tiles) & set(names or []))

    for m in manifest.members:
        hit = hits(m.train_tiles, m.train_sha256)
        if hit:
            out[m.name] = hit
    for setting, seen in sorted(manifest.tuned_on_tiles.items()):
        hit = hits(seen, manifest.tuned_on_sha256.get(setting))
        if hit:
            out[f"tuned {setting}"] = hit
    return out


def untracked_tuning(manifest: Manifest) -> List[str]:
    """Settings tuned on data whose tile ids the manifest does not record (older bundles)."""
    bias = manifest.bias
    if str(bias.mode or "").startswith("tuned") and "bias" not in manifest.tuned_on_tiles:
        n = bias.oof_tiles if bias.oof_tiles is not None else "?"
        return [f"the bias was tuned on {n} out-of-fold tiles that this manifest does not "
                "name: the leakage guard cannot check them; rebuild the bundle to record them"]
    return []


def oof_hint(manifest: Manifest) -> str:
    from training.rundir import RunDir

    for folder in manifest.member_folders():
        p = RunDir(folder).cv_summary_json
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


#: How a tile the bundle did not produce is scored (as the platform would: no mask, no credit).
MISSING_RULE = "scored as all background (class 0), as if an empty mask had been submitted"


def score(ds: CompetitionDataset, keys: Sequence[str], masks: Dict[str, np.ndarray], values: Sequence[int]):
    """Confusion over ``keys``; a tile with no mask (or one of the wrong size) is reported
    in ``missing`` and scored by :data:`MISSING_RULE`, never skipped."""
    acc = ConfusionAccumulator(len(ds.class_names))
    per_tile = {}
    preds = {}
    problems = []
    missing = []
    ids_of = tile_ids({k: ds.tiles[k].bands for k in keys})
    for key in keys:
        tid = ids_of[key]
        truth = ds.label(key)
        m = masks.get(tid)
        if m is None:
            problems.append(f"no mask for tile {key} (id {tid}): {MISSING_RULE}")
        elif m.shape != truth.shape:
            problems.append(f"tile {key}: mask {m.shape} vs label {truth.shape}: {MISSING_RULE}")
            m = None
        if m is None:
            missing.append(key)
            ids = np.zeros(truth.shape, np.uint8)
        else:
            ids = class_ids_from_pixels(m, values, key)
        per_tile[key] = acc.update(truth, ids)
        preds[key] = ids
    return acc, per_tile, preds, problems, missing


def ablations(bundle: str, ds: CompetitionDataset, keys: Sequence[str], manifest: Manifest,
              device: str = "cpu") -> List[Dict[str, Any]]:
    """MCC and time of variants built from the same members (in-process, same runtime code)."""
    from glacier_runtime.predictor import Predictor, load_payload

    payload = load_payload(os.path.join(bundle, "model.pth"))
    base_inf = payload["inference"]
    n = len(ds.class_names)
    variants: List[Dict[str, Any]] = []
    images = {k: ds.image(k) for k in keys}  # read once for every variant
    labels = {k: ds.label(k) for k in keys}

    def run(label, overrides, members=None, rule_sets=None):
        pred = Predictor.from_payload(payload, device=device, overrides=overrides, members=members)
        t0 = time.perf_counter()
        if pred.cfg.adapt == "bn":  # as the bundle does: on the tiles it is given, before predicting
            pred.adapt_bn(lambda: iter(images.values()))
        probs = {k: pred.refine(pred.predict_proba(images[k]), images[k]) for k in keys}  # CRF as the bundle
        secs = (time.perf_counter() - t0) / max(len(keys), 1)
        for rs_label, rules in (rule_sets or [("", None)]):
            if rules is not None:
                pred.rules = rules
            acc = ConfusionAccumulator(n)
            for k in keys:
                acc.update(labels[k], pred.decide(probs[k], pred.masked(images[k])))
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
    if base_inf.get("adapt") == "bn":
        run("without batch-norm adaptation", {"adapt": None})
    else:
        run("with batch-norm adaptation (--adapt bn)", {"adapt": "bn"})
    if base_inf.get("crf"):
        run("without CRF", {"crf": None})
    else:
        run("with CRF", {"crf": {"enabled": True}})
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


def select_tiles(ds: CompetitionDataset, data: str, fold: Optional[int], folds: Optional[str],
                 tiles: Optional[Sequence[str]], notes: List[str]) -> List[str]:
    """The tiles to evaluate: every tile, a fold's validation tiles (folds.json checked
    against this data) or the ones named; refused when missing, empty or colliding."""
    keys = list(ds.keys)
    if folds:
        from training.folds import check_provenance, fold_split, load_folds

        folds_data = load_folds(folds)
        try:
            note = check_provenance(folds_data, ds, folds)
        except ValueError as exc:
            raise EvaluateError(str(exc)) from None
        if note:
            notes.append(note)
    if fold is not None:
        if not folds:
            raise EvaluateError("--fold needs --folds folds.json")
        _, keys = fold_split(folds_data, fold)
    if tiles:
        keys = list(tiles)
    missing = [k for k in keys if k not in ds.tiles]
    if missing:
        raise EvaluateError(f"tiles {missing} not found in {data} (has {ds.keys[:10]}...)")
    if not keys:
        raise EvaluateError("no tiles to evaluate")
    try:
        tile_ids({k: ds.tiles[k].bands for k in keys})
    except TileIdCollision as exc:
        raise EvaluateError(str(exc)) from None
    return keys


def guard_leakage(manifest: Manifest, keys: Sequence[str], fold: Optional[int], allow_leak: bool,
                  ds: Optional[CompetitionDataset] = None):
    """(leaks, stamped): refuses (``LeakError``) members trained on, or settings tuned on, the
    evaluated tiles unless ``allow_leak`` (the report is then stamped LEAKY). Tiles are known by
    content (``ds`` decodes them) where the manifest records fingerprints."""
    from training.data.competition import tile_sha256

    has_sha = any(m.train_sha256 for m in manifest.members) or any(manifest.tuned_on_sha256.values())
    fingerprints = {k: tile_sha256(ds.image(k)) for k in keys} if (ds is not None and has_sha) else None
    leaks = leakage(manifest, keys, fingerprints)
    if not leaks:
        return leaks, False
    if allow_leak:
        return leaks, True
    lines = [f"  {m}: {'tuned' if m.startswith('tuned ') else 'trained'} on {t}" for m, t in leaks.items()]
    msg = ("leaky evaluation refused: members trained on, or settings tuned on, evaluated tiles\n"
           + "\n".join(lines) + "\n")
    if sum(not m.startswith("tuned ") for m in leaks) == len(manifest.members) and fold is not None:
        msg += ("A fold is only held out for members that never trained on it; a k-fold ensemble has no "
                "clean fold." + oof_hint(manifest) + " ")
    if any(m.startswith("tuned ") for m in leaks):
        msg += ("Settings fitted on the members' out-of-fold predictions (--bias auto, --tune oof) were fitted on "
                "exactly the held-out fold's tiles: for a held-out bundle build with --bias none and without "
                "--tune oof. ")
    msg += ("Evaluate on unseen tiles, build a bundle from members that never saw this fold, or pass "
            "--allow-leak (the report is stamped LEAKY).")
    raise LeakError(msg)


def device_env(device: str) -> Dict[str, str]:
    """What the sandboxed bundle may see: on ``cpu`` (the default) no GPU at all, so its masks
    and timings are the CPU platform's even on a Kaggle T4; ``cuda`` passes the GPUs through."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": "", "GLACIER_DEVICE": "cpu"}
    if device in ("cuda", "auto"):
        return {}
    raise EvaluateError(f"--device must be cpu, cuda or auto, got {device!r}")


def run_staged(bundle: str, ds: CompetitionDataset, keys: Sequence[str], out: str, convention: str,
               timeout: Optional[float], python: Optional[str], device: str = "cpu") -> RunResult:
    """The bundle run as the platform runs it on exactly ``keys``, writing into a fresh folder."""
    os.makedirs(out, exist_ok=True)
    remove_stale_temps(out)
    staged = os.path.join(out, "_input")
    stage_tiles(ds, keys, staged)
    masks_dir = os.path.join(out, "_masks")
    if os.path.exists(masks_dir):  # every run writes into a fresh, empty folder: nothing of an earlier run is read
        shutil.rmtree(masks_dir)
    os.makedirs(masks_dir)
    return run_bundle(bundle, staged, convention, masks_dir, timeout, python, env=device_env(device))


def add_scores(report: Dict[str, Any], ds: CompetitionDataset, keys: Sequence[str], run: RunResult,
               values: Sequence[int]) -> Dict[str, np.ndarray]:
    """MCC, per-class scores, confusion and grade into ``report``; returns the class-id masks."""
    from training.reporting.grading import class_facts, grade

    acc, per_tile, preds, problems, missing = score(ds, keys, run.masks, values)
    report.update(mcc=acc.mcc, per_class=acc.per_class(ds.class_names), per_tile_mcc=per_tile,
                  confusion=acc.cm.tolist(), class_names=list(ds.class_names), problems=problems,
                  missing=missing, missing_rule=MISSING_RULE)
    report["grade"] = grade("evaluate", {"mcc": acc.mcc, **class_facts(report["per_class"])})
    return preds


def evaluate(bundle: str, data: str, out: str, fold: Optional[int] = None, folds: Optional[str] = None,
             tiles: Optional[Sequence[str]] = None, convention: str = "imagepath", timeout: Optional[float] = None,
             allow_leak: bool = False, compare: bool = False, python: Optional[str] = None,
             label_mode: str = "multiclass", figures: bool = True, device: str = "cpu") -> Dict[str, Any]:
    """``glacier-submit evaluate``: returns the report (also written to ``out/report.json``)."""
    manifest = load_manifest(bundle)
    notes: List[str] = []
    if figures and not figures_available():
        figures = False  # checked before any work: the report is written without figures
        notes.append("figures skipped: matplotlib is not installed (pip install -e '.[report]' to get them)")
    ds = CompetitionDataset(data, label_mode=label_mode, require_labels=False)
    keys = select_tiles(ds, data, fold, folds, tiles, notes)
    notes += untracked_tuning(manifest)
    leaks, stamped = guard_leakage(manifest, keys, fold, allow_leak, ds)
    run = run_staged(bundle, ds, keys, out, convention, timeout, python, device)
    report: Dict[str, Any] = {
        "bundle": os.path.abspath(bundle), "data": os.path.abspath(data), "tiles": keys, "convention": convention,
        "leaky": stamped, "leaks": leaks, "returncode": run.returncode, "timed_out": run.timed_out,
        "seconds": run.seconds, "seconds_per_tile": run.seconds / len(keys), "peak_rss_mb": run.peak_rss_mb,
        "time_budget_s": manifest.budget.time_budget_s, "date": time.strftime("%Y-%m-%d %H:%M"),
        "notes": notes, "tuning_decisions": (manifest.tuning or {}).get("decisions"), "device": device,
    }
    if not run.ok:
        report["stderr_tail"] = run.tail(3000)
        _write_json(os.path.join(out, "report.json"), report)
        why = "timed out" if run.timed_out else f"exited with code {run.returncode}"
        raise EvaluateError(f"the bundle {why} under the {convention} convention. Last output:\n{run.tail(1500)}")
    report["mask_count"] = len(run.masks)
    preds: Dict[str, np.ndarray] = {}
    if ds.has_labels:
        preds = add_scores(report, ds, keys, run, manifest.class_values)
    else:
        report["note"] = "no labels: timing only"
    if compare and ds.has_labels:
        report["ablations"] = ablations(bundle, ds, keys, manifest, device)
    report["figures"] = write_report(out, report, ds, keys, preds, manifest, figures=figures)
    _write_json(os.path.join(out, "report.json"), report)
    return report


def _write_json(path: str, obj: Dict[str, Any]) -> None:
    from glacier_runtime.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=float) + "\n").encode())
