"""Augmentation with albumentations, applied identically to image and mask: D4, mild
scale/rotate, per-band gain and offset, Gaussian noise. Images are normalised float32
(H, W, C)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import albumentations as A
import cv2
import numpy as np


class PerBandGainBias(A.ImageOnlyTransform):
    """Independent gain (1 +- gain) and offset (+- bias) per band: illumination and
    calibration differ between regions and scenes."""

    def __init__(self, gain: float = 0.1, bias: float = 0.1, p: float = 0.5):
        super().__init__(p=p)
        self.gain, self.bias = gain, bias

    def get_params_dependent_on_data(self, params: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Any]:
        c = data["image"].shape[-1]
        return {
            "g": self.random_generator.uniform(1 - self.gain, 1 + self.gain, c).astype(np.float32),
            "b": self.random_generator.uniform(-self.bias, self.bias, c).astype(np.float32),
        }

    def apply(self, img: np.ndarray, g=None, b=None, **params) -> np.ndarray:
        return img * g + b


def build_augment(cfg) -> Optional[A.Compose]:
    ts = []
    if cfg.d4:
        ts.append(A.D4(p=1.0))
    if cfg.affine_p and (cfg.scale or cfg.rotate):
        ts.append(A.Affine(scale=(1 - cfg.scale, 1 + cfg.scale), rotate=(-cfg.rotate, cfg.rotate),
                           border_mode=cv2.BORDER_REFLECT_101, interpolation=cv2.INTER_LINEAR,
                           mask_interpolation=cv2.INTER_NEAREST, p=cfg.affine_p))
    if cfg.band_p and (cfg.band_gain or cfg.band_bias):
        ts.append(PerBandGainBias(cfg.band_gain, cfg.band_bias, p=cfg.band_p))
    if cfg.noise_p and cfg.noise_std:
        ts.append(A.GaussNoise(std_range=(cfg.noise_std / 2, cfg.noise_std), p=cfg.noise_p))
    return A.Compose(ts, seed=0) if ts else None
