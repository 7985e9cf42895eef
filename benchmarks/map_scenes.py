"""`glacier-submit map` on this machine: peak memory as the scene grows (up to a full
7,800 x 7,800 Landsat scene) and scenes per hour on one and two Dask workers, in one run.

Scenes are synthetic Landsat 8 L1 folders (`glacier-train synth-scene --content noise`:
random DNs on a tilted footprint; the model's cost does not depend on the picture);
the model is one quickstart-shaped member (ResNet-18 U-Net, slim decoder, random
weights), no TTA, default block 1024.

Memory: each size is mapped in a fresh process that samples its anonymous resident memory
(RssAnon: the heap, not the shared libraries' pages; benchmarks/_rss.py) every 20 ms; the
value after loading the model is the fixed part, the peak while mapping minus it is what
mapping adds.

Throughput: the same N scenes mapped (a) in one process, one after another (the baseline),
(b) on a local Dask cluster of one worker, (c) of two workers; wall time from the call to
the last scene, cluster start included; ratios against (a).

    python benchmarks/map_scenes.py --out benchmarks/results/map_scenes.json
    python benchmarks/map_scenes.py --sizes 512 1024 --scenes 2 --scene-size 512   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _common import write_result

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

_PEAK = r"""
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from _rss import PeakSampler
from glacier_submit.mapping.job import MapOptions, ModelSource, map_scene
src = ModelSource(members=({member!r},), device="cpu")
opts = MapOptions(block={block})
loaded = src.load(opts.block)
t = time.perf_counter()
with PeakSampler() as p:
    s = map_scene({scene!r}, {out!r}, src, opts, loaded=loaded, progress=False)
print(json.dumps({{"loaded_mb": p.start_mb, "peak_mb": p.peak_mb, "seconds": time.perf_counter() - t,
                  "polygons": s["outlines"]["polygons"]}}))
"""


def _scene(root: str, size: int, seed: int, date: str) -> str:
    from training.data.landsat import scene_id, write_landsat_scene

    return write_landsat_scene(root, size, size, seed, "noise", name=scene_id(date=date)).folder


def peak_memory(work: str, member: str, sizes, block: int):
    rows = []
    for i, n in enumerate(sizes):
        folder = _scene(os.path.join(work, f"mem{n}"), n, i, "20210101")
        code = _PEAK.format(root=ROOT, bench=os.path.dirname(os.path.abspath(__file__)), member=member, block=block,
                            scene=folder, out=os.path.join(work, f"memout{n}"))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        row = {"size": n, "megapixels": n * n / 1e6, **json.loads(r.stdout.strip().splitlines()[-1])}
        row["growth_mb"] = row["peak_mb"] - row["loaded_mb"]
        rows.append(row)
        print(f"{n}x{n}: peak heap {row['peak_mb']:.0f} MB (model loaded {row['loaded_mb']:.0f} MB, mapping "
              f"+{row['growth_mb']:.0f} MB), {row['seconds']:.1f} s", flush=True)
        shutil.rmtree(os.path.dirname(folder))
        shutil.rmtree(os.path.join(work, f"memout{n}"))
    return rows


def throughput(work: str, member: str, n_scenes: int, size: int, block: int):
    from glacier_submit.mapping.job import MapOptions, ModelSource, map_scene
    from glacier_submit.mapping.many import map_scenes

    root = os.path.join(work, "many")
    scenes = [_scene(root, size, 100 + i, f"2021{1 + i // 28:02d}{1 + i % 28:02d}") for i in range(n_scenes)]
    src, opts = ModelSource(members=(member,), device="cpu"), MapOptions(block=block)
    out = {}
    t = time.perf_counter()
    loaded = src.load(opts.block)
    for s in scenes:
        map_scene(s, os.path.join(work, "out_seq"), src, opts, loaded=loaded, progress=False)
    out["in_process"] = time.perf_counter() - t
    for w in (1, 2):
        t = time.perf_counter()
        rep = map_scenes(scenes, os.path.join(work, f"out_dask{w}"), src, opts, workers=w, echo=lambda line: None,
                         progress=False)
        out[f"dask_{w}"] = time.perf_counter() - t
        assert len(rep.done) == n_scenes, rep.failed
    rows = {k: {"seconds": v, "scenes_per_hour": n_scenes * 3600 / v, "speed_vs_in_process": out["in_process"] / v}
            for k, v in out.items()}
    for k, r in rows.items():
        print(f"{k}: {r['seconds']:.1f} s for {n_scenes} scenes of {size}x{size}, {r['scenes_per_hour']:.0f} scenes/h "
              f"(x{r['speed_vs_in_process']:.2f} vs in-process)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 7800])
    ap.add_argument("--scenes", type=int, default=4, help="scenes for the throughput part")
    ap.add_argument("--scene-size", type=int, default=2048)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    from tests.helpers import make_member

    work = a.work or tempfile.mkdtemp(prefix="map_bench_")
    os.makedirs(work, exist_ok=True)
    member = make_member(os.path.join(work, "fold0_seed0.pt"))
    t0 = time.time()
    result = {
        "command": "python benchmarks/map_scenes.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "model": "1 member, ResNet-18 U-Net (decoder 16-16-16-8-8), random weights, no TTA",
        "block": a.block,
        "memory": peak_memory(work, member, a.sizes, a.block),
        "throughput": {"scenes": a.scenes, "size": a.scene_size, **throughput(work, member, a.scenes, a.scene_size, a.block)},
    }
    result["seconds"] = time.time() - t0
    write_result(a.out, result)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
