"""Training configs: the shipped ones load, a bad key or value names the key and the file,
--set overrides, encoder weights that cannot fit 5 Landsat bands are refused with the reason
(an explicit first-convolution rule lets a file through), class-dependent settings checked."""
import os

import pytest
import yaml

from training.config import ConfigError, load_config

from tests.helpers import QUICK, ROOT, encoder_file


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_shipped_configs_load():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.endswith(".yaml"):
            load_config(os.path.join(ROOT, "configs", name))


@pytest.mark.parametrize("data,needle", [
    ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"train": {"patch_size": 100}}, "multiple of 32"),
    ({"loss": {"focal": 0, "dice": 0, "mcc": 0, "boundary": 0}}, "at least one loss"),
    ({"data": {"bands": ["B2", "B3", "B4", "B6", "B99"]}}, "B99"),
    ({"model": {"decoder_attention_type": "cbam"}}, "decoder_attention_type"),
    ({"sampler": {"targets": {"glacier": -1}}}, "targets"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_bad_configs_name_key_and_file(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value) and path in str(exc.value)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))


def test_overrides():
    cfg = load_config(QUICK, {"train.epochs": 2, "loss.boundary": 0.0})
    assert cfg.train.epochs == 2 and cfg.loss.boundary == 0.0


SMALL = {"model.decoder_channels": [16, 16, 16, 8, 8]}


def test_three_band_file_refused_unless_first_conv_rule(tmp_path):
    path, _ = encoder_file(tmp_path, 3)
    with pytest.raises(ConfigError) as exc:
        load_config(QUICK, {"model.encoder_weights": path, **SMALL})
    msg = str(exc.value)
    assert "conv1.weight" in msg and "made for 3 input bands" in msg and "reads 5 bands" in msg
    assert "model.encoder_first_conv: cycle" in msg and "fresh" in msg
    for rule in ("cycle", "fresh"):
        cfg = load_config(QUICK, {"model.encoder_weights": path, "model.encoder_first_conv": rule, **SMALL})
        assert cfg.model.encoder_first_conv == rule


def test_whole_model_state_dict_with_other_band_count_refused(tmp_path):
    path, _ = encoder_file(tmp_path, 4, whole_model=True)
    with pytest.raises(ConfigError, match="made for 4 input bands"):
        load_config(QUICK, {"model.encoder_weights": path, **SMALL})


def test_matching_file_accepted_and_missing_file_named(tmp_path):
    path, _ = encoder_file(tmp_path, 5)
    load_config(QUICK, {"model.encoder_weights": path, **SMALL})
    with pytest.raises(ConfigError, match="nope.pth not found.*null to start from none"):
        load_config(QUICK, {"model.encoder_weights": str(tmp_path / "nope.pth"), **SMALL})
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(QUICK, {"model.encoder_weights": str(bad), **SMALL})


@pytest.mark.parametrize("train_line", ["train:\n", "train: 5\n", "train: [1, 2]\n"])
def test_set_against_empty_or_scalar_section(tmp_path, train_line):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\n" + train_line)
    if train_line == "train:\n":
        assert load_config(str(p), {"train.epochs": 2}).train.epochs == 2  # empty section: filled in
        return
    with pytest.raises(ConfigError) as exc:
        load_config(str(p), {"train.epochs": 2})
    msg = str(exc.value)
    assert str(p) in msg and "train.epochs" in msg and "`train`" in msg and "mapping" in msg


def test_validation_tta_checked_on_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"validation": {"tta": "d8"}}))
    with pytest.raises(ConfigError) as exc:
        load_config(str(p))
    assert "validation.tta" in str(exc.value) and str(p) in str(exc.value) and "d8" in str(exc.value)
    with pytest.raises(ConfigError, match="validation.tta"):
        load_config(QUICK, {"validation.tta": ["identity", "flip_x"]})


def test_class_dependent_settings_checked_before_training(tmp_path):
    from training.config import check_against_classes

    cfg = load_config(QUICK, {"loss.class_weights": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="class_weights has 2 values for 4 classes"):
        check_against_classes(cfg, ["background", "glacier", "debris", "lake"], QUICK)
    cfg = load_config(QUICK, {"sampler.targets": {"ice": 1.0}})
    with pytest.raises(ConfigError, match="unknown classes"):
        check_against_classes(cfg, ["background", "glacier", "debris", "lake"], QUICK)


# ---- the two-GPU path on its CPU stand-ins --------------------------------------------------
def test_shipped_t4_configs_use_scse():
    for name in ("competition_finetune_t4x2.yaml", "hkh_pretrain_t4x2.yaml"):
        assert load_config(os.path.join(ROOT, "configs", name)).model.decoder_attention_type == "scse", name
