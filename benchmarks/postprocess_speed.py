"""Post-processing speed: today's linear rules vs the previous per-component loop, in one run.

Masks: a worst-case random mask (every pixel an independent class draw: a component per
few pixels), a realistic prediction (a per-pixel nearest-centroid classifier on a
synthetic scene: speckled like a real per-pixel prediction, with large glacier bodies)
and, with ``--member``, a trained member's own prediction of a synthetic scene, each at
512x512 and 2048x2048, for the ``light`` and ``competition`` presets, on one OpenCV thread
(wall time and CPU time: CPU time is robust to other jobs on a shared machine), plus the
new code's wall time with OpenCV's default thread pool (what the runtime gets). Both
implementations must return the same mask wherever the baseline finishes;
``--compare-with FILE`` times a third implementation (e.g. an earlier commit's) in the
same run and checks it equal.

The baseline (BASELINE_* below) is a verbatim copy of the pre-issue-15 implementation,
kept here only to be measured; it scans the whole tile once per component, so it is run
under a time cap and, when cut, its total is extrapolated from the share of components it
processed (marked "extrapolated").

    python benchmarks/postprocess_speed.py --out benchmarks/results/postprocess_speed.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import cv2
import numpy as np
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result

from glacier_runtime import postprocess

# ---------------------------------------------------------------------------------------------
# BASELINE: the previous implementation (quadratic in the number of components), verbatim but
# for the time cap. Not part of the runtime.
# ---------------------------------------------------------------------------------------------
_K8 = np.ones((3, 3), np.uint8)


class _Cut(Exception):
    pass


class _Budget:
    def __init__(self, cap_s: float):
        self.t0, self.cap, self.done = time.perf_counter(), cap_s, 0

    def tick(self) -> None:
        self.done += 1
        if time.perf_counter() - self.t0 > self.cap:
            raise _Cut()


def _b_components(binary, connectivity=8):
    n, lab, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=connectivity)
    return n, lab, stats[:, cv2.CC_STAT_AREA]


def _b_relabel_by_boundary(mask, comp, exclude, n_classes):
    ys, xs = np.nonzero(comp)
    y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, mask.shape[0])
    x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, mask.shape[1])
    sub = comp[y0:y1, x0:x1]
    ring = cv2.dilate(sub.astype(np.uint8), _K8).astype(bool) & ~sub
    vals = mask[y0:y1, x0:x1][ring]
    vals = vals[vals != exclude]
    new = int(np.bincount(vals, minlength=n_classes).argmax()) if vals.size else 0
    mask[y0:y1, x0:x1][sub] = new


def BASELINE_remove_small(mask, cls, min_area, n_classes, budget):
    out = mask.copy()
    n, lab, area = _b_components(mask == cls, 8)
    for i in range(1, n):
        if area[i] < min_area:
            _b_relabel_by_boundary(out, lab == i, cls, n_classes)
            budget.tick()
    return out


def BASELINE_fill_holes(mask, cls, max_area, budget):
    out = mask.copy()
    n, lab, area = _b_components(mask != cls, 4)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
    for i in range(1, n):
        budget.tick()
        if i in border:
            continue
        if max_area is None or area[i] <= max_area:
            out[lab == i] = cls
    return out


def BASELINE_lake_shape(mask, cls, min_area, min_width, n_classes, budget):
    out = mask.copy()
    n, lab, area = _b_components(mask == cls, 8)
    if n <= 1:
        return out
    dist = (cv2.distanceTransform(np.pad((mask == cls).astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
            if min_width else None)
    for i in range(1, n):
        comp = lab == i
        thin = dist is not None and 2.0 * float(dist[comp].max()) < min_width
        if area[i] < min_area or thin:
            _b_relabel_by_boundary(out, comp, cls, n_classes)
        budget.tick()
    return out


def BASELINE_debris_needs_glacier(mask, debris, glacier, to):
    out = mask.copy()
    n, lab, _ = _b_components(mask == debris, 8)
    if n <= 1:
        return out
    near = cv2.dilate((mask == glacier).astype(np.uint8), _K8).astype(bool)
    touching = np.unique(lab[near & (lab > 0)])
    keep = np.zeros(n, bool)
    keep[touching] = True
    out[(lab > 0) & ~keep[lab]] = to
    return out


def BASELINE_apply(mask, rules, budget, n_classes=4):
    out = np.ascontiguousarray(mask, dtype=np.uint8)
    for r in rules:
        name = r["rule"]
        if name == "min_area":
            out = BASELINE_remove_small(out, int(r["class"]), int(r["min_area"]), n_classes, budget)
        elif name == "fill_holes":
            out = BASELINE_fill_holes(out, int(r["class"]), r.get("max_area"), budget)
        elif name == "lake_shape":
            out = BASELINE_lake_shape(out, int(r.get("class", 3)), int(r.get("min_area", 0)),
                                      float(r.get("min_width", 0.0)), n_classes, budget)
        elif name == "debris_needs_glacier":
            out = BASELINE_debris_needs_glacier(out, int(r.get("class", 2)), int(r.get("glacier", 1)), int(r.get("to", 0)))
    return out


def _count_work(mask, rules, n_classes=4) -> int:
    """Components the baseline loops over, counted rule by rule on the new code's outputs
    (equal masks), so a cut baseline can be extrapolated."""
    total, out = 0, mask
    for r in rules:
        name = r["rule"]
        if name == "min_area":
            _, _, area = _b_components(out == int(r["class"]), 8)
            total += int((area[1:] < int(r["min_area"])).sum())
        elif name in ("fill_holes", "lake_shape"):
            binary = out != int(r["class"]) if name == "fill_holes" else out == int(r.get("class", 3))
            total += _b_components(binary, 4 if name == "fill_holes" else 8)[0] - 1
        out = postprocess.apply(out, [r], n_classes)
    return total
# --------------------------------------------------------------------------------- end BASELINE


def worst_case(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(4, size=(size, size), p=(0.4, 0.3, 0.2, 0.1)).astype(np.uint8)


def realistic(size: int, seed: int = 0) -> np.ndarray:
    """A per-pixel prediction: nearest class centroid (fitted on the scene's own labels) of
    the standardised 5 band values of a synthetic scene."""
    from training.data.synth import generate_scene

    bands, labels = generate_scene(1, 1, (size, size), seed)
    x = bands.reshape(5, -1).T.astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    y = labels.ravel()
    cents = np.stack([x[y == k].mean(0) if (y == k).any() else np.full(5, 1e9) for k in range(4)])
    d = ((x[:, None, :] - cents[None]) ** 2).sum(-1)
    return d.argmin(1).astype(np.uint8).reshape(size, size)


def member_prediction(path: str):
    """A trained member's class-id prediction (no TTA, post-processing off) of a synthetic
    scene of the requested size: the masks post-processing meets after a real model."""
    from glacier_runtime.predictor import Predictor
    from glacier_submit.members import load_members, make_payload
    from training.data.synth import generate_scene

    payload = make_payload(load_members([path]), {"tta": "none", "scales": [1.0], "postprocess": []})
    pred = Predictor.from_payload(payload, device="cpu")

    def make(size: int, seed: int = 0) -> np.ndarray:
        bands, _ = generate_scene(1, 1, (size, size), seed + 7)
        return pred.predict_ids(bands).astype(np.uint8)

    return make


def components(mask: np.ndarray) -> int:
    return int(sum(cv2.connectedComponents((mask == k).astype(np.uint8), connectivity=8)[0] - 1 for k in range(4)))


def _time(apply, mask, rules, repeats):
    """Median wall and CPU seconds of ``apply(mask, rules)`` after one warm-up call."""
    apply(mask, rules)
    ts, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        apply(mask, rules)
        ts.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(ts)), float(np.median(cpu))


def _load(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("postprocess_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--presets", nargs="+", default=["light", "competition"])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the new code (median)")
    ap.add_argument("--cap", type=float, default=15.0, help="seconds before the baseline is cut and extrapolated")
    ap.add_argument("--compare-with", default=None, metavar="FILE",
                    help="another postprocess.py (e.g. `git show REV:glacier_runtime/postprocess.py > old.py`) "
                         "timed in the same run on the same masks, and checked equal")
    ap.add_argument("--member", default=None, metavar="PT",
                    help="a trained member (e.g. demo/weights/fold0_seed0.pt): adds its predictions of "
                         "synthetic scenes at each size as a third kind of mask")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    other = _load(args.compare_with) if args.compare_with else None
    default_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core for both implementations: CPU time == work
    root = os.path.join(os.path.dirname(__file__), "..", "glacier_submit", "presets")
    rows = []
    for size in args.sizes:
        kinds = [("worst-case random", worst_case), ("realistic prediction", realistic)]
        if args.member:
            kinds.append(("member prediction", member_prediction(args.member)))
        for kind, make in kinds:
            mask = make(size)
            ncomp = components(mask)
            for preset in args.presets:
                with open(os.path.join(root, f"{preset}.yaml")) as fh:
                    rules = postprocess.validate_rules(yaml.safe_load(fh)["rules"])
                new_out = postprocess.apply(mask, rules)
                new_s, new_cpu = _time(postprocess.apply, mask, rules, args.repeats)
                extra = {}
                if other is not None:
                    o_s, o_cpu = _time(other.apply, mask, rules, args.repeats)
                    extra.update(other_s=round(o_s, 4), other_cpu_s=round(o_cpu, 4),
                                 other_equal=bool(np.array_equal(other.apply(mask, rules), new_out)))
                cv2.setNumThreads(default_threads)  # what the runtime gets: OpenCV's own thread pool
                extra["new_default_threads_s"] = round(_time(postprocess.apply, mask, rules, args.repeats)[0], 4)
                extra["opencv_default_threads"] = default_threads
                cv2.setNumThreads(1)
                budget = _Budget(args.cap)
                t = time.perf_counter()
                try:
                    old_out = BASELINE_apply(mask, rules, budget)
                    old_s, how, equal = time.perf_counter() - t, "measured", bool(np.array_equal(old_out, new_out))
                except _Cut:
                    spent = time.perf_counter() - t
                    total = _count_work(mask, rules)
                    how = f"extrapolated ({budget.done}/{total} components in {spent:.1f} s)"
                    old_s, equal = spent * total / max(budget.done, 1), None
                row = {"size": size, "mask": kind, "components": ncomp, "preset": preset,
                       "new_s": round(new_s, 4), "new_cpu_s": round(new_cpu, 4), "old_s": round(old_s, 2), "old": how,
                       "speedup": round(old_s / new_s, 1), "equal": equal, **extra}
                rows.append(row)
                print(f"{size:5d} {kind:<21} {preset:<12} comps {ncomp:8d}  new {new_s:7.3f} s (cpu {new_cpu:6.3f} s)  old {old_s:9.2f} s "
                      f"({how})  x{old_s / new_s:,.0f}  equal={equal}  {extra}", flush=True)
    out = {"benchmark": "postprocess_speed", "rows": rows,
           "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), numpy {np.__version__}, cv2 {cv2.__version__}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_result(args.out, out)


if __name__ == "__main__":
    main()
