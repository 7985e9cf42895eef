"""Run a bundle the way the platform runs it: a fresh interpreter in an empty working
directory, a minimal environment, a time limit, and only the platform's packages
importable (smp, scipy, onnx, rasterio, albumentations, click, yaml, pydantic,
imagecodecs and this repository are blocked).

Environment: only PATH, LANG/LC_ALL, the thread-count and CUDA device variables are
passed through; HOME and TMPDIR point into the run's own temporary folder, which is
removed afterwards. Tokens, ``LD_PRELOAD``, ``PYTHONPATH``, ``TORCH_FORCE_*`` and every
other variable stay out.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

CONVENTIONS = ("imagepath", "data-dict", "import-call")
BLOCKED = ("segmentation_models_pytorch", "scipy", "onnx", "rasterio", "albumentations", "click", "yaml",
           "pydantic", "timm", "training", "glacier_submit", "glacier_runtime", "sklearn", "matplotlib", "onnxscript",
           # the platform's tifffile has no imagecodecs: LZW must go through the OpenCV fallback here too
           "imagecodecs")
#: Default wall-clock limit of one bundle run, in seconds. The platform answers HTTP 504 when a
#: run is too slow and does not publish its limit; 600 s (10 min) is this tool's stand-in, the
#: usual upper setting of a gateway read time-out. Override with ``timeout=`` / ``--timeout``.
DEFAULT_TIMEOUT_S = 600.0
#: Variables passed through to the bundle (when set); everything else is dropped.
PASS_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
            "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "CUDA_VISIBLE_DEVICES", "GLACIER_DEVICE")

_HARNESS = r'''
import importlib.abc, importlib.util, json, os, sys, time
BLOCKED = set(json.loads(os.environ["GLACIER_SANDBOX_BLOCK"]))
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked in the platform sandbox: " + name)
        return None
sys.meta_path.insert(0, _Block())
# the repository itself must not be importable: drop it (and '') from the path
repo = os.environ.get("GLACIER_SANDBOX_REPO")
sys.path[:] = [p for p in sys.path if p not in ("", ".") and (not repo or os.path.abspath(p) != repo)]
conv, bundle, data, out = sys.argv[1:5]
sys.argv = [os.path.join(bundle, "solution.py")]
t0 = time.time()
if conv == "import-call":
    spec = importlib.util.spec_from_file_location("solution", os.path.join(bundle, "solution.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["solution"] = mod
    spec.loader.exec_module(mod)
    band_dict = {n: os.path.join(data, n) for n in sorted(os.listdir(data))
                 if os.path.isdir(os.path.join(data, n)) and n.lower().startswith("band")}
    model = os.path.join(bundle, "model.pth")
    result = mod.maskgeration(band_dict, model if os.path.exists(model) else None)
    import numpy as np
    assert isinstance(result, dict), "maskgeration must return a dict, got %r" % type(result)
    # an .npz written member by member: savez(**ids) breaks on ids such as "file" (its own argument name)
    import zipfile
    with zipfile.ZipFile(os.path.join(out, "returned.npz"), "w", zipfile.ZIP_DEFLATED) as zf:
        for k, v in result.items():
            with zf.open(str(k) + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(v), allow_pickle=False)
    bad = {str(k): str(getattr(v, "dtype", type(v))) for k, v in result.items() if getattr(v, "dtype", None) != np.uint8}
    if bad:
        raise SystemExit("non-uint8 masks returned: %r" % bad)
else:
    if conv == "imagepath":
        sys.argv += ["--imagepath", data, "--output", out]
    else:
        sys.argv += ["--data", data, "--masks", os.path.join(data, "label"), "--out", out]
    import runpy
    runpy.run_path(os.path.join(bundle, "solution.py"), run_name="__main__")
print("GLACIER_SANDBOX_SECONDS=%.3f" % (time.time() - t0))
'''


@dataclass
class RunResult:
    convention: str
    returncode: int
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str
    out_dir: str
    timed_out: bool = False
    masks: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def tail(self, n: int = 2000) -> str:
        return (self.stderr or self.stdout)[-n:]


def _read_masks(out_dir: str, convention: str) -> Dict[str, np.ndarray]:
    """Masks as the platform would see them, keyed by the platform's tile id."""
    from glacier_runtime.tiles import read_band, tile_id

    masks: Dict[str, np.ndarray] = {}
    if convention == "import-call":
        path = os.path.join(out_dir, "returned.npz")
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as z:
                masks = {k: z[k] for k in z.files}
        return masks
    owner: Dict[str, str] = {}
    for name in sorted(os.listdir(out_dir)):
        if name.lower().endswith((".tif", ".tiff")) and not name.startswith("."):
            tid = tile_id(name)
            if tid in owner:
                raise ValueError(f"tile id collision in {out_dir}: {owner[tid]} and {name} both have the platform "
                                 f"tile id {tid!r}; rename one of the inputs")
            owner[tid] = name
            masks[tid] = read_band(os.path.join(out_dir, name))[0]
    return masks


def sandbox_env(home: str, tmp: str, block: bool = True, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The bundle's minimal environment: :data:`PASS_ENV` when set, HOME and TMPDIR in the
    run's scratch space, the import blocker's list; ``extra`` last."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    e = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    e.setdefault("PATH", os.defpath)
    e.setdefault("LANG", "C.UTF-8")
    e.update({"HOME": home, "TMPDIR": tmp, "GLACIER_SANDBOX_BLOCK": json.dumps(list(BLOCKED) if block else []),
              "GLACIER_SANDBOX_REPO": repo, "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"})
    e.update(extra or {})
    return e


def _run(cmd, workdir: str, env: Dict[str, str], limit: float):
    """(returncode, stdout, stderr, timed out, seconds) of one bundle run."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=limit)
        rc, so, se, timed_out = proc.returncode, proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        timed_out, rc = True, -9
        so = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        se = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        se += f"\n[glacier-submit] killed after the {limit:.0f} s timeout"
    seconds = time.time() - t0
    for line in so.splitlines():
        if line.startswith("GLACIER_SANDBOX_SECONDS="):
            seconds = float(line.split("=", 1)[1])
    return rc, so, se, timed_out, seconds


def run_bundle(bundle: str, data: str, convention: str = "imagepath", out_dir: Optional[str] = None,
               timeout: Optional[float] = None, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
               block: bool = True) -> RunResult:
    """Run ``bundle/solution.py`` on ``data`` in a subprocess under one platform convention.

    ``out_dir`` (default: a folder inside the run's scratch space, removed with it) must be
    empty: only what this run writes is read back. ``timeout`` defaults to
    :data:`DEFAULT_TIMEOUT_S`; ``env`` adds variables to the minimal environment."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention {convention!r} unknown; use one of {CONVENTIONS}")
    bundle = os.path.abspath(bundle)
    if not os.path.isfile(os.path.join(bundle, "solution.py")):
        raise FileNotFoundError(f"{bundle} has no solution.py; build it with `glacier-submit build`")
    own_out = out_dir is None
    scratch = tempfile.mkdtemp(prefix="glacier-sandbox-")  # cwd, HOME, TMPDIR; removed afterwards
    try:
        out_dir = os.path.abspath(out_dir or os.path.join(scratch, "out"))
        os.makedirs(out_dir, exist_ok=True)
        if os.listdir(out_dir):
            raise ValueError(f"output folder {out_dir} is not empty; the bundle must write into an empty folder "
                             "so that only this run's masks are read (remove it or pick another)")
        workdir, home, tmp = (os.path.join(scratch, d) for d in ("cwd", "home", "tmp"))  # not the bundle, not the repo
        for d in (workdir, home, tmp):
            os.makedirs(d)
        limit = DEFAULT_TIMEOUT_S if timeout is None else timeout
        cmd = [python or sys.executable, "-c", _HARNESS, convention, bundle, os.path.abspath(data), out_dir]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rc, so, se, timed_out, seconds = _run(cmd, workdir, sandbox_env(home, tmp, block, env), limit)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        res = RunResult(convention, rc, seconds, max(peak, before) / 1024.0, so, se, "" if own_out else out_dir,
                        timed_out)
        if res.ok:
            res.masks = _read_masks(out_dir, convention)
        return res
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
