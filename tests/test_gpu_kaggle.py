"""The two-GPU paths that only run on CUDA: NCCL DDP with the shipped T4 configs' attention,
a failing NCCL rank, ONNX Runtime's CUDA provider scheduled as CUDA, AMP with auto_batch.

Marked ``gpu``: they run where torch sees CUDA (two GPUs for DDP) and skip with the reason
elsewhere. ``scripts/gpu_check.sh`` runs them with the rest of the GPU checks at once."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPUS < 1, reason="needs CUDA (no GPU visible to torch here)")]
two_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs two GPUs for NCCL DDP")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "competition_finetune_t4x2.yaml")
SHORT = ["--set", "train.epochs=2", "--set", "train.patches_per_epoch=32", "--set", "train.batch_size=4",
         "--set", "train.accumulate=1", "--set", "train.num_workers=0", "--no-progress"]


def _env():
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
                        "--gpus", "2", "--device", "cuda", *SHORT], env=_env(), capture_output=True, text=True,
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
