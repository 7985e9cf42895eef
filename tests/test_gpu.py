"""The CUDA paths: AMP training, fp16 inference, the ONNX CUDA provider, resume on CUDA.

Marked ``gpu``: they run wherever CUDA exists (in the default tier) and skip with the
reason elsewhere. Each compares the CUDA path against the CPU path it replaces.
"""
import os
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
