"""Test-time augmentation: the D4 group and multi-scale, each transform with its inverse.

Views are merged on softmax probabilities, never raw logits. A view maps an (N, C, H, W)
tensor; ``inverse`` maps the model's (N, K, H', W') output back to the input frame.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F


class View:
    """An element of D4: optional horizontal flip, then ``k`` quarter turns."""

    def __init__(self, name: str, k: int, flip: bool):
        self.name, self.k, self.flip = name, k, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = torch.flip(x, dims=(3,))
        if self.k:
            x = torch.rot90(x, self.k, dims=(2, 3))
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.k:
            y = torch.rot90(y, -self.k, dims=(2, 3))
        if self.flip:
            y = torch.flip(y, dims=(3,))
        return y

    def out_shape(self, h: int, w: int) -> Tuple[int, int]:
        return (w, h) if self.k % 2 else (h, w)

    def __repr__(self) -> str:
        return f"View({self.name})"


D4: Dict[str, View] = {
    "identity": View("identity", 0, False),
    "rot90": View("rot90", 1, False),
    "rot180": View("rot180", 2, False),
    "rot270": View("rot270", 3, False),
    "hflip": View("hflip", 0, True),
    "hflip_rot90": View("hflip_rot90", 1, True),
    "vflip": View("vflip", 2, True),  # hflip then a half turn is a vertical flip
    "hflip_rot270": View("hflip_rot270", 3, True),
}

PRESETS: Dict[str, Tuple[str, ...]] = {
    "none": ("identity",),
    "flips": ("identity", "hflip", "vflip"),
    "d4": tuple(D4),
}


def resolve_views(spec) -> List[View]:
    """A preset name ("none", "flips", "d4") or a list of view names -> views."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown TTA preset {spec!r}; use one of {sorted(PRESETS)} or a list of {list(D4)}")
        names: Sequence[str] = PRESETS[spec]
    else:
        names = list(spec)
    if not names:
        raise ValueError("TTA needs at least one view (use 'none' for the identity)")
    unknown = [n for n in names if n not in D4]
    if unknown:
        raise ValueError(f"unknown TTA views {unknown}; known: {list(D4)}")
    return [D4[n] for n in names]


def scaled_size(h: int, w: int, scale: float, stride: int = 32) -> Tuple[int, int]:
    """Size of a scaled view, rounded to the network stride (at least one stride)."""
    return (max(stride, int(round(h * scale / stride)) * stride), max(stride, int(round(w * scale / stride)) * stride))


def rescale(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def group_views(views: Sequence[View], h: int, w: int) -> List[List[View]]:
    """Views whose outputs share a shape, so each group runs as one batch."""
    groups: Dict[Tuple[int, int], List[View]] = {}
    for v in views:
        groups.setdefault(v.out_shape(h, w), []).append(v)
    return list(groups.values())
