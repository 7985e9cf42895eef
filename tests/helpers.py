"""Builders the tests share: tiny TIFF tiles and member checkpoints, the CV command line run in
subprocesses, reference masks for post-processing, small nets and predictors, crafted pickles,
a local HTTP server. Plain functions and classes; the fixtures that use them are in
tests/conftest.py."""
from __future__ import annotations

import ast
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import json

#: the repository root (the folder holding pyproject.toml)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
#: the Python 3.9 + torch 2.0.1 interpreter of the ``compat`` tests (`make venv39`)
PY39 = os.environ.get("GLACIER_PY39", os.path.join(ROOT, ".venv39", "bin", "python"))
#: check-tile size for builds whose timing on a 512x512 tile is not what they test
SMALL = (64, 64)
MB = 1_000_000  # the build counts MB of 10^6 bytes (glacier_submit/selection.py)
BANDS = ("Band1", "Band2", "Band3", "Band4", "Band5")


# ---- tiles and members -----------------------------------------------------------------------
def write_geotiff(path: str, arr: np.ndarray, compress: Optional[str] = None, tiled: bool = False,
                  nodata=None) -> str:
    """Write a single-band GeoTIFF with rasterio (LZW/deflate/tiled as asked)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    os.makedirs(os.path.dirname(path), exist_ok=True)
    profile = dict(driver="GTiff", height=arr.shape[0], width=arr.shape[1], count=1, dtype=arr.dtype.name)
    if compress:
        profile["compress"] = compress
    if tiled:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(arr, 1)
    return path


def make_tile(root: str, tid: str, h: int = 40, w: int = 44, dtype=np.float32, seed: int = 0,
              label_values=(0, 85, 170, 255), naming: str = "train", **kw) -> None:
    """One tile in the competition layout: five band files and a label (random values)."""
    rng = np.random.default_rng(seed)
    names = ([f"B2_B2_masked_{tid}.tif", f"B3_B3_masked_{tid}.tif", f"B4_B4_masked_{tid}.tif",
              f"B6_B6_masked_{tid}.tif", f"B10_B10_masked_{tid}.tif"] if naming == "train" else [f"img{tid}.tif"] * 5)
    for b, name in enumerate(names):
        data = (rng.random((h, w)) * 1000).astype(dtype)
        write_geotiff(os.path.join(root, f"Band{b + 1}", name), data, **kw)
    lab = rng.choice(np.array(label_values, dtype=np.uint8), size=(h, w))
    lname = f"Y_output_resized_{tid}.tif" if naming == "train" else f"img{tid}.tif"
    write_geotiff(os.path.join(root, "label", lname), lab)


def make_member(path: str, seed: int = 0, fold: int = 0, train_tiles=("00_00", "00_01"), val_tiles=("01_00",),
                classes: int = 4, encoder: str = "resnet18", val_mcc: float = 0.5, tile_sha256=None,
                normalization: str = "fold", stats=None) -> str:
    """A tiny member checkpoint in the training format, with random weights (no training).
    ``tile_sha256`` (tile -> content fingerprint, see `fingerprints`) is recorded as training does;
    ``normalization`` is stored in its statistics as training stores data.normalization;
    ``stats`` replaces the (reflectance-like) normalisation numbers."""
    from glacier_runtime.classes import class_map
    from glacier_runtime.models import build_model
    from training.engine.checkpoint import FORMAT, save_atomic

    torch.manual_seed(seed)
    spec = {"arch": "Unet", "encoder": encoder, "in_channels": 5, "classes": classes,
            "decoder_channels": [16, 16, 16, 8, 8], "decoder_attention_type": None}
    model = build_model(spec)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    stats_default = {"bands": ["B2", "B3", "B4", "B6", "B10"], "mean": [0.15, 0.15, 0.15, 0.15, 270.0],
             "std": [0.1, 0.1, 0.1, 0.08, 10.0], "lo": [0.0, 0.0, 0.0, 0.0, 200.0], "hi": [1.0, 1.0, 1.0, 1.0, 320.0]}
    if stats is not None:
        stats = {"bands": ["B2", "B3", "B4", "B6", "B10"], **stats}
    else:
        stats = stats_default
    if normalization != "fold":
        stats.update(mode=normalization, tile_percentiles=[2.0, 98.0])
    save_atomic({"format": FORMAT, "spec": spec, "state_dict": model.state_dict(), "sensor": "L8",
                 "bands": ["B2", "B3", "B4", "B6", "B10"], "stats": stats, "class_map": class_map(classes == 2),
                 "fold": fold, "seed": seed, "train_tiles": list(train_tiles), "val_tiles": list(val_tiles),
                 "history": [], "val_mcc": val_mcc, "best_epoch": 0, "config": {}, "code_version": "test",
                 "tile_sha256": dict(tile_sha256 or {})}, path)
    return path


def fingerprints(root: str, keys=None) -> dict:
    """tile -> content fingerprint of the tiles under ``root`` (all, or ``keys``), as a trained
    member records them: Phase-2 tiles share names across splits, so the leakage guard needs these."""
    from training.data.competition import CompetitionDataset, tile_sha256

    ds = CompetitionDataset(root)
    return {k: tile_sha256(ds.image(k)) for k in (ds.keys if keys is None else keys)}


def member_mb(path: str) -> float:
    """fp16 payload share of one fp32 member checkpoint, in MB."""
    return os.path.getsize(path) / 2 / MB


def huge_tiff(path: str, side: int = 40000) -> str:
    """A ~300-byte deflate TIFF whose header declares side x side pixels."""
    import tifffile

    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as t:
        tags = t.pages[0].tags
        tags["ImageWidth"].overwrite(side)
        tags["ImageLength"].overwrite(side)
        tags["RowsPerStrip"].overwrite(side)
    return path


def write_test_folder(root: str, n: int = 3, size=(40, 44)) -> str:
    """A test folder as the platform names it (``BandK/img00i.tif``), random float32 bands."""
    import tifffile

    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        for b in BANDS:
            os.makedirs(os.path.join(root, b), exist_ok=True)
            tifffile.imwrite(os.path.join(root, b, f"img{i:03d}.tif"), rng.random(size).astype(np.float32))
    return root


def copy_tiles_as(src_root: str, dst_root: str, renames):
    """Copy tiles of ``src_root`` (every band folder and the labels) under new file names."""
    labels = [d for d in ("label", "labels") if os.path.isdir(os.path.join(src_root, d))]
    for band in ("Band1", "Band2", "Band3", "Band4", "Band5", *labels):
        os.makedirs(os.path.join(dst_root, band), exist_ok=True)
        for old, new in renames:
            shutil.copy(os.path.join(src_root, band, old), os.path.join(dst_root, band, new))


def fake_bundle(tmp_path, real_bundle: str, source: str) -> str:
    """A bundle folder whose solution.py is ``source`` (manifest kept for the class map)."""
    b = tmp_path / "fake"
    b.mkdir()
    shutil.copy(os.path.join(real_bundle, "manifest.json"), b / "manifest.json")
    (b / "solution.py").write_text(textwrap.dedent(source))
    return str(b)


def toy_labels():
    """Four 96x96 label tiles: background, glacier, a debris block, and a lake in every other."""
    labs = {}
    for i in range(4):
        lab = np.zeros((96, 96), np.uint8)
        lab[:, 40:] = 1
        lab[70:90, 50:80] = 2
        if i % 2:
            lab[10:14, 10:14] = 3
        labs[f"00_0{i}"] = lab
    return labs


def probs_from_ids(ids, sharp=3.0, rng=None, under=None, k=4):
    """Softmax of one-hot logits (``sharp``), with optional noise and one under-predicted class."""
    logits = np.eye(k, dtype=np.float32)[ids].transpose(2, 0, 1) * sharp
    if rng is not None:
        logits = logits + rng.normal(0, 1.0, logits.shape).astype(np.float32)
    if under is not None:
        logits[under] -= 2.5  # a class the model systematically under-predicts
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


# ---- reference masks for post-processing ------------------------------------------------------------
def worst_case(seed, shape, p=(0.4, 0.3, 0.2, 0.1)):
    """Every pixel an independent class draw: thousands of components."""
    return np.random.default_rng(seed).choice(4, size=shape, p=p).astype(np.uint8)


def blobs(seed, shape, sigma=3.0, cuts=(0.45, 0.5, 0.55)):
    """Smooth class regions (a realistic prediction): few components, lakes of every width."""
    ndi = pytest.importorskip("scipy.ndimage")

    z = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return np.digitize(z, np.quantile(z, cuts)).astype(np.uint8)


# ---- nets and predictors ------------------------------------------------------------------------------
def randomise_bn(model):
    """BatchNorm statistics and scales away from their initial values (seeded)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


class PointwiseNet(nn.Module):
    """1x1 convolutions only: equivariant under every D4 view by construction."""

    def __init__(self, cin=5, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU(), nn.Conv2d(8, k, 1))

    def forward(self, x):
        return self.net(x)


def pointwise_predictor(model=None, **inference):
    """A one-member Predictor on ``model`` (default: :class:`PointwiseNet`), identity statistics."""
    from glacier_runtime.backends import TorchRunner
    from glacier_runtime.normalize import identity_stats
    from glacier_runtime.predictor import Member, Predictor

    model = model or PointwiseNet()
    member = Member(TorchRunner(model, "cpu", fold_bn=False), identity_stats(5), n_classes=4)
    return Predictor([member], inference)


def naive_crf(probs, feats, window, iters, theta_pos, theta_app, w_app, theta_smooth, w_smooth):
    """Mean-field CRF written as a per-pixel loop over every neighbour in the window."""
    import math

    k, h, w = probs.shape
    r = window // 2
    unary = np.log(np.maximum(probs, 1e-8))
    f = np.nan_to_num(feats) / theta_app

    def softmax(z):
        e = np.exp(z - z.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    q = softmax(unary)
    for _ in range(iters):
        msg = np.zeros_like(q)
        for y in range(h):
            for x in range(w):
                for yy in range(max(0, y - r), min(h, y + r + 1)):
                    for xx in range(max(0, x - r), min(w, x + r + 1)):
                        if (yy, xx) == (y, x):
                            continue
                        d2 = (yy - y) ** 2 + (xx - x) ** 2
                        a = math.exp(-((f[:, y, x] - f[:, yy, xx]) ** 2).sum() / 2 - d2 / (2 * theta_pos ** 2))
                        s = math.exp(-d2 / (2 * theta_smooth ** 2))
                        msg[:, y, x] += (w_app * a + w_smooth * s) * q[:, yy, xx]
        q = softmax(unary + msg)
    return q


# ---- training runs ------------------------------------------------------------------------------------
TRAINER_TINY = {"train.epochs": 3, "train.patches_per_epoch": 8, "train.batch_size": 4, "train.patch_size": 64,
                "model.decoder_channels": [16, 16, 16, 8, 8], "train.warmup_epochs": 0}


class InterruptAfter:
    """A callback that interrupts the run after ``epoch``, as Ctrl-C would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, row):
        if epoch >= self.epoch:
            raise KeyboardInterrupt(f"interrupted after epoch {epoch}")


def make_trainer(synth_data, tmp_path, device="cpu", callbacks=(), **over):
    """A Trainer on the synthetic tiles (6 train, 2 validation), 3 tiny epochs unless ``over``."""
    from training.config import load_config
    from training.data.competition import CompetitionDataset
    from training.engine.distributed import DistContext
    from training.engine.trainer import Trainer

    cfg = load_config(QUICK, {**TRAINER_TINY, **over})
    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = sorted(ds.keys)
    return Trainer(cfg, ds, keys[:6], keys[6:8], 0, 0, str(tmp_path / "fold0_seed0.pt"), str(tmp_path / ".work"),
                   DistContext(device=torch.device(device)), progress=False, callbacks=callbacks)


def encoder_file(tmp_path, in_channels, name="enc.pth", whole_model=False, seed=0):
    """An smp ResNet-18 encoder (or whole U-Net) state dict for ``in_channels`` bands, saved."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    m = smp.Unet("resnet18", encoder_weights=None, in_channels=in_channels, classes=4,
                 decoder_channels=[16, 16, 16, 8, 8])
    path = str(tmp_path / name)
    torch.save(m.state_dict() if whole_model else m.encoder.state_dict(), path)
    return path, m.encoder.state_dict()


# ---- glacier-train cv in a subprocess -------------------------------------------------------------------
CV_SETS = ["--set", "train.epochs=3", "--set", "train.patches_per_epoch=8", "--set", "train.batch_size=4",
           "--set", "train.patch_size=64", "--set", "model.decoder_channels=[16,16,16,8,8]",
           "--set", "train.warmup_epochs=0", "--no-progress"]
CV_SETS_2EP = ["--set", "train.epochs=2", "--set", "train.patches_per_epoch=8", "--set", "train.batch_size=4",
               "--set", "train.patch_size=64", "--set", "model.decoder_channels=[16,16,16,8,8]",
               "--set", "train.warmup_epochs=0", "--no-progress"]


def repo_env():
    """The environment of a subprocess that imports this checkout (one thread, no DDP rank)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def cv_cmd(data, folds, out, *extra):
    """`glacier-train cv` of fold 0 on the CPU, 3 tiny epochs."""
    return [sys.executable, "-m", "training.cli", "cv", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            "--data", data, "--folds", folds, "--out", out, "--fold", "0", "--device", "cpu", *CV_SETS, *extra]


def cv_cmd_any_fold(data, folds, out, *extra):
    """`glacier-train cv` on the CPU, 2 tiny epochs, every fold unless ``extra`` names some."""
    return [sys.executable, "-m", "training.cli", "cv", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
            "--data", data, "--folds", folds, "--out", out, "--device", "cpu", *CV_SETS_2EP, *extra]


def kill_after_first_epoch(cmd, out) -> str:
    """Start a CV run, SIGKILL it as soon as fold 0's last.pt exists; returns that path."""
    proc = subprocess.Popen(cmd, env=repo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(out, ".work", "fold0_seed0", "last.pt")
    deadline = time.time() + 240
    while not os.path.exists(last) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return last


# ---- files that must never be unpickled -------------------------------------------------------------------
class _Evil:
    """Unpickling this calls os.mkdir(marker): proof that code from the file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def craft(path: str, marker: str, base: dict = None) -> str:
    """A file that looks like ``base`` (a payload or checkpoint) but carries a reduce payload."""
    obj = dict(base or {})
    obj["evil"] = _Evil(marker)
    torch.save(obj, path)
    return path


# ---- what the runtime may import -------------------------------------------------------------------------
PLATFORM_PACKAGES = {"numpy", "torch", "cv2", "tifffile", "PIL", "tqdm", "onnxruntime"}


def forbidden_imports(src: str, name: str) -> list:
    """Absolute imports of ``src`` outside the standard library and the platform's packages."""
    allowed = set(sys.stdlib_module_names) | PLATFORM_PACKAGES | {"__future__"}
    bad = []
    for node in ast.walk(ast.parse(src, filename=name)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the runtime
                continue
            mods = [node.module]
        else:
            continue
        bad += [m for m in mods if m.split(".")[0] not in allowed]
    return bad


def vermin_violations(folder: str) -> str:
    """'' when every file under ``folder`` runs on Python 3.9, else vermin's report."""
    exe = os.path.join(os.path.dirname(sys.executable), "vermin")
    r = subprocess.run([exe, "--no-tips", "--violations", "-t=3.9-", "--eval-annotations",
                        "--backport", "typing", folder], capture_output=True, text=True)
    return "" if r.returncode == 0 else r.stdout + r.stderr


# ---- a local HTTP server for the downloader ----------------------------------------------------------------
class Server:
    """Routes: path -> behaviour dict. Behaviours: body, drop_after (first N requests, bytes),
    status, ignore_range, corrupt, stall_after, etag. Records (path, Range) of every GET."""

    def __init__(self):
        self.routes: Dict[str, Dict] = {}
        self.log: List[tuple] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                r = server.routes.get(self.path)
                rng = self.headers.get("Range")
                server.log.append((self.path, rng, self.headers.get("If-Range")))
                if r is None or r.get("status", 200) >= 400:
                    code = 404 if r is None else r["status"]
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = r["body"]
                if r.get("corrupt"):
                    body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
                start = 0
                etag = r.get("etag", '"v1"')
                if_range = self.headers.get("If-Range")
                if rng and not r.get("ignore_range") and (if_range is None or if_range == etag):
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", etag)
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = body[start:]
                drops = r.get("drops", 0)
                if drops > 0:
                    r["drops"] = drops - 1
                    self.wfile.write(chunk[: r["drop_after"]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if r.get("trickle"):  # slow but steady: 10 kB every 20 ms
                    for i in range(0, len(chunk), 10_000):
                        self.wfile.write(chunk[i:i + 10_000])
                        self.wfile.flush()
                        time.sleep(0.02)
                    return
                if r.get("stall_after") is not None:
                    self.wfile.write(chunk[: r["stall_after"]])
                    self.wfile.flush()
                    server.release.wait(10)  # hold the socket open, send nothing more
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def quiet_fetch(*a, **k):
    """``training.data.fetch.fetch`` without a terminal, retries without back-off; (info, messages)."""
    from training.data.fetch import fetch

    msgs: List[str] = []
    k.setdefault("say", msgs.append)
    k.setdefault("tty", False)
    k.setdefault("backoff", 0.0)
    k.setdefault("read_timeout", 2.0)
    return fetch(*a, **k), msgs


def file_sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


# ---- the two-GPU path on its CPU stand-ins ------------------------------------------------------------
HKH_QUICK = os.path.join(ROOT, "configs", "hkh_pretrain_quick.yaml")
TINY = {"train.epochs": 2, "train.patches_per_epoch": 8, "train.batch_size": 4, "train.patch_size": 64,
        "model.decoder_channels": [16, 16, 16, 8, 8], "train.warmup_epochs": 0, "train.num_workers": 0}
TINY_SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v).replace(' ', '')}")]
#: the shipped T4 configs' decoder attention (scSE needs decoder blocks of at least 16 channels)
SCSE = {"model.decoder_attention_type": "scse", "model.decoder_channels": [32, 32, 16, 16, 16]}
#: smp's U-Net never runs its last decoder block's first attention (that block has no skip)
LAST_BLOCK_ATTENTION = ["decoder.blocks.4.attention1.attention.cSE.1.weight",
                        "decoder.blocks.4.attention1.attention.cSE.1.bias",
                        "decoder.blocks.4.attention1.attention.cSE.3.weight",
                        "decoder.blocks.4.attention1.attention.cSE.3.bias",
                        "decoder.blocks.4.attention1.attention.sSE.0.weight",
                        "decoder.blocks.4.attention1.attention.sSE.0.bias"]


def kaggle_dataset(synth_data):
    from training.data.competition import CompetitionDataset

    return CompetitionDataset(os.path.join(synth_data, "train"))


def kaggle_trainer(synth_data, tmp_path, **over):
    """A Trainer (6 training tiles, 2 validation, 2 tiny epochs unless ``over``) on the CPU."""
    from training.config import load_config
    from training.engine.trainer import Trainer

    ds = kaggle_dataset(synth_data)
    keys = sorted(ds.keys)
    return Trainer(load_config(QUICK, {**TINY, **over}), ds, keys[:6], keys[6:8], 0, 0,
                   str(tmp_path / "fold0_seed0.pt"), str(tmp_path / ".work"), progress=False)


def kaggle_cv_cmd(synth_data, folds, out, *extra):
    """`glacier-train cv` on the CPU, 2 tiny epochs (every fold unless ``extra`` names some)."""
    return [sys.executable, "-m", "training.cli", "cv", "--config", QUICK, "--data", os.path.join(synth_data, "train"),
            "--folds", folds, "--out", out, "--device", "cpu", "--no-progress", *TINY_SETS, *extra]


def write_band_tif(path: str, h: int = 8, w: int = 8, value: int = 1, transform=None, crs: str = "EPSG:32645") -> str:
    """A georeferenced uint16 band GeoTIFF of one value (a scene's band file for `map` tests)."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=1, dtype="uint16", crs=crs,
                       transform=transform or from_origin(300000, 3100000, 30, 30)) as ds:
        ds.write(np.full((h, w), value, np.uint16), 1)
    return path


def read_landsat_bands(scene) -> np.ndarray:
    """A synthetic Landsat scene's five bands (training/data/landsat.py) as one (5, H, W)
    float32 array, read with rasterio."""
    import rasterio

    from training.data.landsat import BANDS

    bands = []
    for b in BANDS:
        with rasterio.open(os.path.join(scene.folder, f"{scene.name}_{b}.TIF")) as ds:
            bands.append(ds.read(1).astype(np.float32))
    return np.stack(bands)
