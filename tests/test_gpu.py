"""The CUDA paths: AMP training, fp16 inference, the ONNX CUDA provider, resume on CUDA.

Marked ``gpu``: they run wherever CUDA exists (in the default tier) and skip with the
reason elsewhere. Each compares the CUDA path against the CPU path it replaces.
"""
import json
import os
import sys
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, cv_cmd, kill_after_first_epoch, repo_env

HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (no GPU visible to torch here); runs wherever one is"),
]
TINY = {"train.epochs": 2, "train.patches_per_epoch": 8, "train.batch_size": 4, "train.patch_size": 64,
        "train.warmup_epochs": 0, "train.num_workers": 0, "model.decoder_channels": [16, 16, 16, 8, 8]}


def _member_entry(path):
    from glacier_submit.members import load_members

    return load_members([path])[0]


def test_amp_training_on_cuda(synth_data, tmp_path):
    """fp16 autocast + GradScaler on CUDA: finite losses and a portable (CPU-tensor) member."""
    from training.engine.checkpoint import load_checkpoint
    from training.config import load_config
    from training.data.competition import CompetitionDataset
    from training.engine.distributed import init_distributed
    from training.engine.trainer import train_member

    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), {**TINY, "train.amp": True})
    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = ds.keys
    ctx = init_distributed("cuda")
    assert ctx.device.type == "cuda"
    out = str(tmp_path / "m.pt")
    train_member(cfg, ds, keys[:6], keys[6:], 0, 0, out, str(tmp_path / "work"), ctx, progress=False)
    ck = load_checkpoint(out)
    assert all(np.isfinite(h["loss_total"]) for h in ck["history"])
    assert all(v.device.type == "cpu" for v in ck["state_dict"].values())  # portable checkpoint


def test_fp16_inference_matches_fp32(tiny_members):
    from glacier_runtime.predictor import member_from_entry, Predictor

    img = np.random.default_rng(0).normal(size=(5, 96, 128)).astype(np.float32) * 0.1 + 0.15
    e = _member_entry(tiny_members[0])
    cpu = Predictor([member_from_entry(e, "cpu")], {"tta": "flips"}).predict_proba(img)
    gpu_member = member_from_entry(e, "cuda")
    assert gpu_member.runner.fp16  # autocast on CUDA by default
    gpu = Predictor([gpu_member], {"tta": "flips"}).predict_proba(img)
    assert np.abs(gpu - cpu).max() < 2e-2
    assert (gpu.argmax(0) == cpu.argmax(0)).mean() > 0.99


def test_onnx_cuda_provider(tiny_members):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    from glacier_runtime.backends import OnnxRunner
    from glacier_submit.export import export_onnx, torch_model_for

    model = torch_model_for(_member_entry(tiny_members[0]))
    runner = OnnxRunner(export_onnx(model, 5), "cuda")
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
    x = torch.randn(2, 5, 64, 96)
    with torch.no_grad():
        assert (runner(x) - model(x)).abs().max() < 1e-3


def test_resume_on_cuda(synth_data, folds_file, tmp_path):
    """SIGKILL after the first epoch's last.pt on CUDA, re-run: it resumes (optimizer, scaler
    and EMA state back on the GPU) and keeps the epochs it had."""
    from training.engine.checkpoint import load_checkpoint

    out = str(tmp_path / "cv")
    cmd = [c if c != "cpu" else "cuda" for c in cv_cmd(os.path.join(synth_data, "train"), folds_file, out)]
    last = kill_after_first_epoch(cmd, out)
    kept = torch.load(last, map_location="cpu", weights_only=False)["history"]
    r = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after epoch" in r.stderr
    hist = load_checkpoint(os.path.join(out, "fold0_seed0.pt"))["history"]
    assert len(hist) == 3 and hist[:len(kept)] == kept


# ---- the two-GPU paths ---------------------------------------------------------------------------------
N_GPUS = torch.cuda.device_count() if HAS_CUDA else 0
two_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs two GPUs for NCCL DDP")
CONFIG = os.path.join(ROOT, "configs", "competition_finetune_t4x2.yaml")
SHORT = ["--set", "train.epochs=2", "--set", "train.patches_per_epoch=32", "--set", "train.batch_size=4",
         "--set", "train.accumulate=1", "--set", "train.num_workers=0", "--no-progress"]


def _gpu_env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def folds_json(synth_data, tmp_path_factory):
    from training.data.competition import CompetitionDataset
    from training.folds import make_folds, save_folds

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    path = str(tmp_path_factory.mktemp("gfolds") / "folds.json")
    save_folds(make_folds({k: ds.class_pixels(k).tolist() for k in ds.keys}, k=3, block=1), path)
    return path


@two_gpus
def test_nccl_ddp_with_the_shipped_t4_config(synth_data, folds_json, tmp_path):
    out = str(tmp_path / "w")
    r = subprocess.run([sys.executable, "-m", "training.cli", "cv", "--config", CONFIG, "--data",
                        os.path.join(synth_data, "train"), "--folds", folds_json, "--out", out, "--fold", "0",
                        "--gpus", "2", "--device", "cuda", *SHORT], env=_gpu_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert os.path.exists(os.path.join(out, "fold0_seed0.pt"))


def test_onnx_cuda_provider_scheduled_as_cuda(tiny_members):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu: .[export-gpu])")
    from glacier_runtime.backends import OnnxRunner
    from glacier_runtime.predictor import Member, Predictor
    from glacier_submit.export import export_member
    from glacier_submit.members import load_members

    entry = load_members([tiny_members[0]])[0]
    runner = OnnxRunner(export_member(entry)["onnx"], "cuda")
    assert "CUDAExecutionProvider" in runner.session.get_providers() and runner.device.type == "cuda"
    pred = Predictor([Member(runner, entry["stats"])], {"tta": "d4"})
    assert pred._max_batch(pred.members[0]) == 8 and pred._workers(pred.members) == 1
    assert np.isfinite(pred.predict_proba(np.random.default_rng(0).random((5, 96, 96), dtype=np.float32))).all()


def test_amp_auto_batch_redo_after_oom_in_the_step(synth_data, tmp_path, monkeypatch):
    """The real CUDA GradScaler: an OOM between unscale_ and step is redone with a smaller batch."""
    from training.config import load_config
    from training.data.competition import CompetitionDataset
    from training.engine.distributed import DistContext
    from training.engine.trainer import Trainer

    ds = CompetitionDataset(os.path.join(synth_data, "train"))
    keys = sorted(ds.keys)
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      {"train.epochs": 1, "train.patches_per_epoch": 8, "train.batch_size": 4, "train.patch_size": 64,
                       "train.auto_batch": True, "train.amp": True, "train.num_workers": 0})
    t = Trainer(cfg, ds, keys[:6], keys[6:8], 0, 0, str(tmp_path / "m.pt"), str(tmp_path / "w"),
                DistContext(device=torch.device("cuda")), progress=False)
    t.setup_data()
    t.setup_model()
    real, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def clip(params, max_norm, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    row = t.train_one_epoch(0)
    assert row["micro_batch"] == 2 and json.dumps(row)
