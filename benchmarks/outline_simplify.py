"""How far simplified outlines move from the pixel edges, and what sharing boundaries costs:
GEOS coverage simplification (what `glacier-submit map` writes) against Douglas-Peucker per
polygon (what it wrote before 2026-12-02), on random 4-class maps with bodies of several sizes.

Per map and tolerance: the largest and the 99th-percentile Hausdorff distance from a body's
pixel-edge outline, in tolerances; the overlap area between neighbours (m2); invalid
polygons; the heap added while simplifying (RssAnon, also per pixel edge of outline); seconds,
and their ratio to Douglas-Peucker's in the same run.

    python benchmarks/outline_simplify.py --size 1200 --out benchmarks/results/outline_simplify.json
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result
from _rss import PeakSampler
from glacier_submit.mapping.outputs import simplify_coverage, trace_bodies

PIXEL = 30.0
_LIBC = ctypes.CDLL("libc.so.6")


def class_map(size: int, seed: int, sigma: float) -> np.ndarray:
    """Clean ice, debris inside it and lakes from smoothed noise (sigma: body size in pixels)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    f = [ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma) for _ in range(3)]
    f = [x / x.std() for x in f]
    ids = np.zeros((size, size), np.uint8)
    ids[f[0] > 0.1] = 1
    ids[(f[1] > 0.2) & (ids == 1)] = 2
    ids[f[2] > 0.8] = 3
    return ids


def bodies(ids: np.ndarray) -> np.ndarray:
    from rasterio.transform import from_origin

    return trace_bodies(ids, from_origin(500000, 4000000, PIXEL, PIXEL))[0]


def overlap(polys: np.ndarray) -> float:
    import shapely

    polys = shapely.make_valid(polys)  # Douglas-Peucker's output is not always valid
    left, right = shapely.STRtree(polys).query(polys, predicate="intersects")
    keep = left < right
    return float(shapely.area(shapely.intersection(polys[left[keep]], polys[right[keep]])).sum())


def measure(exact: np.ndarray, tolerance: float, method: str) -> dict:
    import shapely

    gc.collect()
    _LIBC.malloc_trim(0)  # give freed heap back, so this run's peak is its own, not the last run's
    with PeakSampler() as mem:
        t0 = time.perf_counter()
        if method == "coverage":
            simple, _ = simplify_coverage(exact, tolerance, PIXEL)
        else:
            simple = shapely.simplify(exact, tolerance, preserve_topology=True)
        seconds = time.perf_counter() - t0
    edges = float(shapely.length(exact).sum()) / PIXEL  # vertices once segmentized (simplify_coverage)
    ratio = shapely.hausdorff_distance(exact, simple) / tolerance
    return {"seconds": round(seconds, 4), "hausdorff_max_tol": round(float(ratio.max()), 3),
            "hausdorff_p99_tol": round(float(np.quantile(ratio, 0.99)), 3), "overlap_m2": round(overlap(simple), 1),
            "vertices": int(shapely.get_num_coordinates(simple).sum()),
            "invalid": int((~shapely.is_valid(simple)).sum()), "heap_added_mb": round(mem.peak_mb - mem.start_mb, 1),
            "bytes_per_pixel_edge": round((mem.peak_mb - mem.start_mb) * 2 ** 20 / edges, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1200, help="map side in pixels")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[2, 6, 12], help="body scales in pixels")
    ap.add_argument("--tolerances", type=float, nargs="+", default=[30, 45, 90], help="metres (a pixel is 30 m)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for seed, sigma in enumerate(args.sigmas):
        exact = bodies(class_map(args.size, seed, sigma))
        for tol in args.tolerances:
            cov, dp = measure(exact, tol, "coverage"), measure(exact, tol, "douglas_peucker")
            row = {"sigma_px": sigma, "bodies": len(exact), "tolerance_m": tol, "coverage": cov, "douglas_peucker": dp,
                   "time_ratio": round(cov["seconds"] / max(dp["seconds"], 1e-9), 2)}
            rows.append(row)
            print(f"sigma {sigma:>4} px, {len(exact):>6} bodies, tol {tol:>4} m: coverage max {cov['hausdorff_max_tol']:.2f} "
                  f"p99 {cov['hausdorff_p99_tol']:.2f} tol, overlap {cov['overlap_m2']:.0f} m2 | Douglas-Peucker max "
                  f"{dp['hausdorff_max_tol']:.2f} p99 {dp['hausdorff_p99_tol']:.2f}, overlap {dp['overlap_m2']:.0f} m2 | "
                  f"invalid {cov['invalid']} vs {dp['invalid']} | "
                  f"heap +{cov['heap_added_mb']:.0f} vs +{dp['heap_added_mb']:.0f} MB | "
                  f"{cov['seconds']:.2f} s vs {dp['seconds']:.2f} s (x{row['time_ratio']})",
                  flush=True)
    worst = max(r["coverage"]["hausdorff_max_tol"] for r in rows)
    print(f"largest distance, coverage simplification: {worst:.2f} x tolerance")
    write_result(args.out, {"size": args.size, "pixel_m": PIXEL, "rows": rows, "coverage_hausdorff_max_tol": worst,
                            "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs"})


if __name__ == "__main__":
    main()
