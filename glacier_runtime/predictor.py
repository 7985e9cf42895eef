"""The predictor: members x TTA views x scales over windows, merged on probabilities,
then a per-class log-probability bias, argmax and post-processing.

The same code validates during training, runs ``glacier-submit predict``/``evaluate`` and
ships inside the bundle. Memory is bounded: one probability accumulator per tile; windows,
views and members are streamed.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from . import postprocess
from .backends import OnnxRunner, TorchRunner, onnxruntime_available
from .classes import CLASS_VALUES
from .models import build_model
from .normalize import masked_pixels, normalize
from .tta import group_views, rescale, resolve_views, scaled_size
from .window import blend_weight, pad_to_multiple, plan_windows

log = logging.getLogger("glacier.runtime")

DEFAULT_INFERENCE: Dict[str, Any] = {
    "tta": "none",          # preset name or list of D4 view names
    "scales": [1.0],
    "merge": "mean",        # mean | weighted (by member weight)
    "bias": None,           # per-class additive bias on log-probabilities
    "window": 1024,         # tiles larger than this (after padding) are windowed
    "overlap": 0.25,
    "max_batch": "auto",    # views per forward pass: auto = 2 torch-CPU, 1 ORT-CPU (measured on CPU,
                            # benchmarks/inference_speed.py); 8 on CUDA (a default, not measured on a GPU)
    "stride": 32,
    "postprocess": [],
    "masked_background": True,  # pixels that are 0 in every band (masked scene edge) -> background
}


class Member:
    """One trained model with its own normalisation statistics and ensemble weight."""

    def __init__(self, runner, stats: Mapping[str, Any], weight: float = 1.0, name: str = "member",
                 n_classes: int = 4, meta: Optional[Dict[str, Any]] = None):
        self.runner, self.stats, self.weight, self.name = runner, stats, float(weight), name
        self.n_classes = n_classes
        self.meta = meta or {}


def member_from_entry(entry: Mapping[str, Any], device: Optional[str] = None, backend: str = "auto") -> Member:
    """Build a Member from a payload entry (format: see docs/BUNDLE.md)."""
    spec = entry["spec"]
    use_onnx = backend == "onnx" or (backend == "auto" and entry.get("onnx") is not None and onnxruntime_available())
    if use_onnx:
        if entry.get("onnx") is None:
            raise ValueError(f"member {entry.get('name')} has no ONNX graph; build with --backend onnx")
        blob = entry["onnx"]
        blob = blob.numpy().tobytes() if isinstance(blob, torch.Tensor) else bytes(blob)
        runner = OnnxRunner(blob, device)
    else:
        model = build_model(spec)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in entry["state_dict"].items()}
        model.load_state_dict(sd, strict=True)
        runner = TorchRunner(model, device)
    return Member(runner, entry["stats"], entry.get("weight", 1.0), entry.get("name", "member"),
                  int(spec["classes"]), entry.get("meta"))


class Predictor:
    def __init__(self, members: Sequence[Member], inference: Optional[Mapping[str, Any]] = None,
                 class_values: Sequence[int] = CLASS_VALUES):
        if not members:
            raise ValueError("a predictor needs at least one member")
        cfg = dict(DEFAULT_INFERENCE)
        cfg.update({k: v for k, v in (inference or {}).items() if v is not None or k == "bias"})
        self.cfg = cfg
        self.members = list(members)
        self.n_classes = self.members[0].n_classes
        self.views = resolve_views(cfg["tta"])
        self.scales = [float(s) for s in cfg["scales"]]
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        self.bias = np.zeros(self.n_classes, np.float32) if cfg.get("bias") is None else np.asarray(cfg["bias"], np.float32)
        if self.bias.shape != (self.n_classes,):
            raise ValueError(f"bias needs {self.n_classes} values, got {self.bias.tolist()}")
        self.rules = postprocess.validate_rules(cfg.get("postprocess") or [])
        self.class_values = np.asarray(list(class_values)[: self.n_classes], np.uint8)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], device: Optional[str] = None, backend: str = "auto",
                     overrides: Optional[Mapping[str, Any]] = None, members: Optional[Sequence[int]] = None) -> "Predictor":
        entries = list(payload["members"])
        if members is not None:
            entries = [entries[i] for i in members]
        inference = dict(payload.get("inference") or {})
        inference.update(overrides or {})
        built = [member_from_entry(e, device, backend) for e in entries]
        values = payload.get("class_map", {}).get("values", CLASS_VALUES)
        return cls(built, inference, values)

    @property
    def n_forward_views(self) -> int:
        return len(self.views) * len(self.scales) * len(self.members)

    # -- inference ----------------------------------------------------------------------------
    def _member_weights(self) -> List[float]:
        if self.cfg["merge"] == "weighted":
            w = [max(m.weight, 0.0) for m in self.members]
            s = sum(w)
            if s > 0:
                return [x / s for x in w]
        return [1.0 / len(self.members)] * len(self.members)

    def _max_batch(self, member: Member) -> int:
        mb = self.cfg.get("max_batch", "auto")
        if mb in (None, "auto"):
            runner = member.runner
            if getattr(runner, "device", None) is not None and runner.device.type == "cuda":
                return 8  # a default: not measured on a GPU
            return 1 if isinstance(runner, OnnxRunner) else 2  # benchmarks/inference_speed.py
        return max(1, int(mb))

    def _views_proba(self, member: Member, x: torch.Tensor, views, scales) -> torch.Tensor:
        """Mean softmax over views and scales for one (1, C, h, w) window -> (K, h, w)."""
        h, w = x.shape[-2:]
        total = torch.zeros((member.n_classes, h, w), dtype=torch.float32)
        n = 0
        stride = int(self.cfg["stride"])
        max_batch = self._max_batch(member)
        for s in scales:
            size = scaled_size(h, w, s, stride) if s != 1.0 else (h, w)
            xs = rescale(x, size)
            for group in group_views(views, *size):
                for i in range(0, len(group), max_batch):
                    chunk = group[i:i + max_batch]
                    batch = torch.cat([v.forward(xs) for v in chunk], 0)
                    probs = torch.softmax(member.runner(batch).float(), dim=1).cpu()
                    for j, v in enumerate(chunk):
                        p = rescale(v.inverse(probs[j:j + 1]), (h, w))
                        total += p[0]
                        n += 1
        return total / n

    def predict_proba(self, image: np.ndarray, views=None, scales=None, members=None) -> np.ndarray:
        """(C, H, W) raw tile -> (K, H, W) merged class probabilities."""
        if image.ndim != 3:
            raise ValueError(f"expected a (C, H, W) tile, got shape {image.shape}")
        views = self.views if views is None else views
        scales = self.scales if scales is None else scales
        mems = self.members if members is None else members
        weights = self._member_weights() if members is None else [1.0 / len(mems)] * len(mems)
        stride = int(self.cfg["stride"])
        _, H, W = image.shape
        acc = None
        norm = None
        for member, mw in zip(mems, weights):
            x = normalize(image, member.stats)
            xp, _ = pad_to_multiple(x, stride)
            hp, wp = xp.shape[1:]
            window = max(stride, int(self.cfg["window"]) // stride * stride)
            plan = plan_windows(hp, wp, window, float(self.cfg["overlap"]))
            wh, ww = plan[0][2:]  # every window of a plan has one size
            wmap = blend_weight(wh, ww) if len(plan) > 1 else np.ones((wh, ww), np.float32)
            if acc is None:
                acc = np.zeros((member.n_classes, hp, wp), np.float32)
                norm = np.zeros((hp, wp), np.float32)
            for (y0, x0, wh, ww) in plan:
                xt = torch.from_numpy(np.ascontiguousarray(xp[:, y0:y0 + wh, x0:x0 + ww]))[None]
                p = self._views_proba(member, xt, views, scales).numpy()
                acc[:, y0:y0 + wh, x0:x0 + ww] += mw * p * wmap
                norm[y0:y0 + wh, x0:x0 + ww] += mw * wmap
        probs = acc / np.maximum(norm, 1e-12)
        return probs[:, :H, :W]

    def masked(self, image: np.ndarray) -> Optional[np.ndarray]:
        """Pixels zero in every band: the masked area of the competition's tiles."""
        if not self.cfg.get("masked_background", True):
            return None
        m = masked_pixels(image)
        return m if m.any() else None

    def decide(self, probs: np.ndarray, masked: Optional[np.ndarray] = None) -> np.ndarray:
        """Probabilities -> class ids: argmax of log p + bias, masked pixels to background,
        then post-processing."""
        scores = np.log(np.maximum(probs, 1e-8)) + self.bias.reshape(-1, 1, 1)
        ids = scores.argmax(axis=0).astype(np.uint8)
        if masked is not None:
            ids[masked] = 0
        return postprocess.apply(ids, self.rules, self.n_classes)

    @staticmethod
    def masked_to_background(probs: np.ndarray, masked: Optional[np.ndarray]) -> np.ndarray:
        """Probabilities as ``decide`` will treat them: masked pixels certain background.
        Saved out-of-fold arrays go through this once, so their argmax (OOF MCC, bias
        tuning) needs no image and no second application of the rule."""
        if masked is None:
            return probs
        out = probs.copy()
        out[:, masked] = 0.0
        out[0, masked] = 1.0
        return out

    def predict_ids(self, image: np.ndarray) -> np.ndarray:
        return self.decide(self.predict_proba(image), self.masked(image))

    def to_pixels(self, ids: np.ndarray) -> np.ndarray:
        return self.class_values[ids]

    def predict_pixels_safe(self, image: np.ndarray, name: str = "tile"):
        """Never raises: full settings, then one view/scale, then one member, then background.

        Returns (uint8 pixel mask, note) where note says which fallback was used ('' if none).
        """
        H, W = image.shape[-2:]
        attempts = [
            ("full", {}),
            ("identity view only", {"views": resolve_views("none"), "scales": [1.0]}),
            ("first member, identity view", {"views": resolve_views("none"), "scales": [1.0], "members": self.members[:1]}),
        ]
        for label, kw in attempts:
            try:
                ids = self.decide(self.predict_proba(image, **kw), self.masked(image))
                note = "" if label == "full" else f"fallback: {label}"
                if note:
                    log.warning("%s: used %s", name, note)
                return self.to_pixels(ids), note
            except Exception as exc:  # noqa: BLE001 - one bad tile must not abort the run
                log.warning("%s: prediction (%s) failed: %s", name, label, exc)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        log.warning("%s: writing background", name)
        return np.zeros((H, W), np.uint8), "fallback: background"


def load_payload(path: str) -> Dict[str, Any]:
    """Load a model.pth payload written by any torch >= 2.0."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - older files may hold types the safe loader refuses
        if hasattr(path, "seek"):
            path.seek(0)
        return torch.load(path, map_location="cpu")
