"""build_model: the architectures the runtime has a pure-torch definition for."""
import pytest

from glacier_runtime.models import UnsupportedArchitecture, build_model


def test_unsupported_architecture_message():
    with pytest.raises(UnsupportedArchitecture, match="--backend onnx"):
        build_model({"arch": "FPN", "encoder": "resnet34", "in_channels": 5, "classes": 4})
