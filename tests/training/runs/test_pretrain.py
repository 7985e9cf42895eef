"""HKH pre-training, then --init-from: in-process, and through the CLI (slow)."""
import os
import subprocess
import sys

import pytest
import torch

from training.bands import BandMappingError

from tests.helpers import HKH_QUICK, ROOT, TINY, TINY_SETS, repo_env


@pytest.mark.slow
def test_pretrain_then_init_from_reports(fake_hkh, tmp_path, synth_data):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = str(tmp_path / "hkh.pt")
    tiny = ["--set", "train.epochs=2", "--set", "train.patches_per_epoch=8", "--set", "train.batch_size=4",
            "--set", "train.patch_size=64", "--set", "model.decoder_channels=[16,16,16,8,8]", "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config",
                        os.path.join(ROOT, "configs", "hkh_pretrain_quick.yaml"), "--data", fake_hkh, "--out", out,
                        "--device", "cpu", *tiny], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out, weights_only=False)
    assert ck["bands"] == ["B1", "B2", "B3", "B5", "B6_high"] and ck["sensor"] == "L7"
    assert ck["spec"]["in_channels"] == 5
    assert ck["kind"] == "pretrain"  # the build never takes it as an ensemble member
    assert "epoch 2/2" in r.stdout   # per-epoch lines through a pipe
    assert "grade against the pre-training targets" in r.stdout
    log = open(out + ".log.txt").read()
    assert "checkpoint_mb" in log and "min_class_iou" in log and "grade:" in log
    from training.config import load_config
    from training.runs.transfer import load_init_state

    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), {"model.decoder_channels": [16, 16, 16, 8, 8]})
    lines = []
    state = load_init_state(out, cfg, lines)
    assert len(state) > 100 and "loaded" in lines[0]
    cfg2 = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"))  # other decoder: partial load
    lines2 = []
    load_init_state(out, cfg2, lines2)
    assert any("not loaded" in line for line in lines2)
    ck["bands"] = ["B1", "B2", "B3", "B6_low", "B6_high"]
    bad = str(tmp_path / "bad.pt")
    torch.save(ck, bad)
    with pytest.raises(BandMappingError):
        load_init_state(bad, cfg)


def test_pretrain_in_process_then_init_from(fake_hkh, tmp_path):
    """The fast twin of the CLI test above: one tiny epoch in-process, then init-from."""
    from training.config import load_config
    from training.runs.pretrain import pretrain
    from training.runs.transfer import load_init_state

    tiny = {"train.epochs": 1, "train.patches_per_epoch": 4, "train.batch_size": 4, "train.patch_size": 64,
            "model.decoder_channels": [16, 16, 16, 8, 8]}
    out = str(tmp_path / "hkh.pt")
    res = pretrain(os.path.join(ROOT, "configs", "hkh_pretrain_quick.yaml"), fake_hkh, out, device="cpu",
                   overrides=tiny, progress=False, val_patches=1)
    assert res["val_patches"] == 1
    ck = torch.load(out, weights_only=False)
    assert ck["sensor"] == "L7" and ck["bands"] == ["B1", "B2", "B3", "B5", "B6_high"]
    assert ck["class_map"]["names"] == ["background", "glacier", "debris", "lake"]
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), {"model.decoder_channels": [16, 16, 16, 8, 8]})
    lines = []
    state = load_init_state(out, cfg, lines)
    assert len(state) == len(ck["state_dict"]) and "loaded" in lines[0]


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
@pytest.mark.slow
def test_ddp_pretrain_with_scse_trains_to_the_end(tmp_path):
    from training.data.hkh import write_fake_hkh

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 8, 2, 64, 0)
    out = str(tmp_path / "pre" / "hkh.pt")
    r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", HKH_QUICK, "--data", data,
                        "--out", out, "--device", "cpu", "--gpus", "2", "--no-progress", *TINY_SETS,
                        "--set", "model.decoder_attention_type=scse", "--set", "model.decoder_channels=[32,32,16,16,16]"],
                       env=repo_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert os.path.exists(out)


def test_pretrain_holds_a_lock_on_its_output(tmp_path):
    from training.engine.runlock import RunLock
    from training.data.hkh import write_fake_hkh

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 4, 2, 64, 0)
    out = str(tmp_path / "hkh.pt")
    with RunLock(out + ".work"):
        r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", HKH_QUICK, "--data", data,
                            "--out", out, "--device", "cpu", "--no-progress", *TINY_SETS],
                           env=repo_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "in use by another training run" in r.stderr and "Traceback" not in r.stderr


def test_pretrain_skips_a_finished_run_and_force_retrains(tmp_path):
    from training.data.hkh import write_fake_hkh
    from training.runs.pretrain import PretrainDone, check_finished, pretrain

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 4, 2, 64, 0)
    out = str(tmp_path / "pre" / "hkh.pt")
    res = pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False)
    first = os.path.getmtime(out)
    assert res["val_mcc"] is not None
    assert "val MCC" in check_finished(HKH_QUICK, data, out, overrides=dict(TINY))
    with pytest.raises(PretrainDone, match="finished pre-training of this config and data"):
        pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False)
    assert os.path.getmtime(out) == first
    with pytest.raises(ValueError, match="another config, data or seed.*--force"):
        check_finished(HKH_QUICK, data, out, overrides={**TINY, "train.epochs": 3})
    write_fake_hkh(data, 5, 2, 64, 1)  # the data changed
    with pytest.raises(ValueError, match="--force"):
        check_finished(HKH_QUICK, data, out, overrides=dict(TINY))
    assert check_finished(HKH_QUICK, data, out, overrides=dict(TINY), force=True) is None
    pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False, force=True)
    assert os.path.getmtime(out) > first


def test_pretrain_cli_says_it_kept_a_finished_run(tmp_path):
    from training.data.hkh import write_fake_hkh
    from training.runs.pretrain import pretrain

    data = str(tmp_path / "hkh")
    write_fake_hkh(data, 4, 2, 64, 0)
    out = str(tmp_path / "hkh.pt")
    pretrain(HKH_QUICK, data, out, device="cpu", overrides=dict(TINY), progress=False)
    r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--config", HKH_QUICK, "--data", data,
                        "--out", out, "--device", "cpu", "--gpus", "2", "--no-progress", *TINY_SETS],
                       env=repo_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "kept, nothing to do" in r.stdout and "torch.distributed.run" not in r.stdout
