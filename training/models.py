"""Models from segmentation-models-pytorch by name. Encoder weights are a local file, or one
of smp's named weights (``imagenet``, ...) fetched through smp's own Hugging Face download and
cache; with no network the run stops before training, naming the cache files to fill."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from glacier_runtime.models import SUPPORTED_ARCHS
from glacier_runtime.models.unet import SUPPORTED_ENCODERS

log = logging.getLogger("glacier.train")

# smp's names for downloadable weights
PRETRAINED_NAMES = ("imagenet", "ssl", "swsl", "instagram", "advprop", "noisy-student", "imagenet+background",
                    "imagenet+5k", "imagenet21k")
# auto: smp's own rule (cycle) for its named weights, strict for a local file; strict = refuse a
# band-count mismatch; cycle = filters repeated over the bands and rescaled (smp's rule); mean =
# every band starts from the mean of the file's filters, rescaled; fresh = the first convolution
# starts random, every other layer is loaded
FIRST_CONV_MODES = ("auto", "strict", "cycle", "mean", "fresh")
_RGB_NOTE = ("its filters were learnt on RGB, and here they also see SWIR-1 and thermal. Say how the first "
             "convolution is adapted: model.encoder_first_conv: cycle (its filters repeated over the bands and "
             "rescaled, smp's rule), mean (each band starts from the mean filter) or fresh (the first "
             "convolution starts random, every other layer is loaded)")


_OTHER_NOTE = ("Its filters do not fit these bands. To use the file anyway, say how the first convolution is "
               "adapted: model.encoder_first_conv: cycle, mean or fresh")


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot fit the configured input (raised at config validation)."""


def is_named(weights: Optional[str]) -> bool:
    """smp's named weights (``imagenet``, ``ssl``, ...) rather than a local file."""
    return bool(weights) and str(weights).lower() in PRETRAINED_NAMES


def resolve_first_conv(mode: str, weights: Optional[str]) -> str:
    if mode not in FIRST_CONV_MODES:
        raise EncoderWeightsError(f"model.encoder_first_conv: {mode!r} is unknown; known: {', '.join(FIRST_CONV_MODES)}")
    if mode == "auto":
        return "cycle" if is_named(weights) else "strict"
    return mode


def named_settings(encoder: str, name: str) -> Dict[str, Any]:
    """smp's download settings of ``name`` for ``encoder`` (repo_id and revision on the
    Hugging Face hub; older smp releases: a URL)."""
    from segmentation_models_pytorch.encoders import encoders

    if encoder not in encoders:
        raise EncoderWeightsError(f"model.encoder: {encoder!r} is not an smp encoder")
    offered = encoders[encoder].get("pretrained_settings") or {}
    key = name.lower()
    if key not in offered:
        raise EncoderWeightsError(f"model.encoder_weights: {name} is not offered for encoder {encoder} by "
                                  f"segmentation-models-pytorch (it offers: {', '.join(offered) or 'none'})")
    return dict(offered[key])


def named_cache_files(encoder: str, name: str) -> Tuple[str, ...]:
    """Where smp's download puts (and looks for) the files of ``name``."""
    st = named_settings(encoder, name)
    if "repo_id" in st:
        from huggingface_hub import constants

        cache = getattr(constants, "HF_HUB_CACHE", None) or constants.HUGGINGFACE_HUB_CACHE
        snap = os.path.join(cache, "models--" + st["repo_id"].replace("/", "--"), "snapshots",
                            str(st.get("revision") or "main"))
        return os.path.join(snap, "config.json"), os.path.join(snap, "model.safetensors")
    return (os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(st["url"])),)


def fetch_named_weights(encoder: str, name: str) -> str:
    """The named weights in smp's cache, downloaded there by smp's own path when missing; a
    failed download (no network) stops with the files to put into the cache."""
    st = named_settings(encoder, name)
    files = named_cache_files(encoder, name)
    if all(os.path.isfile(f) for f in files):
        return files[-1]
    try:
        if "repo_id" in st:
            from huggingface_hub import hf_hub_download

            for f in ("config.json", "model.safetensors"):
                hf_hub_download(st["repo_id"], filename=f, revision=st.get("revision"))
        else:
            torch.hub.load_state_dict_from_url(st["url"], map_location="cpu", progress=False)
    except Exception as exc:  # no network, a proxy, a hub error: one message
        where = st.get("repo_id") or st.get("url")
        raise EncoderWeightsError(
            f"model.encoder_weights: {name} for {encoder} is not in the cache and cannot be downloaded "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}). Put the files of {where}"
            + (f" (revision {st['revision']})" if st.get("revision") else "") + " at: " + ", ".join(files)
            + " (on a machine with network: run once there and copy the cache folder; or set HF_HUB_CACHE to a "
            "folder that holds them), or start from none (model.encoder_weights: null)") from exc
    return files[-1]


def named_encoder_state(encoder: str, name: str) -> Dict[str, torch.Tensor]:
    """The 3-band encoder state dict of smp's named weights, loaded by smp itself."""
    from segmentation_models_pytorch.encoders import get_encoder

    fetch_named_weights(encoder, name)
    return get_encoder(encoder, in_channels=3, weights=name.lower()).state_dict()


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


def check_encoder_weights(path: Optional[str], in_channels: int, first_conv: str = "auto",
                          encoder: Optional[str] = None) -> Optional[str]:
    """Refuse encoder weights that cannot fit ``in_channels`` bands, with the reason and the
    fix; returns a one-line note of what will be loaded (None without weights). For smp's
    named weights (needs ``encoder``) the files are fetched into smp's cache now, so a run
    without network stops here, before any data is read."""
    if not path:
        return None
    mode = resolve_first_conv(first_conv, path)
    if is_named(path):
        if not encoder:
            raise EncoderWeightsError(f"model.encoder_weights: {path} needs model.encoder to name the weights")
        fetch_named_weights(encoder, path)
        if mode == "strict" and in_channels != 3:
            raise EncoderWeightsError(f"model.encoder_weights: {path} is made for 3 input bands (RGB), but the config "
                                      f"reads {in_channels} bands (data.bands): {_RGB_NOTE}, or leave it at auto (cycle)")
        return f"encoder weights {path} ({encoder}, smp's cache): first convolution adapted from 3 to {in_channels} bands ({mode})"
    if not os.path.isfile(path):
        raise EncoderWeightsError(
            f"model.encoder_weights: {path} not found; it must be a local .pth state dict, one of smp's named "
            "weights (imagenet, ...), or null to start from none")
    key, have = first_conv_of(_encoder_state(path))
    if have == in_channels:
        return f"encoder weights {path}: first convolution {key} takes {have} bands, as configured"
    if mode == "strict":
        raise EncoderWeightsError(
            f"model.encoder_weights: {path} has a first convolution ({key}) made for {have} input bands, but the "
            f"config reads {in_channels} bands (data.bands). {_RGB_NOTE if have == 3 else _OTHER_NOTE}")
    return (f"encoder weights {path}: first convolution {key} takes {have} bands, adapted to {in_channels} "
            f"({mode})")


def adapt_first_conv(weight: torch.Tensor, in_channels: int, mode: str = "cycle") -> torch.Tensor:
    """A pretrained stem for another band count. cycle (smp's rule): filters cycled over the
    new bands; mean: every band gets the mean of the old filters; both rescaled by old/new
    so the activation scale is kept."""
    have = weight.shape[1]
    if mode == "mean":
        return weight.mean(1, keepdim=True).expand(-1, in_channels, -1, -1).clone() * (have / in_channels)
    idx = torch.arange(in_channels) % have
    return weight[:, idx] * (have / in_channels)


def load_encoder_weights(model: nn.Module, path: str, in_channels: int, first_conv: str = "auto",
                         encoder: Optional[str] = None) -> None:
    """Load a local encoder state dict, or smp's named weights, into ``model.encoder``,
    adapting the first convolution as ``first_conv`` says (refused under ``strict`` when
    the band counts differ)."""
    check_encoder_weights(path, in_channels, first_conv, encoder)
    mode = resolve_first_conv(first_conv, path)
    sd = named_encoder_state(encoder, path) if is_named(path) else _encoder_state(path)
    key, have = first_conv_of(sd)
    if have != in_channels:
        if mode in ("cycle", "mean"):
            sd[key] = adapt_first_conv(sd[key], in_channels, mode)
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
                 first_conv: str = "auto") -> nn.Module:
    """The smp model of ``spec``; ``encoder_weights`` (a local file or smp's named weights)
    loaded into its encoder, the first convolution adapted as ``first_conv`` says when its
    band count differs."""
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
        load_encoder_weights(model, encoder_weights, spec["in_channels"], first_conv, spec["encoder"])
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
