"""Augmentation for a regional shift, in the units the sensor records (before normalisation):
per-band gain, offset and gamma, haze (an additive path radiance falling with wavelength, none
on the thermal band) and a thermal offset (``RadiometricShift``); and lake copy-paste (lakes with
a margin of their surroundings pasted onto other patches, next to ice: ``LakeBank``).

The shift acts on the raw patch, then the patch is normalised as its tile would be: with the
fold's numbers (``fold`` mode: the model sees the shift), or with the tile's own numbers moved
through the same per-band function (the per-tile modes: what the runtime would compute on the
shifted tile; exact for gain and offset, to first order for gamma in ``tile_standard``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from glacier_runtime.normalize import masked_pixels


@dataclass
class RadiometricShift:
    """Strengths (0 = that part off); ranges are shares of each band's range in the fold's
    statistics (hi - lo), so one config fits reflectance and DNs alike."""
    lo: np.ndarray             # (C,) fold's robust range
    hi: np.ndarray
    haze_weight: np.ndarray    # (C,) path radiance per band relative to the shortest band, 0 on thermal
    thermal: np.ndarray        # (C,) bool: the thermal band(s)
    gain: float = 0.15
    offset: float = 0.05
    gamma: float = 0.2
    haze: float = 0.05
    thermal_offset: float = 0.05
    p: float = 0.5

    @classmethod
    def from_config(cls, aug, stats: Mapping[str, Any], sensor: str, bands: Sequence[str]) -> "RadiometricShift":
        from training import bands as registry

        sel = registry.select(sensor, bands)
        thermal = np.array([b.role == "tir" for b in sel])
        centres = np.array([np.mean(b.wavelength_um) if b.wavelength_um else np.nan for b in sel], np.float64)
        reflective = ~thermal & np.isfinite(centres)
        shortest = centres[reflective].min() if reflective.any() else 1.0
        weight = np.where(reflective, (np.nan_to_num(centres, nan=1.0) / shortest) ** -2.0, 0.0)  # ~ lambda^-2
        return cls(np.asarray(stats["lo"], np.float64), np.asarray(stats["hi"], np.float64), weight, thermal,
                   aug.shift_gain, aug.shift_offset, aug.shift_gamma, aug.shift_haze, aug.shift_thermal, aug.shift_p)

    @property
    def span(self) -> np.ndarray:
        return np.maximum(self.hi - self.lo, 1e-6)

    def sample(self, rng: np.random.Generator) -> Optional[Dict[str, np.ndarray]]:
        """One draw of the shift's parameters, or None (this patch unshifted, probability 1 - p)."""
        if rng.random() >= self.p:
            return None
        c = self.lo.shape[0]
        g = 1.0 + self.gamma
        return {
            "gain": rng.uniform(1 - self.gain, 1 + self.gain, c),
            "offset": rng.uniform(-self.offset, self.offset, c) * self.span,
            "gamma": np.exp(rng.uniform(-np.log(g), np.log(g), c)),
            "haze": rng.uniform(0, self.haze) * self.span[self.haze_weight.argmax()] * self.haze_weight,
            "thermal": np.where(self.thermal, rng.uniform(-self.thermal_offset, self.thermal_offset) * self.span, 0.0),
        }

    def value(self, x: np.ndarray, b: int, prm: Mapping[str, np.ndarray]) -> np.ndarray:
        """Band ``b``'s function, increasing: gamma on the position in the fold's range (linear
        outside it), then gain, offset, haze and thermal offset."""
        lo, span = self.lo[b], self.span[b]
        u = (np.asarray(x, np.float64) - lo) / span
        uc = np.clip(u, 0.0, 1.0)
        u = uc ** prm["gamma"][b] + (u - uc)
        return (lo + span * u) * prm["gain"][b] + prm["offset"][b] + prm["haze"][b] + prm["thermal"][b]

    def apply(self, x: np.ndarray, prm: Mapping[str, np.ndarray]) -> np.ndarray:
        """(C, H, W) raw patch shifted; masked pixels (0 in every band) stay 0, NaN stays NaN."""
        masked = masked_pixels(x)
        out = np.stack([self.value(x[b], b, prm) for b in range(x.shape[0])]).astype(np.float32)
        if masked.any():
            out[:, masked] = 0.0
        return out

    def stats_after(self, norm: Mapping[str, Any], prm: Mapping[str, np.ndarray], mode: str) -> Mapping[str, Any]:
        """The numbers that normalise the shifted tile: unchanged for ``fold``; the tile's own
        moved through each band's function for the per-tile modes."""
        if mode == "fold":
            return norm
        out: Dict[str, List[float]] = {"mean": [], "std": [], "lo": [], "hi": []}
        for b in range(self.lo.shape[0]):
            lo, hi = float(self.value(norm["lo"][b], b, prm)), float(self.value(norm["hi"][b], b, prm))
            if mode == "tile_percentile":
                mean, std = lo, hi - lo
            else:
                m, s = float(norm["mean"][b]), float(norm["std"][b])
                mean = float(self.value(m, b, prm))
                std = float(self.value(m + s, b, prm) - self.value(m - s, b, prm)) / 2
            out["lo"].append(lo)
            out["hi"].append(hi)
            out["mean"].append(mean)
            out["std"].append(std if std > 1e-6 else 1.0)
        return out


@dataclass
class LakeBank:
    """Lakes of the training tiles, each with a margin of its surroundings: (normalised image
    crop, label crop, paste mask = the lake dilated by the margin)."""
    items: List[Tuple[np.ndarray, np.ndarray, np.ndarray]]
    lake: int
    ice: Tuple[int, ...]

    @classmethod
    def from_tiles(cls, images: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], lake: int,
                   ice: Sequence[int], margin: int = 3, min_px: int = 4, max_side: int = 64) -> "LakeBank":
        import cv2

        items = []
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
        for k in labels:
            lab = labels[k]
            n, comp, st, _ = cv2.connectedComponentsWithStats((lab == lake).astype(np.uint8), connectivity=8)
            for i in range(1, n):
                x, y, w, h, area = (int(v) for v in st[i])
                if area < min_px or max(w, h) + 2 * margin > max_side:
                    continue
                y0, x0 = max(0, y - margin), max(0, x - margin)
                y1, x1 = min(lab.shape[0], y + h + margin), min(lab.shape[1], x + w + margin)
                mask = cv2.dilate((comp[y0:y1, x0:x1] == i).astype(np.uint8), kernel).astype(bool)
                items.append((np.array(images[k][:, y0:y1, x0:x1]), lab[y0:y1, x0:x1].copy(), mask))
        return cls(items, int(lake), tuple(int(c) for c in ice))

    def __len__(self) -> int:
        return len(self.items)

    def paste(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """One lake pasted into the (C, P, P) normalised patch and its labels, centred on a
        pixel of ice (glacier or debris) of the patch; unchanged when the patch has no ice or
        the bank is empty. Inputs are not modified."""
        if not self.items:
            return x, y
        ys, xs = np.nonzero(np.isin(y, self.ice))
        if ys.size == 0:
            return x, y
        img, lab, mask = self.items[int(rng.integers(len(self.items)))]
        j = int(rng.integers(ys.size))
        h, w = lab.shape
        top, left = int(ys[j]) - h // 2, int(xs[j]) - w // 2
        py0, px0 = max(0, top), max(0, left)
        py1, px1 = min(y.shape[0], top + h), min(y.shape[1], left + w)
        if py1 <= py0 or px1 <= px0:
            return x, y
        sy, sx = py0 - top, px0 - left
        m = mask[sy:sy + py1 - py0, sx:sx + px1 - px0]
        x, y = x.copy(), y.copy()
        x[:, py0:py1, px0:px1][:, m] = img[:, sy:sy + py1 - py0, sx:sx + px1 - px0][:, m]
        y[py0:py1, px0:px1][m] = lab[sy:sy + py1 - py0, sx:sx + px1 - px0][m]
        return x, y
