"""Dataset inspection: a table of tiles, sizes, dtypes, band stats, class shares, problems."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from training.data.competition import CompetitionDataset, DataError
from glacier_runtime.tiles import TileReadError


def inspect_dataset(ds: CompetitionDataset) -> Dict:
    rows: List[Dict] = []
    errors: List[str] = []
    n_cls = len(ds.class_names)
    total = np.zeros(n_cls, np.int64)
    band_vals: List[List[np.ndarray]] = [[] for _ in ds.bands]
    for key in ds.keys:
        row: Dict = {"tile": key}
        try:
            img = ds.image(key)
        except (DataError, TileReadError) as exc:
            errors.append(str(exc))
            row["error"] = str(exc)
            rows.append(row)
            continue
        info = ds.tiles[key]
        row.update(height=int(img.shape[1]), width=int(img.shape[2]), dtypes=sorted(set(info.dtypes)),
                   invalid_pixels=info.invalid_pixels)
        for b in range(img.shape[0]):
            v = img[b][np.isfinite(img[b])]
            band_vals[b].append(v[:: max(1, v.size // 20000)])
        if info.label is not None:
            try:
                counts = ds.class_pixels(key)
                total += counts
                row["class_share"] = (counts / max(counts.sum(), 1)).round(4).tolist()
            except (DataError, TileReadError) as exc:
                errors.append(str(exc))
                row["error"] = str(exc)
        rows.append(row)
    bands = []
    for name, vals in zip(ds.bands, band_vals):
        v = np.concatenate(vals) if vals else np.zeros(0)
        bands.append({"band": name, "min": float(v.min()) if v.size else None, "max": float(v.max()) if v.size else None,
                      "mean": float(v.mean()) if v.size else None, "std": float(v.std()) if v.size else None})
    problems = list(ds.problems)
    if ds.label_mode == "multiclass" and total.sum() and total[1] == 0 and total[2] == 0 and total[3] > 0:
        problems.append("labels only use 0 and 255: if this is the earlier binary phase, pass --label-mode binary")
    return {
        "root": ds.root,
        "tiles": rows,
        "bands": bands,
        "class_names": list(ds.class_names),
        "class_share": (total / max(total.sum(), 1)).round(5).tolist() if total.sum() else None,
        "problems": problems,
        "errors": errors,
    }


def render_inspection(rep: Dict) -> str:
    names = rep["class_names"]
    lines = [f"{rep['root']}: {len(rep['tiles'])} tiles", ""]
    head = f"{'tile':<12} {'size':>11} {'dtypes':<18} {'invalid':>8}  " + " ".join(f"{n[:10]:>10}" for n in names)
    lines += [head, "-" * len(head)]
    for r in rep["tiles"]:
        if "error" in r and "height" not in r:
            lines.append(f"{r['tile']:<12} ERROR {r['error']}")
            continue
        share = r.get("class_share")
        cls = " ".join(f"{s * 100:>9.2f}%" for s in share) if share else "(no label)"
        lines.append(f"{r['tile']:<12} {r['height']:>5}x{r['width']:<5} {','.join(r['dtypes']):<18} {r['invalid_pixels']:>8}  {cls}")
    lines += ["", f"{'band':<8} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}"]
    for b in rep["bands"]:
        if b["min"] is None:
            lines.append(f"{b['band']:<8} (no valid pixels)")
        else:
            lines.append(f"{b['band']:<8} {b['min']:>10.4g} {b['max']:>10.4g} {b['mean']:>10.4g} {b['std']:>10.4g}")
    if rep["class_share"]:
        lines += ["", "overall class share: " + ", ".join(f"{n} {s * 100:.2f}%" for n, s in zip(names, rep["class_share"]))]
    issues = rep["problems"] + rep["errors"]
    lines += ["", f"problems ({len(issues)}):" if issues else "problems: none"]
    lines += [f"  - {p}" for p in issues]
    return "\n".join(lines)
