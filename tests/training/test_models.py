"""smp models for training: first-convolution rules for encoder weights made for other band
counts, smp's named weights (ImageNet) from a cache the test seeds (nothing downloads), and the
check that the installed smp lays the U-Net out as the runtime mirrors it."""
import json
import os
import subprocess

import pytest
import torch

from training.config import load_config
from training.models import create_model, model_spec

from tests.helpers import QUICK, cv_cmd, encoder_file, repo_env

SMALL = {"model.decoder_channels": [16, 16, 16, 8, 8]}


def test_first_conv_rules_load_the_right_weights(tmp_path):
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    path, src = encoder_file(tmp_path, 3, seed=1)
    cfg = load_config(QUICK, {"model.encoder_weights": path, "model.encoder_first_conv": "cycle", **SMALL})
    spec = model_spec(cfg.model, 5, 4)
    torch.manual_seed(0)
    cycled = create_model(spec, path, "cycle").encoder.state_dict()
    # oracle: smp's own first-conv patch applied to a 3-band encoder holding the same weights
    import segmentation_models_pytorch as smp

    ref = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=4, decoder_channels=[16, 16, 16, 8, 8])
    ref.encoder.load_state_dict(src)
    patch_first_conv(ref.encoder, 5, 3, pretrained=True)
    assert torch.allclose(cycled["conv1.weight"], ref.encoder.conv1.weight)
    assert torch.equal(cycled["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])

    torch.manual_seed(0)
    fresh_model = create_model(spec, None).encoder.state_dict()
    torch.manual_seed(0)
    fresh = create_model(spec, path, "fresh").encoder.state_dict()
    assert torch.equal(fresh["conv1.weight"], fresh_model["conv1.weight"])  # left at its random init
    assert torch.equal(fresh["layer4.1.conv2.weight"], src["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match="made for 3 input bands"):
        create_model(spec, path)  # strict: refused at model build too


@pytest.mark.parametrize("attention", [None, "scse"])
def test_smp_layout_matches_runtime(attention):
    pytest.importorskip("segmentation_models_pytorch")
    from training.models import create_model

    spec = {"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4,
            "decoder_channels": [16, 16, 16, 8, 8], "decoder_attention_type": attention}
    create_model(spec)  # raises if the installed smp lays the U-Net out differently


def test_smp_layout_change_is_refused_with_version():
    pytest.importorskip("segmentation_models_pytorch")
    from glacier_runtime.models import build_model
    from training.models import check_runtime_layout

    spec = {"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4,
            "decoder_channels": [16, 16, 16, 8, 8], "decoder_attention_type": None}

    class Renamed(torch.nn.Module):  # a future smp that renames one layer
        def __init__(self):
            super().__init__()
            self.inner = build_model(spec)

        def state_dict(self, *a, **k):
            sd = self.inner.state_dict()
            sd["segmentation_head.conv.weight"] = sd.pop("segmentation_head.0.weight")
            return sd

    with pytest.raises(RuntimeError, match=r"segmentation-models-pytorch \S+ lays out.*segmentation_head"):
        check_runtime_layout(Renamed(), spec)


# ---- smp's named weights: the cache seeded by the test, the network never asked -------------------------

def seed_hf_cache(cache, encoder="resnet18", name="imagenet", seed=3):
    """Write the files smp's Hugging Face download would leave for ``name`` (random weights of
    the right shapes) into ``cache``; returns the 3-band state dict written."""
    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import get_encoder

    from training import models

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in get_encoder(encoder, in_channels=3, weights=None).state_dict().items()}
    cfg_file, weights_file = models.named_cache_files(encoder, name)
    os.makedirs(os.path.dirname(weights_file), exist_ok=True)
    with open(cfg_file, "w") as fh:
        json.dump({"architecture": encoder}, fh)
    save_file(sd, weights_file)
    return sd


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a request would fail at once, not retry
    return cache


RN18 = {"model.encoder": "resnet18", **SMALL}


def test_imagenet_start_loads_smps_weights_with_each_first_conv_rule(hf_cache):
    from segmentation_models_pytorch.encoders._utils import patch_first_conv
    from segmentation_models_pytorch.encoders import get_encoder

    src = seed_hf_cache(hf_cache)
    cfg = load_config(QUICK, {"model.encoder_weights": "imagenet", **RN18})
    assert cfg.model.encoder_first_conv == "auto"
    spec = model_spec(cfg.model, 5, 4)
    cycled = create_model(spec, "imagenet").encoder.state_dict()  # auto = smp's rule
    assert torch.equal(cycled["layer3.1.conv2.weight"], src["layer3.1.conv2.weight"])
    ref = get_encoder("resnet18", in_channels=3, weights=None)
    ref.load_state_dict(src)
    patch_first_conv(ref, 5, 3, pretrained=True)  # oracle: smp's own patch of the same weights
    assert torch.allclose(cycled["conv1.weight"], ref.conv1.weight)
    mean = create_model(spec, "imagenet", "mean").encoder.state_dict()["conv1.weight"]
    w = src["conv1.weight"]
    for band in range(5):  # by hand: the mean of the three RGB filters, times 3/5
        assert torch.allclose(mean[:, band], (w[:, 0] + w[:, 1] + w[:, 2]) / 3 * 3 / 5, atol=1e-6)
    with pytest.raises(ValueError, match="made for 3 input bands.*encoder_first_conv: cycle"):
        load_config(QUICK, {"model.encoder_weights": "imagenet", "model.encoder_first_conv": "strict", **RN18})


def test_imagenet_with_an_empty_cache_stops_with_the_files_to_fill(hf_cache):
    from training.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(QUICK, {"model.encoder_weights": "imagenet", **RN18})
    msg = str(exc.value)
    snap = os.path.join(str(hf_cache), "models--smp-hub--resnet18.imagenet", "snapshots")
    assert "not in the cache and cannot be downloaded" in msg and snap in msg and "model.safetensors" in msg
    assert "config.json" in msg and "encoder_weights: null" in msg
    with pytest.raises(ConfigError, match="not offered for encoder resnet34.*imagenet"):
        load_config(QUICK, {"model.encoder_weights": "ssl", "model.encoder": "resnet34", **SMALL})


def _offline_env(cache):
    env = repo_env()
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_ETAG_TIMEOUT="1")
    return env


def test_cv_trains_from_a_seeded_imagenet_cache_and_stops_before_training_without(synth_data, folds_file,
                                                                                 tmp_path, hf_cache):
    from training.engine.checkpoint import load_checkpoint

    data = os.path.join(synth_data, "train")
    sets = ["--set", "model.encoder=resnet18", "--set", "model.encoder_weights=imagenet"]
    empty = subprocess.run(cv_cmd(data, folds_file, str(tmp_path / "none"), *sets), env=_offline_env(tmp_path / "no"),
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode != 0 and "model.safetensors" in empty.stderr + empty.stdout
    assert not (tmp_path / "none" / "fold0_seed0.pt").exists() and "epoch" not in empty.stdout.lower()
    seed_hf_cache(hf_cache)
    out = tmp_path / "run"
    r = subprocess.run(cv_cmd(data, folds_file, str(out), *sets), env=_offline_env(hf_cache),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(str(out / "fold0_seed0.pt"))
    assert ck["config"]["model"]["encoder_weights"] == "imagenet"
