"""How well the mosaic is rebuilt from edge continuity (the folds' grouping for `img###`
names): recall and precision of the true neighbour pairs, per region and seed, on
synthetic scenes cut exactly as the generator cuts them (shuffled Phase-2 numbering).

    python benchmarks/mosaic_grouping.py --out benchmarks/results/mosaic_grouping.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_result


def one(region: str, seed: int, rows: int, cols: int, size: int) -> dict:
    from training.data.scenes import generate_scene
    from training.data.scenes.regions import REGIONS
    from training.mosaic import from_edges, score_pairs

    import numpy as np

    bands, _ = generate_scene(rows, cols, (size, size), seed, REGIONS[region])
    names = np.random.default_rng(seed + 77).permutation(rows * cols)
    tiles, truth = {}, {}
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        key = f"img{names[i] + 1:03d}"
        tiles[key] = bands[:, r * size:(r + 1) * size, c * size:(c + 1) * size]
        truth[key] = (r, c)
    t0 = time.perf_counter()
    lay = from_edges(tiles)
    s = score_pairs(lay, truth)
    return {"region": region, "seed": seed, **s, "mosaics": len({p[0] for p in lay.positions.values()}),
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regions", nargs="*", default=["khumbu", "lahaul", "karakoram", "bhutan", "tienshan"])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--cols", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    print(f"{'region':<10} {'seed':>4} {'pairs':>5} {'found':>5} {'right':>5} {'recall':>7} {'precision':>9} {'mosaics':>7}")
    for region in a.regions:
        for seed in a.seeds:
            r = one(region, seed, a.rows, a.cols, a.size)
            rows.append(r)
            print(f"{region:<10} {seed:>4} {r['true_pairs']:>5} {r['found_pairs']:>5} {r['correct']:>5} "
                  f"{r['recall']:>7.3f} {r['precision']:>9.3f} {r['mosaics']:>7}", flush=True)
    want = sum(r["true_pairs"] for r in rows)
    got = sum(r["found_pairs"] for r in rows)
    hit = sum(r["correct"] for r in rows)
    total = {"true_pairs": want, "found_pairs": got, "correct": hit, "recall": hit / want, "precision": hit / max(got, 1)}
    print(f"all: recall {total['recall']:.3f} ({hit}/{want}), precision {total['precision']:.3f} ({hit}/{got})")
    write_result(a.out, {"benchmark": "mosaic_grouping", "rows": rows, "total": total, "grid": [a.rows, a.cols],
                         "size": a.size, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                         "date": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
