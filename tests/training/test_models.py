"""smp models for training: first-convolution rules for encoder weights made for other band
counts, and the check that the installed smp lays the U-Net out as the runtime mirrors it."""
import pytest
import torch

from training.config import load_config
from training.models import create_model, model_spec

from tests.helpers import QUICK, encoder_file

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
