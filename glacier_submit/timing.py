"""What a bundle costs on the clock: the check tile it is timed on, the predictor's load and
per-tile time, and the time budget (``--time-budget``), which gives up TTA and scales in a
documented order, then the weakest members."""
from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from glacier_runtime.predictor import Predictor
from glacier_runtime.tta import resolve_views
from glacier_submit.selection import drop_weakest

#: What --time-budget drops first: extra scales, then D4 -> flips, then flips -> none, then members.
DROP_ORDER_DOC = ("1) extra scales, 2) D4 -> flips, 3) flips -> no TTA, 4) the weakest members "
                  "(each drop is in the member table)")


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
    adapt_s = 0.0
    if pred.cfg.adapt == "bn":  # one more pass per member over each test tile, before predicting
        t = time.perf_counter()
        pred.adapt_bn([tile])
        one = time.perf_counter() - t
        t = time.perf_counter()
        pred.adapt_bn([tile] * 3)
        three = time.perf_counter() - t
        adapt_s = max((three - one) / 2, 0.0)  # per tile; the rest (re-folding batch norm) is once per run
        load_s += max(one - adapt_s, 0.0)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.predict_ids(tile)
        times.append(time.perf_counter() - t)
    return {"load_s": load_s, "tile_s": float(np.median(times)) + adapt_s, "views": pred.n_forward_views,
            "adapt_s": adapt_s}


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


def _cheapest_fitting(payload, tile, device, tta, scales, time_budget):
    """The first setting of the drop order that fits the budget (the last one when none does)."""
    candidates = candidate_settings(tta, scales) if time_budget is not None else [(tta, list(scales))]
    for chosen in candidates:
        timing = time_predictor(payload, tile, device, {"tta": chosen[0], "scales": chosen[1]})
        if time_budget is None or timing["tile_s"] <= time_budget:
            break
    return timing, chosen


def fit_time(payload: Dict[str, Any], tile: np.ndarray, device: str, tta: Any, scales: Sequence[float],
             time_budget: Optional[float], table: List[Dict[str, Any]], notes: List[str]):
    """Time the requested setting; with a budget, cheaper TTA/scales follow in the documented
    order, then the weakest members go (marked in ``table``). Returns (timing, (tta, scales))."""
    timing, chosen = _cheapest_fitting(payload, tile, device, tta, scales, time_budget)
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
