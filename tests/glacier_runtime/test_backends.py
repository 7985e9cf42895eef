"""TorchRunner folds BatchNorm into the convolutions without changing the outputs."""
import torch
import torch.nn as nn

from glacier_runtime.backends import fold_batchnorm
from glacier_runtime.models import build_model

from tests.helpers import randomise_bn


def test_batchnorm_folding_keeps_outputs():
    torch.manual_seed(1)
    m = randomise_bn(build_model({"arch": "Unet", "encoder": "resnet18", "in_channels": 5, "classes": 4})).eval()
    x = torch.randn(2, 5, 64, 64)
    with torch.no_grad():
        ref = m(x)
        import copy

        fused = fold_batchnorm(copy.deepcopy(m))
        assert not any(isinstance(k, nn.BatchNorm2d) for k in fused.modules())
        assert (fused(x) - ref).abs().max().item() < 1e-4
