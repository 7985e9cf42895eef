"""``glacier-submit build``: members -> solution.py + model.pth + manifest.json + zip,
within a size budget (fp16 fallback, then refusal with what to drop) and a time budget
(measured on a check tile; TTA/scales reduced in a documented order)."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform as _pyplatform
import time
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from glacier_submit import __version__
from glacier_submit.members import cast_payload, load_members, make_payload
from glacier_runtime.atomic import atomic_write_bytes
from glacier_runtime.predictor import Predictor
from glacier_runtime.tta import resolve_views

log = logging.getLogger("glacier.build")
MB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What --time-budget drops first: extra scales, then D4 -> flips, then flips -> none.
DROP_ORDER_DOC = "1) extra scales, 2) D4 -> flips, 3) flips -> no TTA; members are never dropped silently"


class BudgetError(RuntimeError):
    """The bundle cannot meet its size budget; the message has the table and the fix."""


def load_postprocess(preset: Optional[str]) -> List[Dict[str, Any]]:
    """A preset name from configs/postprocess/ or a YAML path -> rule list."""
    import yaml

    from glacier_runtime.postprocess import validate_rules

    if not preset or preset == "none":
        return []
    path = preset if os.path.isfile(preset) else os.path.join(REPO, "configs", "postprocess", f"{preset}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "postprocess")) if f.endswith(".yaml"))
        raise ValueError(f"post-processing preset {preset!r} not found; use one of {names} or a YAML path")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    return validate_rules(data.get("rules", []))


def serialise(payload: Dict[str, Any]) -> bytes:
    """model.pth bytes: tensors and plain types only, so it loads with weights_only=True."""
    from glacier_runtime.safeload import plain

    buf = io.BytesIO()
    torch.save(plain(payload, "model payload"), buf)
    return buf.getvalue()


def check_tile(data: Optional[str] = None, size: Tuple[int, int] = (512, 512)) -> np.ndarray:
    """A real tile from ``data`` if given, else a synthetic 512x512 scene tile."""
    if data:
        from glacier_runtime.tiles import list_tiles, read_tile

        tiles, _ = list_tiles(data)
        for paths in tiles.values():
            if len(paths) == 5:
                return read_tile(paths)
    from training.data.synth import generate_scene

    return generate_scene(1, 1, size, seed=123)[0]


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


def size_table(entries: List[Dict[str, Any]], fp16: bool) -> str:
    rows = []
    for e in entries:
        n = sum(v.numel() * (2 if fp16 and v.is_floating_point() else v.element_size()) for v in e["state_dict"].values())
        rows.append((e["name"], e["meta"].get("val_mcc"), n / MB))
    lines = [f"{'member':<20} {'val MCC':>8} {'MB':>8}"]
    lines += [f"{n:<20} {(m if m is not None else float('nan')):>8.4f} {s:>8.1f}" for n, m, s in rows]
    return "\n".join(lines)


def members_to_drop(entries: List[Dict[str, Any]], budget_bytes: int, overhead: int) -> List[str]:
    """Smallest set (weakest first) whose removal brings an fp16 payload under budget."""
    sizes = {e["name"]: sum(v.numel() * (2 if v.is_floating_point() else v.element_size())
                            for v in e["state_dict"].values()) for e in entries}
    order = sorted(entries, key=lambda e: (e["meta"].get("val_mcc") or 0.0))
    total = sum(sizes.values()) + overhead
    drop = []
    for e in order:
        if total <= budget_bytes:
            break
        drop.append(e["name"])
        total -= sizes[e["name"]]
    return drop


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(models: Sequence[str], out: str, tta: Any = "none", scales: Sequence[float] = (1.0,), merge: str = "mean",
          weights: Optional[Sequence[float]] = None, postprocess: Optional[str] = "none", backend: str = "auto",
          max_mb: float = 300.0, time_budget: Optional[float] = None, test_tiles: int = 100,
          precision: str = "auto", bias: Any = "auto", check_data: Optional[str] = None,
          single_file: bool = False, device: str = "cpu", window: int = 1024) -> Dict[str, Any]:
    """Build a bundle; returns the manifest (also written to ``out/manifest.json``)."""
    from training.models import runtime_supports

    entries = load_members(models)
    names = [e["name"] for e in entries]
    if weights is not None:
        if len(weights) != len(entries):
            raise ValueError(f"--weights has {len(weights)} values for {len(entries)} members")
        for e, w in zip(entries, weights):
            e["weight"] = float(w)
        merge = "weighted"
    resolve_views(tta)  # validate early
    notes: List[str] = []

    # bias: tuned on out-of-fold predictions when they exist
    bias_info: Dict[str, Any] = {"mode": "none"}
    bias_values = None
    tuned_on: Dict[str, List[str]] = {}  # setting -> tile ids it was tuned on (evaluate's leakage guard)
    if isinstance(bias, (list, tuple)):
        bias_values = [float(b) for b in bias]
        bias_info = {"mode": "given", "values": bias_values}
    elif bias == "auto":
        from training.bias import load_oof, tune_bias

        wdirs = {os.path.dirname(e["meta"]["source"]) for e in entries}
        probs, labels, keys = [], [], []
        for wd in sorted(wdirs):
            p, l, k = load_oof(wd, names)
            probs += p
            labels += l
            keys += k
        if probs:
            bias_values, before, after = tune_bias(probs, labels)
            bias_info = {"mode": "tuned on OOF", "values": bias_values, "oof_tiles": len(keys),
                         "oof_mcc_before": before, "oof_mcc_after": after}
            tuned_on["bias"] = sorted(keys)
        else:
            notes.append("no out-of-fold predictions beside the members: bias left at 0")

    rules = load_postprocess(postprocess)
    inference = {"tta": tta, "scales": [float(s) for s in scales], "merge": merge, "bias": bias_values,
                 "window": window, "overlap": 0.25, "max_batch": "auto", "stride": 32, "postprocess": rules}

    # backend
    supported = all(runtime_supports(e["spec"]) for e in entries)
    if backend == "auto":
        backend = "torch" if supported else "onnx"
    if backend == "torch" and not supported:
        bad = [e["name"] for e in entries if not runtime_supports(e["spec"])]
        raise ValueError(f"members {bad} have no pure-torch runtime twin; build with --backend onnx")
    parity_report = {}
    if backend == "onnx":
        from glacier_submit.export import export_member, onnx_tensor

        for e in entries:
            res = export_member(e)
            e["onnx"] = onnx_tensor(res["onnx"])
            parity_report[e["name"]] = res["parity"]
            if not runtime_supports(e["spec"]):
                e["state_dict"] = {}

    payload = make_payload(entries, inference)
    tile = check_tile(check_data)

    # size budget
    budget = int(max_mb * MB)
    blob = serialise(payload)
    fp16 = precision == "fp16"
    agree16 = None
    if precision == "auto" and len(blob) > budget:
        fp16 = True
        notes.append(f"fp32 weights are {len(blob) / MB:.1f} MB > {max_mb:.0f} MB: stored in fp16")
    if fp16:
        p16 = cast_payload(payload, torch.float16)
        if backend == "torch":
            agree16 = agreement(payload, p16, tile)
        payload = p16
        blob = serialise(payload)
    if len(blob) > budget:
        overhead = len(blob) - sum(v.numel() * v.element_size() for e in payload["members"]
                                   for v in e["state_dict"].values())
        drop = members_to_drop(payload["members"], budget, max(overhead, 0))
        raise BudgetError(
            f"bundle is {len(blob) / MB:.1f} MB even in fp16, over the {max_mb:.0f} MB budget.\n"
            f"{size_table(entries, True)}\n"
            f"Drop these members (weakest first) to fit: {drop}, or raise --max-mb if the platform allows it.")

    # time budget: the requested setting is timed once; with a budget, cheaper ones follow until one fits
    candidates = candidate_settings(tta, scales) if time_budget is not None else [(tta, list(scales))]
    for chosen in candidates:
        timing = time_predictor(payload, tile, device, {"tta": chosen[0], "scales": chosen[1]})
        if time_budget is None or timing["tile_s"] <= time_budget:
            break
    else:
        notes.append(f"even the cheapest setting takes {timing['tile_s']:.2f} s per tile "
                     f"> the {time_budget:.2f} s budget: use fewer members")
    if chosen != (tta, list(scales)):  # only a time budget picks another setting
        notes.append(f"time budget {time_budget:.2f} s/tile: TTA {tta!r} x scales {list(scales)} reduced to "
                     f"{chosen[0]!r} x {chosen[1]} (drop order: {DROP_ORDER_DOC})")
        payload["inference"]["tta"], payload["inference"]["scales"] = chosen[0], chosen[1]
        blob = serialise(payload)

    # write
    from glacier_submit.render import render_solution

    os.makedirs(out, exist_ok=True)
    pip = ["onnxruntime"] if backend == "onnx" else []
    source = render_solution(__version__, pip, embedded=blob if single_file else None)
    src_bytes = source.encode("utf-8")
    atomic_write_bytes(os.path.join(out, "solution.py"), src_bytes)
    if single_file:
        if os.path.exists(os.path.join(out, "model.pth")):
            os.unlink(os.path.join(out, "model.pth"))
        if len(src_bytes) > budget:
            raise BudgetError(f"--single-file solution.py is {len(src_bytes) / MB:.1f} MB > {max_mb:.0f} MB; "
                              "drop --single-file or members")
    else:
        atomic_write_bytes(os.path.join(out, "model.pth"), blob)
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
        "tta": views, "scales": payload["inference"]["scales"], "merge": merge,
        "weights": [e["weight"] for e in entries], "bias": bias_info, "tuned_on_tiles": tuned_on, "postprocess": rules,
        "postprocess_preset": postprocess,
        "normalisation": {e["name"]: e["stats"] for e in entries},
        "class_map": payload["class_map"], "bands": payload["bands"],
        "runtime": {"backend": backend, "precision": "fp16" if fp16 else "fp32", "fp16_agreement": agree16,
                    "onnx_parity": parity_report, "single_file": single_file,
                    "built_with": {"python": _pyplatform.python_version(), "torch": torch.__version__}},
        "budget": {"max_mb": max_mb, "time_budget_s": time_budget},
        "timing": {"device": device, "machine": f"{_pyplatform.machine()} {os.cpu_count()} cores",
                   "check_tile": list(tile.shape), "load_s": round(timing["load_s"], 3),
                   "tile_s": round(timing["tile_s"], 3), "forward_views": timing["views"],
                   "test_tiles": test_tiles, "estimated_total_s": round(timing["load_s"] + test_tiles * timing["tile_s"], 1)},
        "files": files, "notes": notes,
    }
    man_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
    atomic_write_bytes(os.path.join(out, "manifest.json"), man_bytes)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("solution.py", src_bytes)
        if not single_file:
            z.writestr("model.pth", blob)
    atomic_write_bytes(os.path.join(out, "submission.zip"), zbuf.getvalue())
    return manifest


def render_manifest(m: Dict[str, Any]) -> str:
    lines = [f"{'member':<16} {'fold':>4} {'seed':>4} {'arch':<16} {'val MCC':>8} {'weight':>7}"]
    for e in m["members"]:
        mcc = e["val_mcc"] if e["val_mcc"] is not None else float("nan")
        lines.append(f"{e['name']:<16} {e['fold']:>4} {e['seed']:>4} {e['arch'] + '/' + e['encoder']:<16} {mcc:>8.4f} {e['weight']:>7.3f}")
    t, r = m["timing"], m["runtime"]
    size = sum(f["bytes"] for f in m["files"].values()) / MB
    lines += [
        "",
        f"TTA {len(m['tta'])} views ({', '.join(m['tta'])}) x scales {m['scales']}, merge {m['merge']}, "
        f"post-processing {m['postprocess_preset'] or 'none'} ({len(m['postprocess'])} rules)",
        f"bias: {m['bias']['mode']}" + (f" {[round(b, 2) for b in m['bias']['values']]}" if m['bias'].get('values') else "")
        + (f" (OOF MCC {m['bias']['oof_mcc_before']:.4f} -> {m['bias']['oof_mcc_after']:.4f})" if 'oof_mcc_after' in m['bias'] else ""),
        f"backend {r['backend']}, weights {r['precision']}"
        + (f" (fp16 vs fp32 class agreement {r['fp16_agreement'] * 100:.3f} %)" if r.get("fp16_agreement") is not None else ""),
        f"size {size:.1f} MB of {m['budget']['max_mb']:.0f} MB",
        f"time on {t['device']} ({t['machine']}): load {t['load_s']:.2f} s, {t['tile_s']:.2f} s per "
        f"{t['check_tile'][1]}x{t['check_tile'][2]} tile -> ~{t['estimated_total_s']:.0f} s for {t['test_tiles']} tiles",
    ]
    lines += [f"note: {n}" for n in m["notes"]]
    return "\n".join(lines)
