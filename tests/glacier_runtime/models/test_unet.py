"""The pure-torch U-Net loads segmentation-models-pytorch state dicts strictly and computes the same."""
import pytest
import torch

from glacier_runtime.models import build_model

from tests.helpers import randomise_bn


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34", pytest.param("resnet50", marks=pytest.mark.slow)])
@pytest.mark.parametrize("attention", [None, "scse"])
def test_strict_load_and_parity_with_smp(encoder, attention):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    ref = randomise_bn(smp.Unet(encoder, encoder_weights=None, in_channels=5, classes=4,
                                 decoder_attention_type=attention)).eval()
    mine = build_model({"arch": "Unet", "encoder": encoder, "in_channels": 5, "classes": 4,
                        "decoder_attention_type": attention}).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 5, 64, 96)
    with torch.no_grad():
        assert (ref(x) - mine(x)).abs().max().item() <= 1e-5
