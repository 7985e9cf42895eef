"""Encoder weights that cannot fit 5 Landsat bands are refused at config validation, with the
reason, before any data is read; an explicit first-convolution rule lets a file through."""
import os

import pytest
import torch
import yaml

from training.config import ConfigError, load_config
from training.models import create_model, model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
SMALL = {"model.decoder_channels": [16, 16, 16, 8, 8]}


def _encoder_file(tmp_path, in_channels, name="enc.pth", whole_model=False, seed=0):
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    m = smp.Unet("resnet18", encoder_weights=None, in_channels=in_channels, classes=4,
                 decoder_channels=[16, 16, 16, 8, 8])
    path = str(tmp_path / name)
    torch.save(m.state_dict() if whole_model else m.encoder.state_dict(), path)
    return path, m.encoder.state_dict()


@pytest.mark.parametrize("name", ["imagenet", "ImageNet", "ssl"])
def test_named_pretrained_weights_refused_with_reason(name):
    with pytest.raises(ConfigError) as exc:
        load_config(QUICK, {"model.encoder_weights": name, **SMALL})
    msg = str(exc.value)
    assert QUICK in msg and f"encoder_weights: {name} is refused" in msg
    assert "RGB filters do not match Landsat's 5 bands" in msg
    assert "encoder_weights: null" in msg and "--init-from" in msg
    assert "not found" not in msg


def test_three_band_file_refused_unless_first_conv_rule(tmp_path):
    path, _ = _encoder_file(tmp_path, 3)
    with pytest.raises(ConfigError) as exc:
        load_config(QUICK, {"model.encoder_weights": path, **SMALL})
    msg = str(exc.value)
    assert "conv1.weight" in msg and "made for 3 input bands" in msg and "reads 5 bands" in msg
    assert "model.encoder_first_conv: cycle" in msg and "fresh" in msg
    for rule in ("cycle", "fresh"):
        cfg = load_config(QUICK, {"model.encoder_weights": path, "model.encoder_first_conv": rule, **SMALL})
        assert cfg.model.encoder_first_conv == rule


def test_whole_model_state_dict_with_other_band_count_refused(tmp_path):
    path, _ = _encoder_file(tmp_path, 4, whole_model=True)
    with pytest.raises(ConfigError, match="made for 4 input bands"):
        load_config(QUICK, {"model.encoder_weights": path, **SMALL})


def test_matching_file_accepted_and_missing_file_named(tmp_path):
    path, _ = _encoder_file(tmp_path, 5)
    load_config(QUICK, {"model.encoder_weights": path, **SMALL})
    with pytest.raises(ConfigError, match="nope.pth not found.*null to start from none"):
        load_config(QUICK, {"model.encoder_weights": str(tmp_path / "nope.pth"), **SMALL})
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(QUICK, {"model.encoder_weights": str(bad), **SMALL})


def test_first_conv_rules_load_the_right_weights(tmp_path):
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    path, src = _encoder_file(tmp_path, 3, seed=1)
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


def _cfg_file(tmp_path, model):
    raw = yaml.safe_load(open(QUICK))
    raw["model"].update(model)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


@pytest.mark.parametrize("kind", ["imagenet", "3-band file"])
def test_cv_refuses_before_reading_data(tmp_path, monkeypatch, kind):
    """`glacier-train cv` stops at config validation: no tile is opened."""
    from click.testing import CliRunner

    import training.data.competition as comp
    from training.cli import cv_command

    opened = []

    def _no_data(*a, **k):
        opened.append(a)
        raise AssertionError("data read before the config was validated")

    monkeypatch.setattr(comp, "CompetitionDataset", _no_data)
    weights = "imagenet" if kind == "imagenet" else _encoder_file(tmp_path, 3)[0]
    cfg = _cfg_file(tmp_path, {"encoder_weights": weights})
    data = tmp_path / "data"
    data.mkdir()
    folds = tmp_path / "folds.json"
    folds.write_text('{"folds": []}')
    r = CliRunner().invoke(cv_command, ["--config", cfg, "--data", str(data), "--folds", str(folds),
                                        "--out", str(tmp_path / "w"), "--device", "cpu", "--no-progress"])
    assert r.exit_code != 0 and not opened
    assert ("RGB filters do not match" if kind == "imagenet" else "made for 3 input bands") in r.output, r.output
    assert not os.path.exists(tmp_path / "w")
