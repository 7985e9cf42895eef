"""Pure-torch model definitions that load segmentation-models-pytorch state dicts strictly.

The platform's smp is an old 0.3.x, so the bundle never imports smp. ``build_model``
turns an architecture spec (a plain dict stored in every checkpoint) into a module.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn

from .unet import SUPPORTED_ENCODERS, Unet

SUPPORTED_ARCHS = ("Unet",)


class UnsupportedArchitecture(ValueError):
    """The runtime has no pure-torch definition for this architecture."""


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build a model from ``{"arch", "encoder", "in_channels", "classes", ...}``."""
    arch = spec.get("arch")
    encoder = spec.get("encoder")
    if arch not in SUPPORTED_ARCHS or encoder not in SUPPORTED_ENCODERS:
        raise UnsupportedArchitecture(
            f"the runtime has no pure-torch {arch}/{encoder}; supported: "
            f"{SUPPORTED_ARCHS} with encoders {sorted(SUPPORTED_ENCODERS)}. "
            "Train one of these, or build with --backend onnx so the bundle runs the exported graph."
        )
    return Unet(
        encoder=encoder,
        in_channels=int(spec["in_channels"]),
        classes=int(spec["classes"]),
        decoder_channels=tuple(spec.get("decoder_channels", (256, 128, 64, 32, 16))),
        attention=spec.get("decoder_attention_type"),
    )

