"""Models from segmentation-models-pytorch by name. Encoder weights come from a local
file only: nothing downloads at run time."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict

import torch
import torch.nn as nn

from glacier_runtime.models import SUPPORTED_ARCHS
from glacier_runtime.models.unet import SUPPORTED_ENCODERS

log = logging.getLogger("glacier.train")


def model_spec(cfg, in_channels: int, classes: int) -> Dict[str, Any]:
    """The architecture spec stored in checkpoints (enough to rebuild without the config)."""
    return {
        "arch": cfg.arch,
        "encoder": cfg.encoder,
        "in_channels": int(in_channels),
        "classes": int(classes),
        "decoder_channels": list(cfg.decoder_channels),
        "decoder_attention_type": cfg.decoder_attention_type,
    }


def runtime_supports(spec: Dict[str, Any]) -> bool:
    return spec["arch"] in SUPPORTED_ARCHS and spec["encoder"] in SUPPORTED_ENCODERS


def create_model(spec: Dict[str, Any], encoder_weights: str = None) -> nn.Module:
    import segmentation_models_pytorch as smp

    arch = getattr(smp, spec["arch"], None)
    if arch is None or not isinstance(arch, type):
        raise ValueError(f"segmentation-models-pytorch has no architecture {spec['arch']!r}")
    kwargs = dict(encoder_name=spec["encoder"], encoder_weights=None, in_channels=spec["in_channels"],
                  classes=spec["classes"])
    if spec["arch"] in ("Unet", "UnetPlusPlus"):
        kwargs["decoder_channels"] = spec["decoder_channels"]
        kwargs["decoder_attention_type"] = spec["decoder_attention_type"]
    try:
        model = arch(**kwargs)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot build {spec['arch']} with encoder {spec['encoder']!r}: {exc}") from exc
    if encoder_weights:
        if not os.path.isfile(encoder_weights):
            raise FileNotFoundError(
                f"encoder_weights {encoder_weights} not found; it must be a local .pth state dict "
                "(nothing is downloaded at run time)")
        sd = torch.load(encoder_weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.encoder.load_state_dict(sd, strict=False)
        log.info("encoder weights from %s: %d missing, %d unexpected keys", encoder_weights, len(missing), len(unexpected))
    if not runtime_supports(spec):
        log.warning("%s/%s has no pure-torch runtime twin: build its bundle with --backend onnx",
                    spec["arch"], spec["encoder"])
    else:
        check_runtime_layout(model, spec)
    return model


def check_runtime_layout(model: nn.Module, spec: Dict[str, Any]) -> None:
    """The bundle's pure-torch twin must load this model's state dict strictly: same tensor
    names and shapes. A segmentation-models-pytorch release that renames a layer fails here,
    at training start, with the installed version named, not at build time."""
    from glacier_runtime.models import build_model

    ours = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ours != theirs:
        import segmentation_models_pytorch as smp

        diff = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
        raise RuntimeError(
            f"segmentation-models-pytorch {getattr(smp, '__version__', '?')} lays out {spec['arch']}/{spec['encoder']} "
            f"differently from the bundle runtime (first differences: {diff[:4]}); install a tested release: "
            "pip install 'segmentation-models-pytorch>=0.3.3,<0.7'")
