"""Training configuration: YAML validated on load (unknown keys, wrong types and
impossible values are errors naming the key and the file)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training import bands as band_registry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    sensor: str = "L8"
    bands: List[str] = Field(default_factory=lambda: list(band_registry.COMPETITION_BANDS))
    label_mode: Literal["multiclass", "binary"] = "multiclass"
    stats_percentiles: List[float] = Field(default_factory=lambda: [0.5, 99.5])
    # where the numbers that standardise a tile come from (glacier_runtime/normalize.py):
    # fold = the training fold's statistics (one set for every tile); tile_percentile = each
    # tile's own tile_percentiles per band mapped to [0, 1]; tile_standard = each tile clipped
    # to its own tile_percentiles and standardised with its own mean and std
    normalization: Literal["fold", "tile_percentile", "tile_standard"] = "fold"
    tile_percentiles: List[float] = Field(default_factory=lambda: [2.0, 98.0])
    cache_dir: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        band_registry.select(self.sensor, self.bands)  # unknown/duplicate names raise
        for key in ("stats_percentiles", "tile_percentiles"):
            v = getattr(self, key)
            if len(v) != 2 or not 0 <= v[0] < v[1] <= 100:
                raise ValueError(f"{key} must be two numbers with 0 <= lo < hi <= 100, got {v}")
        return self


class ModelConfig(_Strict):
    arch: str = "Unet"
    encoder: str = "resnet34"
    decoder_channels: List[int] = Field(default_factory=lambda: [256, 128, 64, 32, 16])
    decoder_attention_type: Optional[Literal["scse"]] = None
    # a local file, or smp's named weights (imagenet, ...) from smp's download and cache
    encoder_weights: Optional[str] = None
    # how the weights' first convolution is fitted to data.bands when its band count differs:
    # auto = cycle for smp's named weights, strict for a file; strict = refuse; cycle = filters
    # repeated over the bands (smp's rule); mean = every band from the mean filter; fresh = random
    encoder_first_conv: Literal["auto", "strict", "cycle", "mean", "fresh"] = "auto"

    @field_validator("decoder_channels")
    @classmethod
    def _five(cls, v):
        if len(v) != 5 or any(c < 1 for c in v):
            raise ValueError(f"decoder_channels needs 5 positive ints, got {v}")
        return v

    @model_validator(mode="after")
    def _scse_width(self):
        # scSE squeezes channels by 16 (smp): a narrower decoder block would get a 0-channel convolution
        if self.decoder_attention_type == "scse" and min(self.decoder_channels) < 16:
            raise ValueError(f"decoder_attention_type scse needs decoder_channels of at least 16 each (it squeezes "
                             f"channels by 16), got {self.decoder_channels}")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(150, ge=1)
    batch_size: int = Field(32, ge=1)
    accumulate: int = Field(1, ge=1)
    # out of memory in a step: halve the micro-batch, double `accumulate` (same effective batch)
    # and redo that step; validation windows shrink the same way. Off: stop with the numbers.
    auto_batch: bool = False
    nonfinite_limit: int = Field(3, ge=1)  # non-finite loss/gradient steps in a row that stop a member
    patch_size: int = Field(256, ge=32)
    patches_per_epoch: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(5, ge=0)
    plateau_patience: int = Field(10, ge=1)
    amp: bool = True
    grad_clip: float = Field(1.0, ge=0)
    early_stopping: int = Field(30, ge=0)  # epochs without val MCC gain; 0 = off
    ema: float = Field(0.0, ge=0, lt=1)     # EMA decay; 0 = off
    num_workers: int = Field(4, ge=0)
    val_every: int = Field(1, ge=1)
    sync_bn: bool = False  # DDP only: BatchNorm statistics over all ranks (SyncBatchNorm)
    # last.pt (everything a resume needs) after the first epoch, then at most this often; 0 = every epoch
    checkpoint_every_s: float = Field(300.0, ge=0)

    @field_validator("patch_size")
    @classmethod
    def _stride(cls, v):
        if v % 32:
            raise ValueError(f"patch_size must be a multiple of 32 (the network stride), got {v}")
        return v


class LossConfig(_Strict):
    focal: float = Field(0.25, ge=0)
    dice: float = Field(0.25, ge=0)
    mcc: float = Field(0.35, ge=0)
    boundary: float = Field(0.15, ge=0)
    boundary_ramp_epochs: int = Field(30, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    # Lovasz-softmax (a surrogate of the per-class IoU) and Tversky (Dice with false positives
    # weighted by alpha, false negatives by beta): segmentation-models-pytorch's own losses.
    # Each ramps in linearly over its *_ramp_epochs as the boundary loss does (0 = full at once).
    lovasz: float = Field(0.0, ge=0)
    lovasz_ramp_epochs: int = Field(0, ge=0)
    tversky: float = Field(0.0, ge=0)
    tversky_alpha: float = Field(0.3, ge=0)
    tversky_beta: float = Field(0.7, ge=0)
    tversky_ramp_epochs: int = Field(0, ge=0)
    class_weights: Union[Literal["auto", "none"], List[float]] = "auto"

    @model_validator(mode="after")
    def _any(self):
        if self.focal + self.dice + self.mcc + self.boundary + self.lovasz + self.tversky <= 0:
            raise ValueError("at least one loss weight must be positive")
        if self.tversky and self.tversky_alpha + self.tversky_beta <= 0:
            raise ValueError("tversky_alpha + tversky_beta must be positive")
        return self


class SamplerConfig(_Strict):
    mode: Literal["balanced", "uniform"] = "balanced"  # uniform: streamed sets (HKH)
    targets: Dict[str, float] = Field(
        default_factory=lambda: {"background": 0.10, "glacier": 0.35, "debris": 0.40, "lake": 0.15})
    jitter: float = Field(0.4, ge=0, le=1)  # centre offset as a share of the patch

    @field_validator("targets")
    @classmethod
    def _pos(cls, v):
        if any(x < 0 for x in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"sampler targets must be >= 0 and not all zero, got {v}")
        return v


class AugmentConfig(_Strict):
    d4: bool = True
    scale: float = Field(0.1, ge=0, lt=1)
    rotate: float = Field(15.0, ge=0, le=180)
    affine_p: float = Field(0.5, ge=0, le=1)
    band_gain: float = Field(0.1, ge=0, lt=1)   # per-band brightness +-
    band_bias: float = Field(0.1, ge=0)         # per-band offset +- (normalised units)
    band_p: float = Field(0.5, ge=0, le=1)
    noise_std: float = Field(0.03, ge=0)
    noise_p: float = Field(0.3, ge=0, le=1)
    # a regional shift in the sensor's units, before normalisation (training/data/shift.py): with
    # probability shift_p a patch gets per-band gain (1 +- shift_gain), offset and gamma, haze and a
    # thermal offset; offsets as shares of each band's range in the fold's statistics. 0 = off
    shift_p: float = Field(0.0, ge=0, le=1)
    shift_gain: float = Field(0.15, ge=0, lt=1)
    shift_offset: float = Field(0.05, ge=0)
    shift_gamma: float = Field(0.2, ge=0)
    shift_haze: float = Field(0.05, ge=0)
    shift_thermal: float = Field(0.05, ge=0)
    # lake copy-paste: with this probability a patch with ice gets a lake (with lake_margin px of
    # its surroundings) from another training tile, centred on a pixel of ice. 0 = off
    lake_paste_p: float = Field(0.0, ge=0, le=1)
    lake_margin: int = Field(3, ge=0, le=16)


class ValidationConfig(_Strict):
    tta: Union[str, List[str]] = "none"
    window: int = Field(1024, ge=32)

    @field_validator("tta")
    @classmethod
    def _views(cls, v):
        from glacier_runtime.tta import resolve_views

        resolve_views(v)  # unknown presets or view names raise here, not after the first epoch
        return v


class Config(_Strict):
    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    init_from: Optional[str] = None
    stats_sample: int = Field(64, ge=1)  # tiles/patches sampled for statistics on streamed sets


class ConfigError(ValueError):
    pass


def check_against_classes(cfg: Config, class_names, path: str = "config") -> None:
    """Settings that depend on the data's classes, checked before any epoch runs."""
    names = list(class_names)
    cw = cfg.loss.class_weights
    if isinstance(cw, list) and len(cw) != len(names):
        raise ConfigError(f"{path}: loss.class_weights has {len(cw)} values for {len(names)} classes {names}; "
                          "give one weight per class or use `auto`")
    unknown = [k for k in cfg.sampler.targets if k not in names]
    if unknown and cfg.sampler.mode == "balanced":
        raise ConfigError(f"{path}: sampler.targets names unknown classes {unknown}; the classes are {names}")


def _loc(err) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def load_config(path: str, overrides: Optional[Dict] = None) -> Config:
    """Load and validate a YAML config; errors name the key and the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (see configs/ for examples)")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        parts = dotted.split(".")
        for i, p in enumerate(parts[:-1]):
            section = ".".join(parts[: i + 1])
            if node.get(p) is None:  # absent, or an empty `train:` line
                node[p] = {}
            elif not isinstance(node[p], dict):
                raise ConfigError(
                    f"{path}: --set {dotted}={value!r}: `{section}` is {node[p]!r} in the file, not a section "
                    f"of keys; make it a mapping (e.g. `{section}:` followed by indented `{parts[i + 1]}: ...` "
                    f"lines) or delete that line")
            node = node[p]
        node[parts[-1]] = value
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid config"]
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            lines.append(f"  {_loc(err)}: {msg} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None
    except band_registry.BandMappingError as exc:
        raise ConfigError(f"{path}: data.bands: {exc}") from None
    _check_encoder_weights(cfg, path)
    return cfg


def _check_encoder_weights(cfg: Config, path: str) -> None:
    """Encoder weights that cannot fit the bands are refused here, before any data is read."""
    if not cfg.model.encoder_weights:
        return
    from training.models import EncoderWeightsError, check_encoder_weights

    try:
        check_encoder_weights(cfg.model.encoder_weights, len(cfg.data.bands), cfg.model.encoder_first_conv,
                              cfg.model.encoder)
    except EncoderWeightsError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# settings that change how fast a run goes, not what it learns: ignored when deciding
# whether a finished member belongs to this run
RUNTIME_KEYS = ("train.num_workers", "train.checkpoint_every_s")



def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def config_differences(old: Dict[str, Any], new: Dict[str, Any], ignore: Sequence[str] = RUNTIME_KEYS) -> List[str]:
    """``["train.epochs: 3 in the member, 2 in this run", ...]``."""
    a, b = _flatten(old or {}), _flatten(new or {})
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: {a.get(k, '<absent>')!r} in the member, {b.get(k, '<absent>')!r} in this run")
    return diffs
