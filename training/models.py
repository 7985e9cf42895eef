"""Models from segmentation-models-pytorch by name. Encoder weights come from a local
file only: nothing downloads at run time."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from glacier_runtime.models import SUPPORTED_ARCHS
from glacier_runtime.models.unet import SUPPORTED_ENCODERS

log = logging.getLogger("glacier.train")

# smp's names for downloadable weights: none of them fits 5 Landsat bands, and nothing downloads here
PRETRAINED_NAMES = ("imagenet", "ssl", "swsl", "instagram", "advprop", "noisy-student", "imagenet+background",
                    "imagenet+5k", "imagenet21k")
FIRST_CONV_MODES = ("strict", "cycle", "fresh")
_NO_NAMED_WEIGHTS = (
    "pretrained RGB filters do not match Landsat's 5 bands (blue, green, red, SWIR-1, thermal): the first "
    "convolution would see SWIR and thermal through filters learnt for RGB (runs started this way have "
    "been seen stuck at an MCC near 0.05-0.10). Start from none (model.encoder_weights: null), or pre-train on HKH "
    "(`glacier-train pretrain`) and start from those weights with `glacier-train cv --init-from pretrained/hkh.pt`")


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot fit the configured input (raised at config validation)."""


def named_weights_refusal(name: str) -> Optional[str]:
    """Why ``name`` (smp's ``imagenet`` etc.) is refused, or None when it is not such a name."""
    if name.lower() not in PRETRAINED_NAMES:
        return None
    return f"model.encoder_weights: {name} is refused: {_NO_NAMED_WEIGHTS}."


def _encoder_state(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderWeightsError(f"model.encoder_weights: cannot read {path} as a torch state dict ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderWeightsError(f"model.encoder_weights: {path} is not a state dict (name -> tensor); save it "
                                  "with torch.save(model.encoder.state_dict(), path)")
    if any(k.startswith("encoder.") for k in obj):  # a whole smp model: keep its encoder
        obj = {k[len("encoder."):]: v for k, v in obj.items() if k.startswith("encoder.")}
    return obj


def first_conv_of(state: Dict[str, torch.Tensor]) -> Tuple[str, int]:
    """(key, input channels) of the first convolution of an encoder state dict (the first
    4-D weight in its stored order: the stem)."""
    for k, v in state.items():
        if v.ndim == 4 and v.dtype.is_floating_point:
            return k, int(v.shape[1])
    raise EncoderWeightsError("no convolution weight (4-D tensor) in the encoder weights")


def check_encoder_weights(path: Optional[str], in_channels: int, first_conv: str = "strict") -> Optional[str]:
    """Refuse encoder weights that cannot fit ``in_channels`` bands, with the reason and the
    fix; returns a one-line note of what will be loaded (None without weights). Cheap
    enough for config validation: it reads the file, builds no model, reads no data."""
    if not path:
        return None
    why = named_weights_refusal(path)
    if why:
        raise EncoderWeightsError(why)
    if not os.path.isfile(path):
        raise EncoderWeightsError(
            f"model.encoder_weights: {path} not found; it must be a local .pth state dict (nothing is downloaded "
            "at run time), or null to start from none")
    key, have = first_conv_of(_encoder_state(path))
    if have == in_channels:
        return f"encoder weights {path}: first convolution {key} takes {have} bands, as configured"
    if first_conv == "strict":
        raise EncoderWeightsError(
            f"model.encoder_weights: {path} has a first convolution ({key}) made for {have} input bands, but the "
            f"config reads {in_channels} bands (data.bands). {_NO_NAMED_WEIGHTS if have == 3 else 'Its filters do not fit these bands'}. "
            "To use the file anyway, say how the first convolution is adapted: model.encoder_first_conv: cycle "
            f"(its {have} filters repeated over the {in_channels} bands and rescaled, as smp does) or fresh "
            "(the first convolution starts random, every other layer is loaded)")
    return (f"encoder weights {path}: first convolution {key} takes {have} bands, adapted to {in_channels} "
            f"({first_conv})")


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """smp's rule for more or fewer bands than a pretrained stem: filters cycled over the new
    bands and rescaled by old/new so the activation scale is kept."""
    have = weight.shape[1]
    idx = torch.arange(in_channels) % have
    return weight[:, idx] * (have / in_channels)


def load_encoder_weights(model: nn.Module, path: str, in_channels: int, first_conv: str = "strict") -> None:
    """Load a local encoder state dict into ``model.encoder``, adapting the first convolution
    as ``first_conv`` says (refused under ``strict`` when the band counts differ)."""
    check_encoder_weights(path, in_channels, first_conv)
    sd = _encoder_state(path)
    key, have = first_conv_of(sd)
    if have != in_channels:
        if first_conv == "cycle":
            sd[key] = adapt_first_conv(sd[key], in_channels)
        else:  # fresh
            sd.pop(key)
    target = model.encoder.state_dict()
    wrong = [k for k, v in sd.items() if k in target and target[k].shape != v.shape]
    if wrong:
        raise EncoderWeightsError(f"model.encoder_weights: {path} does not fit encoder {type(model.encoder).__name__}: "
                                  f"shapes differ for {wrong[:4]}; is it the weights of model.encoder?")
    # nn.Module's own loader: smp's encoders override it (dropping ``fc.*``) and return nothing
    missing, unexpected = nn.Module.load_state_dict(model.encoder, sd, strict=False)
    log.info("encoder weights from %s: %d missing, %d unexpected keys", path, len(missing), len(unexpected))


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


def create_model(spec: Dict[str, Any], encoder_weights: Optional[str] = None,
                 first_conv: str = "strict") -> nn.Module:
    """The smp model of ``spec``; ``encoder_weights`` (a local file) loaded into its encoder,
    the first convolution adapted as ``first_conv`` says when its band count differs."""
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
        load_encoder_weights(model, encoder_weights, spec["in_channels"], first_conv)
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
