"""Evaluation report: report.md, report.html and PNG figures (matplotlib, optional: without
it the report is written without figures and says so)."""
from __future__ import annotations

import html
import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from glacier_runtime.atomic import atomic_write_text, atomic_write_with
from glacier_submit.manifest import Manifest

COLOURS = np.array([[40, 40, 40], [120, 200, 255], [190, 120, 50], [20, 60, 230]], np.uint8)


def rgb_composite(img: np.ndarray) -> np.ndarray:
    rgb = np.stack([img[2], img[1], img[0]], -1).astype(np.float32)
    rgb = np.nan_to_num(rgb)
    lo, hi = np.percentile(rgb, [1, 99])
    return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)


def figures_available() -> bool:
    """Whether matplotlib can be imported (checked before an evaluation starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(out: str, r: Dict[str, Any], ds, keys: Sequence[str], preds: Dict[str, np.ndarray],
                 manifest: Manifest, max_tiles: int = 6, figures: bool = True) -> List[str]:
    """report.md and report.html, with PNG figures when ``figures`` (needs matplotlib)."""
    figs = _write_figures(out, r, ds, keys, preds, max_tiles) if figures else []
    figs += training_curves(out, manifest)
    _write_md_html(out, r, manifest, figs)
    return figs


def training_curves(out: str, manifest: Manifest) -> List[str]:
    """The members' training curves (``curves.png`` written by ``glacier-train cv`` beside
    them), copied into the report when the members' folder is still there."""
    from glacier_runtime.atomic import atomic_write_bytes

    from training.rundir import RunDir

    found: List[str] = []
    for i, folder in enumerate(manifest.member_folders()):
        src = RunDir(folder).curves_png
        if os.path.isfile(src):
            dst = os.path.join(out, "figures", "curves.png" if i == 0 else f"curves_{i}.png")
            with open(src, "rb") as fh:
                atomic_write_bytes(dst, fh.read())
            found.append(dst)
    return found


def _save(fig, path: str, dpi: int) -> str:
    import matplotlib.pyplot as plt

    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    plt.close(fig)
    return path


def _tiles_figure(plt, r: Dict[str, Any], ds, shown: Sequence[str], preds: Dict[str, np.ndarray], cols):
    """Per tile: RGB composite, truth, prediction and error map."""
    fig, axes = plt.subplots(len(shown), 4, figsize=(12, 3 * len(shown)), squeeze=False)
    for row, key in zip(axes, shown):
        truth, pred = ds.label(key), preds[key]
        err = np.zeros(truth.shape + (3,), np.uint8)
        err[truth != pred] = [230, 30, 30]
        err[truth == pred] = [235, 235, 235]
        titles = ["RGB (B4/B3/B2)", "ground truth",
                  f"prediction (MCC {r['per_tile_mcc'].get(key, float('nan')):.3f})", "errors"]
        for ax, im, title in zip(row, [rgb_composite(ds.image(key)), cols[truth], cols[pred], err], titles):
            ax.imshow(im)
            ax.set_title(f"{key}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return fig


def _confusion_figure(plt, r: Dict[str, Any], names: Sequence[str]):
    cm = np.asarray(r["confusion"], np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{norm[i, j] * 100:.1f}%", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (row-normalised), MCC {r['mcc']:.4f}")
    fig.tight_layout()
    return fig


def _per_class_figure(plt, r: Dict[str, Any], names: Sequence[str]):
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(names))
    for i, metric in enumerate(("mcc", "iou", "f1")):
        ax.bar(x + (i - 1) * 0.27, [c[metric] for c in r["per_class"]], 0.27, label=metric.upper())
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("per-class scores")
    fig.tight_layout()
    return fig


def _write_figures(out: str, r: Dict[str, Any], ds, keys: Sequence[str], preds: Dict[str, np.ndarray],
                   max_tiles: int) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figs: List[str] = []
    names = list(ds.class_names)
    shown = [k for k in keys if k in preds][:max_tiles]
    if shown:
        figs.append(_save(_tiles_figure(plt, r, ds, shown, preds, COLOURS[: len(names)]),
                          os.path.join(fig_dir, "tiles.png"), 80))
    if "confusion" in r:
        figs.append(_save(_confusion_figure(plt, r, names), os.path.join(fig_dir, "confusion.png"), 90))
        figs.append(_save(_per_class_figure(plt, r, names), os.path.join(fig_dir, "per_class.png"), 90))
    return figs


def _write_md_html(out: str, r: Dict[str, Any], manifest: Manifest, figs: List[str]) -> None:
    rel = [os.path.relpath(f, out) for f in figs]
    md = ["# Evaluation report", ""]
    if r.get("leaky"):
        md += ["**LEAKY EVALUATION**: members trained on evaluated tiles; this score is optimistic.", ""]
    md += [f"- bundle: `{r['bundle']}` ({len(manifest.members)} members, TTA {len(manifest.tta)} views x "
           f"scales {manifest.scales})", f"- data: `{r['data']}`, {len(r['tiles'])} tiles, convention `{r['convention']}`",
           f"- date: {r['date']}", "", "```", render_report(r), "```", ""]
    if r.get("ablations"):
        md += ["## Ablations", "", "| variant | MCC | ΔMCC | s/tile | Δs/tile | forward views |", "|---|---|---|---|---|---|"]
        md += [f"| {v['variant']} | {v['mcc']:.4f} | {v['delta_mcc']:+.4f} | {v['seconds_per_tile']:.2f} | "
               f"{v['delta_seconds']:+.2f} | {v['views']} |" for v in r["ablations"]]
        md.append("")
    md += [f"![{os.path.basename(f)}]({f})" for f in rel]
    atomic_write_text(os.path.join(out, "report.md"), "\n".join(md) + "\n")
    body = ["<h1>Evaluation report</h1>"]
    if r.get("leaky"):
        body.append("<p style='color:#b00'><b>LEAKY EVALUATION</b>: members trained on evaluated tiles.</p>")
    body.append("<pre>" + html.escape(render_report(r)) + "</pre>")
    body += [f"<img src='{html.escape(f)}' style='max-width:100%'>" for f in rel]
    atomic_write_text(os.path.join(out, "report.html"),
                      "<!doctype html><meta charset='utf-8'><title>glacier evaluation</title>" + "\n".join(body))


def render_report(r: Dict[str, Any]) -> str:
    """The plain-text summary printed by ``glacier-submit evaluate`` and embedded in report.md."""
    lines = []
    if r.get("leaky"):
        lines.append("LEAKY EVALUATION: members trained on (or settings tuned on) evaluated tiles "
                     + json.dumps(r["leaks"]))
    if r.get("missing"):
        lines.append(f"MISSING: the bundle produced no usable mask for {len(r['missing'])} of {len(r['tiles'])} "
                     f"tiles ({', '.join(r['missing'][:10])}{' ...' if len(r['missing']) > 10 else ''}); "
                     f"{r.get('missing_rule', 'scored as background')}")
    if "mcc" in r:
        lines.append(f"MCC over all pixels of {len(r['tiles'])} tiles: {r['mcc']:.4f}")
        lines.append(f"{'class':<12} {'MCC':>7} {'IoU':>7} {'F1':>7} {'support':>10}")
        lines[-1] = (f"{'class':<12} {'MCC 1-vs-rest':>13} {'IoU':>7} {'recall':>7} {'precision':>9} {'F1':>7} "
                     f"{'support':>10}")
        for c in r["per_class"]:
            lines.append(f"{c['class']:<12} {c['mcc']:>13.3f} {c['iou']:>7.3f} {c.get('recall', float('nan')):>7.3f} "
                         f"{c.get('precision', float('nan')):>9.3f} {c['f1']:>7.3f} {c['support']:>10}")
    if r.get("grade"):
        from training.reporting.grading import render_grade

        lines += ["", "graded against training/reporting/targets.yaml (evaluate):", render_grade(r["grade"]), ""]
    if r.get("tuning_decisions"):
        from glacier_submit.tuning.decisions import render_decision_rows

        lines += ["decisions of build --tune oof (taken on the training region's out-of-fold predictions):"]
        lines += render_decision_rows(r["tuning_decisions"]) + [""]
    budget = r.get("time_budget_s")
    lines.append(f"time: {r['seconds']:.1f} s total, {r['seconds_per_tile']:.2f} s per tile"
                 + (f" (budget {budget:.2f} s per tile: {'OK' if r['seconds_per_tile'] <= budget else 'OVER'})" if budget else "")
                 + f", peak RSS {r['peak_rss_mb']:.0f} MB")
    for p in r.get("problems", []):
        lines.append(f"problem: {p}")
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    if r.get("ablations"):
        lines.append("")
        lines.append(f"{'variant':<44} {'MCC':>7} {'dMCC':>8} {'s/tile':>7} {'ds/tile':>8} {'views':>6}")
        for v in r["ablations"]:
            lines.append(f"{v['variant']:<44} {v['mcc']:>7.4f} {v['delta_mcc']:>+8.4f} {v['seconds_per_tile']:>7.2f} "
                         f"{v['delta_seconds']:>+8.2f} {v['views']:>6}")
    return "\n".join(lines)
